"""The library behind stage `report` (its recipe: stages/report.py): the Markdown table of the
variants (mean +- std over seeds, budgets), paired differences between them, and the README block
it fills."""

from __future__ import annotations

from pathlib import Path

from pipeline.core import storage
from pipeline.core.errors import UserError
from pipeline.report.results import (
    aa_label,
    budget,
    budgets_unknown,
    compare,
    is_number,
    pgd_label,
    seed_pairs,
    show,
    train_field,
    train_seconds,
    unequal_evaluations,
    upstream,
)


def fmt(values: list[float], scale: float = 100.0, digits: int = 2) -> str:
    """'85.30' for one value, '85.30 ± 0.41' (sample std) for several, '-' for none."""
    vals = [v * scale for v in values if v is not None]
    if not vals:
        return "-"
    mean = sum(vals) / len(vals)
    if len(vals) == 1:
        return f"{mean:.{digits}f}"
    std = (sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _budget_cell(runs: list[dict]) -> tuple[str, str]:
    """'steps' and 'real + synthetic samples' of a variant's runs ('?' if not recorded)."""
    seen = {None if b is None else (b["steps"], b["real_samples"], b["synthetic_samples"])
            for b in map(budget, runs)}
    cells = [("?", "?") if b is None else (f"{b[0]}", f"{b[1]} + {b[2]}") for b in sorted(seen, key=str)]
    return " / ".join(c[0] for c in cells), " / ".join(c[1] for c in cells)


def table(groups: dict[str, list[dict]], unequal: list[str] = ()) -> str:
    """The Markdown results table, one row per variant; the attack columns are named from the
    evaluation settings the rows share, and a variant evaluated otherwise (shown only under
    --allow-unequal-evaluations) is marked UNEQUAL EVALUATION."""
    common = compare(groups)[0]
    other = unequal_evaluations(groups)
    head = (f"| variant | seeds | DRA weight | synthetic | steps | samples (real + syn) | clean (%) "
            f"| {pgd_label(common)} (%) | {aa_label(common)} (%) | train time (s) | checks |")
    rows = [head, "|" + "---|" * 11]
    for name, runs in groups.items():
        bad = sorted({w for r in runs for w in r.get("warnings", [])})
        setting = [", ".join(sorted({f"{train_field(r, k, '?')}" for r in runs}))
                   for k in ("dra_weight", "synthetic_fraction")]
        steps, samples = _budget_cell(runs)
        flag = (" UNEQUAL BUDGET" if name in unequal else "") + (" UNEQUAL EVALUATION" if name in other else "")
        rows.append(f"| {name}{flag} | {len(runs)} | {setting[0]} | {setting[1]} | {steps} | {samples} "
                    f"| {fmt([r['clean'] for r in runs])} "
                    f"| {fmt([r['pgd'] for r in runs])} | {fmt([r.get('autoattack') for r in runs])} "
                    f"| {fmt([train_seconds(r) for r in runs], scale=1.0, digits=0)} "
                    f"| {'ok' if not bad else 'FAILED: ' + ', '.join(bad)} |")
    return "\n".join(rows)


def comparisons(groups: dict[str, list[dict]], spec: str) -> list[tuple[str, str]]:
    """(variant, base) pairs to difference: ``spec`` is one variant (every other one minus it; empty:
    the first row) or a comma list of ``VARIANT:BASE`` pairs (e.g. ``AT+DRA:AT,DM-AT+DRA:DM-AT``)."""
    spec = ",".join(item for item in spec.split(",") if "/" not in item)  # interactions: see ``interactions``
    if ":" not in spec:
        base = spec or next(iter(groups))
        pairs = [(name, base) for name in groups if name != base]
        names = [base]
    else:
        pairs = [tuple(x.strip() for x in item.split(":")) for item in spec.split(",")]
        if not all(len(p) == 2 and all(p) for p in pairs):
            raise UserError(f"--baseline {spec!r}: give one variant, or VARIANT:BASE pairs separated by commas")
        names = [name for pair in pairs for name in pair]
    _known(groups, names, spec)
    return pairs


def _known(groups: dict[str, list[dict]], names: list[str], spec: str) -> None:
    unknown = sorted({n for n in names if n not in groups})
    if unknown:
        raise UserError(f"--baseline {spec!r}: no such variant {', '.join(map(repr, unknown))} "
                        f"(there are: {', '.join(groups)})")


def interactions(groups: dict[str, list[dict]], spec: str) -> list[tuple[str, str, str, str]]:
    """The ``A:B/C:D`` items of ``--baseline``: the difference of two paired differences, (A − B) − (C − D)
    per seed (a 2x2 design's interaction, e.g. ``DM-AT+DRA:DM-AT/AT+DRA:AT``)."""
    out = []
    for item in (x.strip() for x in spec.split(",") if "/" in x):
        parts = [tuple(y.strip() for y in half.split(":")) for half in item.split("/")]
        if len(parts) != 2 or not all(len(p) == 2 and all(p) for p in parts):
            raise UserError(f"--baseline {item!r}: an interaction is VARIANT:BASE/VARIANT:BASE")
        names = [n for p in parts for n in p]
        _known(groups, names, item)
        out.append((names[0], names[1], names[2], names[3]))
    return out


def interaction_values(groups: dict[str, list[dict]], names: tuple[str, str, str, str], key: str) -> list[float]:
    """(A − B) − (C − D) of ``key`` for every training seed all four variants ran, in seed order."""
    def by_seed(name: str, base: str) -> dict[str, float]:
        return {seed: a[key] - b[key] for seed, a, b in seed_pairs(groups, name, base)
                if is_number(a.get(key)) and is_number(b.get(key))}

    ab, cd = by_seed(*names[:2]), by_seed(*names[2:])
    return [ab[seed] - cd[seed] for seed in sorted(set(ab) & set(cd))]


def results_block(groups: dict[str, list[dict]], unequal: list[str], baseline: str) -> str:
    """The results table and, where variants share two or more seeds, their paired differences
    (``baseline``: see ``comparisons``)."""
    pairs = comparisons(groups, baseline)
    diffs = paired_table(groups, pairs, interactions(groups, baseline))
    other = unequal_evaluations(groups)
    main = table(groups, unequal) + ("\n\n**UNEQUAL EVALUATION: " + "; ".join(
        f"{name}: {why}" for name, why in other.items()) + ". These rows are not comparable with the others.**"
        if other else "")
    if not diffs:
        return main
    bases = sorted({b for _, b in pairs})
    against = f"each variant minus {bases[0]}" if ":" not in baseline else "each variant minus its base"
    return (f"{main}\n\nPaired by training seed, {against} (mean difference and its 95% "
            f"Student-t interval over the seeds, \"within noise\" where it contains 0; wins: seeds where the "
            f"variant is higher; detectable: the smallest PGD difference a 5% paired t-test over these seeds finds "
            f"with 80% power at their spread):\n\n{diffs}")


def markdown(groups: dict[str, list[dict]], images: list[str], unequal: list[str] = (), baseline: str = "") -> str:
    common = compare(groups)[0]
    n, offset = common["test images (n)"], common["test images (offset)"]
    test = f"the first {n} test images" if not offset else f"{n} test images from image {offset}"
    if common["AutoAttack images"] not in (None, n):
        test += f" (AutoAttack on the first {common['AutoAttack images']} of them)"
    unknown = budgets_unknown(groups)
    fair = ("" if unequal or unknown else
            " Every variant trained for the same optimizer steps on the same number of samples (steps x "
            "batch; an epoch is ceil(N_real / batch) steps whatever the real:synthetic mix, the DM-AT convention).")
    alike = ("" if compare(groups)[1] else
             " Every row was evaluated alike (threat model, eps, attacks and their settings, test images).")
    lines = [
        "# Results", "",
        f"Threat model {common['threat model']}, eps = {show(common['eps'])}, on {test}; accuracies "
        f"of the EMA weights. Mean ± sample std over seeds where several ran.{fair}{alike}", "",
    ]
    if unknown:
        lines += ["**WARNING: no run records its training budget (trained by an older version): the rows "
                  "may not be a fair comparison.**", ""]
    other = unequal_evaluations(groups)
    if other:
        lines += [f"**WARNING: the evaluation settings differ ({', '.join(other)}): these rows are not comparable "
                  "with the others.**", ""]
    if unequal:
        lines += [f"**WARNING: the training budgets differ ({', '.join(unequal)}): these rows are not a fair "
                  "comparison with the others.**", ""]
    lines += [
        results_block(groups, unequal, baseline or next(iter(groups))), "",
        f"Attacks: {common['attacks']} ({pgd_label(common)}: step size "
        f"{show(common['PGD step size'])}).", "",
    ]
    if all(len(runs) == 1 for runs in groups.values()):
        lines += ["One seed per variant: differences of a few points are within run-to-run noise here. "
                  "Whether DRA helps is answered by the study (README, \"The study\": four variants x five "
                  "paired seeds at one budget, `results/study/`).", ""]
    if common["AutoAttack version"] == "fast" and common["AutoAttack-fast iterations"] is not None:
        lines += [f"AutoAttack-fast is APGD-CE (1 restart) + APGD-T ({common['AutoAttack-fast target classes']} "
                  f"target classes), {common['AutoAttack-fast iterations']} iterations each, every APGD schedule "
                  "set for that iteration count: a cheaper subset of standard AutoAttack, so its accuracy is an expected upper bound on "
                  "standard AutoAttack's.", ""]
    lines += [f"![{Path(p).stem}]({p})\n" for p in images]
    return "\n".join(lines)


def markers(spec: str) -> tuple[Path, str, str]:
    """``FILE`` or ``FILE#NAME`` -> (file, begin marker, end marker); NAME defaults to ``report``."""
    path, _, name = spec.partition("#")
    name = name or "report"
    return Path(path), f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def readme_parts(spec: str) -> tuple[str, str]:
    """The text of the file before the begin and after the end marker (each once, in order)."""
    path, begin, end = markers(spec)
    if not path.is_file():
        raise UserError(f"--readme {path}: no such file")
    try:  # bytes decoded as they are: read_text() would turn CRLF into LF outside the block
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"--readme {path}: not UTF-8 text ({exc.reason} at byte {exc.start}); refused") from None
    if text.count(begin) != 1 or text.count(end) != 1 or text.index(begin) > text.index(end):
        raise UserError(f"{path}: needs one line {begin} and, after it, one line {end} around the table")
    head, rest = text.split(begin, 1)
    return head, rest.split(end, 1)[1]


