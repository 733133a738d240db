"""How far AutoAttack's fast subset is from standard AutoAttack: the same checkpoints evaluated on
the same test images under both (``scripts/study.sh`` with ``AA_STANDARD=1`` writes
``results/study-aa-standard/`` and ``results/study-aa-fast/``) -> one table row per run.

Standard AutoAttack (APGD-CE, APGD-T, FAB-T, Square; Croce & Hein 2020, fra31/auto-attack
``autoattack/autoattack.py``, version 'standard') is the reference; the fast subset (APGD-CE +
APGD-T with fewer targets and iterations) is what every study run reports, because it costs a tenth
as much. Its accuracy is expected to be an upper bound of standard's; the table shows by how much.
"""

from __future__ import annotations

from pipeline.core.errors import UserError
from pipeline.report.results import is_number, train_field, variant_order

# what must agree for two results to be the same run on the same images
SAME = ("checkpoint", "n", "offset", "eps", "threat_model", "shards")


def _key(run: dict) -> tuple[str, str]:
    return str(run["variant"]), str(train_field(run, "seed", "?"))


def _index(runs: list[dict], version: str, where: str) -> dict[tuple[str, str], dict]:
    found: dict[tuple[str, str], dict] = {}
    for r in runs:
        if r.get("autoattack_version") != version or not is_number(r.get("autoattack")):
            raise UserError(f"{r['_path']}: not a {version} AutoAttack result (autoattack_version "
                            f"{r.get('autoattack_version')!r}, autoattack {r.get('autoattack')!r}); {where} "
                            f"holds {version} AutoAttack results only")
        key = _key(r)
        if key in found:
            raise UserError(f"{where}: two results of {key[0]} seed {key[1]} ({found[key]['_path']}, {r['_path']})")
        found[key] = r
    return found


def pair_runs(standard: list[dict], fast: list[dict], standard_dir: str, fast_dir: str) -> list[tuple[dict, dict]]:
    """(standard, fast) results of the same variant and training seed, in variant order; refuses
    results that are not the version their folder is for, runs found in one folder only, and pairs
    that differ in checkpoint, test images (n, offset, shards) or threat model."""
    std, fst = _index(standard, "standard", standard_dir), _index(fast, "fast", fast_dir)
    alone = sorted(set(std) ^ set(fst))
    if alone:
        names = ", ".join(f"{v} seed {s} ({standard_dir if (v, s) in std else fast_dir})" for v, s in alone)
        raise UserError(f"AutoAttack results without their counterpart: {names}")
    pairs = []
    for key in sorted(std, key=lambda k: (variant_order(k[0]), k[1])):
        a, b = std[key], fst[key]
        differ = [f for f in SAME if a.get(f) != b.get(f)]
        if (a.get("autoattack_n") or a.get("n")) != (b.get("autoattack_n") or b.get("n")):
            differ.append("autoattack_n")  # AutoAttack on another subset of the images
        if differ:
            raise UserError(f"{a['_path']} and {b['_path']}: not the same run on the same images "
                            f"({', '.join(f'{f} {a.get(f)!r} vs {b.get(f)!r}' for f in differ)})")
        pairs.append((a, b))
    return pairs


def _seconds(run: dict) -> float | None:
    t = (run.get("timings") or {}).get("autoattack")
    return t if is_number(t) else None


def markdown(pairs: list[tuple[dict, dict]]) -> str:
    """The table (one row per run) and a sentence on the mean and largest gap."""
    fast = pairs[0][1].get("autoattack_fast") or {}
    pgd = pairs[0][0].get("pgd_attack") or {}
    rows = [f"| variant | seed | test images | PGD-{pgd.get('steps', '?')}x{pgd.get('restarts', '?')} (%) "
            "| AutoAttack standard (%) | AutoAttack-fast (%) | fast − standard (points) "
            "| standard time (s) | fast time (s) |", "|" + "---|" * 9]
    gaps, ratios = [], []
    for std, fst in pairs:
        gap = 100 * (fst["autoattack"] - std["autoattack"])
        gaps.append(gap)
        t_std, t_fast = _seconds(std), _seconds(fst)
        if t_std and t_fast is not None:
            ratios.append(t_fast / t_std)
        times = " | ".join("-" if t is None else f"{t:.0f}" for t in (t_std, t_fast))
        rows.append(f"| {std['variant']} | {train_field(std, 'seed', '?')} | {std['n']} | {100 * std['pgd']:.2f} "
                    f"| {100 * std['autoattack']:.2f} | {100 * fst['autoattack']:.2f} | {gap:+.2f} | {times} |")
    n = pairs[0][0]["n"]
    above = sum(g > 0 for g in gaps)
    text = (f"AutoAttack-fast: APGD-CE + APGD-T ({fast.get('targets', '?')} target classes), "
            f"{fast.get('iters', '?')} iterations each; standard: APGD-CE, APGD-T (9 targets), FAB-T, Square, "
            f"100 iterations / 5000 queries. Over {len(pairs)} runs the fast subset is "
            f"{sum(gaps) / len(gaps):+.2f} points from standard on average (range {min(gaps):+.2f} to "
            f"{max(gaps):+.2f}; above it in {above} of {len(pairs)}; one image is {100 / n:.2f} points)")
    if ratios:
        text += f" and took {100 * sum(ratios) / len(ratios):.0f}% of its time"
    return "\n".join(rows) + "\n\n" + text + "."