def write_readme_block(spec: str, parts: tuple[str, str], table_md: str, options: str, source: str) -> None:
    """Replace what lies between the marker lines of the file with the results table; a comment
    names the command (``options``: its flags before --readme) and the data it came from."""
    path, begin, end = markers(spec)
    nl = "\r\n" if "\r\n" in parts[0] + parts[1] else "\n"  # the file's own line ending
    block = (f"{begin}\n<!-- generated by `python -m pipeline report {options} --readme {spec}` "
             f"from {source}: do not edit by hand -->\n{table_md}\n{end}").replace("\n", nl)
    # only the bytes between the markers change; mode and links are kept (storage.atomic_write)
    storage.atomic_write(path, (parts[0] + block + parts[1]).encode("utf-8"))


# two-sided 95% quantiles of Student's t, t_{0.975}(df), df = 1..30 (standard table values);
# beyond 30 the normal 1.96 is within 2% of the exact quantile
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
        2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
        2.052, 2.048, 2.045, 2.042)


# one-sided 80% quantiles of Student's t, t_{0.80}(df), df = 1..30 (standard table values); 0.842 beyond
T80 = (1.376, 1.061, 0.978, 0.941, 0.920, 0.906, 0.896, 0.889, 0.883, 0.879, 0.876, 0.873, 0.870, 0.868,
       0.866, 0.865, 0.863, 0.862, 0.861, 0.860, 0.859, 0.858, 0.858, 0.857, 0.856, 0.856, 0.855, 0.855,
       0.854, 0.854)


def t975(df: int) -> float:
    return T975[df - 1] if df <= len(T975) else 1.96


def detectable(d: list[float]) -> float:
    """The smallest mean paired difference a two-sided 5% t-test over these pairs detects with 80% power,
    at their observed spread: (t_{0.975} + t_{0.80}) x sd / sqrt(n)."""
    n = len(d)
    mean = sum(d) / n
    sd = (sum((x - mean) ** 2 for x in d) / (n - 1)) ** 0.5
    return (t975(n - 1) + (T80[n - 2] if n - 1 <= len(T80) else 0.842)) * sd / n ** 0.5


def paired_difference(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """Mean of the paired differences a_i - b_i and its 95% t-interval (needs two or more pairs)."""
    d = [x - y for x, y in zip(a, b, strict=True)]
    n = len(d)
    mean = sum(d) / n
    sd = (sum((x - mean) ** 2 for x in d) / (n - 1)) ** 0.5
    half = t975(n - 1) * sd / n ** 0.5
    return mean, mean - half, mean + half


def paired_values(groups: dict[str, list[dict]], name: str, baseline: str, key: str,
                  upstream_of: str | None = None) -> list[tuple[float, float]]:
    """(variant, base) values of ``key`` for every training seed both ran, in seed order (only the
    seeds whose two runs both trained on the upstream ``upstream_of``, when given)."""
    return [(a[key], b[key]) for _, a, b in seed_pairs(groups, name, baseline)
            if is_number(a.get(key)) and is_number(b.get(key))
            and (upstream_of is None or upstream(a) == upstream(b) == upstream_of)]


def upstreams(groups: dict[str, list[dict]], pairs: list[tuple[str, str]]) -> list[str]:
    """The upstreams (diffusion models) of the bases of ``pairs``, in first-seen order (several: the
    study spans upstreams, and the paired table shows each group beside the pooled interval)."""
    return list(dict.fromkeys(d for _, b in pairs for r in groups[b] if (d := upstream(r))))


def metric_keys(groups: dict[str, list[dict]], pairs: list[tuple[str, str]]) -> list[str]:
    """The accuracies (clean, pgd, autoattack) that some base of ``pairs`` has."""
    return [k for k in ("clean", "pgd", "autoattack")
            if any(is_number(r.get(k)) for _, b in pairs for r in groups[b])]


def _cell(d: list[float]) -> str:
    mean, lo, hi = paired_difference(d, [0.0] * len(d))
    noise = " (within noise)" if lo <= 0 <= hi else ""
    return f"{100 * mean:+.2f} [{100 * lo:+.2f}, {100 * hi:+.2f}]{noise}, wins {sum(x > 0 for x in d)}/{len(d)}"


def paired_table(groups: dict[str, list[dict]], pairs: list[tuple[str, str]],
                 inter: list[tuple[str, str, str, str]] = ()) -> str:
    """Each (variant, base) pair's difference, paired by training seed: mean and 95% CI in points,
    the seeds where the variant is higher ("wins"), and the smallest PGD difference these pairs detect
    with 80% power (``detectable``); then each interaction (A − B) − (C − D) of ``inter`` alike.

    Empty when no pair shares two or more seeds (one seed gives no interval). A difference whose
    interval contains 0 is marked "within noise".
    """
    keys = metric_keys(groups, pairs) or metric_keys(groups, [(a, b) for a, b, *_ in inter])
    rows = []
    several = upstreams(groups, pairs)
    several = several if len(several) > 1 else []
    diffs: list[tuple[str, dict[str, list[float]], bool]] = []
    for name, baseline, group in [(n, b, g) for n, b in pairs for g in [None, *several]]:
        label = f"{name} − {baseline}" + (f" (upstream {group[:12]})" if group else "")
        d = {k: [a - b for a, b in paired_values(groups, name, baseline, k, group)] for k in keys}
        diffs.append((label, d, bool(group)))
    for a, b, c, e in inter:
        diffs.append((f"({a} − {b}) − ({c} − {e})", {k: interaction_values(groups, (a, b, c, e), k) for k in keys},
                      False))
    for label, d, grouped in diffs:
        n_pairs = max((len(v) for v in d.values()), default=0)
        if not (n_pairs >= 2 or (grouped and n_pairs)):
            continue
        cells = [_cell(d[k]) if len(d[k]) >= 2 else "-" for k in keys]
        pgd = d.get("pgd", [])
        cells.append(f"{100 * detectable(pgd):.2f}" if len(pgd) >= 2 else "-")
        rows.append(f"| {label} | {n_pairs} | " + " | ".join(cells) + " |")
    if not rows:
        return ""
    labels = {"clean": "clean", "pgd": "PGD", "autoattack": "AutoAttack"}
    head = ("| difference | paired seeds | " + " | ".join(f"Δ {labels[k]} (points, 95% CI)" for k in keys)
            + " | detectable Δ PGD (points, 80% power) |")
    return "\n".join([head, "|" + "---|" * (3 + len(keys)), *rows])
