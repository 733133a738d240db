"""The DRA sweep: DVC experiments over the target set (t, layer) and the weight lambda -> data -> report.

Each experiment (``dvc exp run --queue -S sweep.t=... -S sweep.layer=... -S sweep.dra_weight=...``)
re-runs only the stages ``train-sweep`` and ``evaluate-sweep``: one AT+DRA training on the chosen
target set of the cache (no re-extraction), evaluated on held-out validation images of the train
split. ``collect`` turns ``dvc exp show --json`` into one record per experiment (the committed
data, ``results/sweep/runs.json``); ``markdown`` and ``heatmaps`` render it with the cache's
linear-probe accuracy per (t, layer) beside it.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from pipeline.core.errors import UserError
from pipeline.report.results import is_number

METRICS = "artifacts/sweep/metrics.json"  # what evaluate-sweep writes (flat: clean, pgd, n, ...)
TRAIN_METRICS = "artifacts/sweep/train/metrics.json"  # what train-sweep writes (budget, seconds)


def _walk(node: Any, inside: bool = False) -> Any:
    """Every dict of ``dvc exp show --json`` that is an experiment (found under an ``experiments``
    list) and carries its params and metrics; the workspace and baseline commits are not."""
    if isinstance(node, dict):
        data = node.get("data")
        if inside and isinstance(data, dict) and "params" in data and "metrics" in data:
            yield node
        for key, value in node.items():
            yield from _walk(value, inside or key == "experiments")
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value, inside)


def _file_data(section: dict, path: str) -> dict:
    entry = (section or {}).get(path) or {}
    return entry.get("data") or {} if isinstance(entry, dict) else {}


def collect(exp_show: Any) -> list[dict]:
    """One record per experiment that finished the sweep stages: its target set, weight, seed,
    validation accuracies and training budget (experiments without sweep metrics are left out)."""
    runs = []
    for node in _walk(exp_show):
        name, rev = str(node.get("name") or node.get("rev", "")), str(node.get("rev", ""))
        data = node["data"]
        params = _file_data(data.get("params"), "params.yaml")
        metrics, train = _file_data(data.get("metrics"), METRICS), _file_data(data.get("metrics"), TRAIN_METRICS)
        sweep = params.get("sweep") or {}
        if not metrics or not all(k in sweep for k in ("t", "layer", "dra_weight")):
            continue
        runs.append({"experiment": name, "rev": rev, "t": int(sweep["t"]), "layer": str(sweep["layer"]),
                     "dra_weight": float(sweep["dra_weight"]), "seed": int(sweep.get("seed", 0)),
                     "clean": metrics.get("clean"), "pgd": metrics.get("pgd"), "n": metrics.get("n"),
                     "offset": metrics.get("offset"), "eps": metrics.get("eps"), "checks_passed": metrics.get("checks_passed"),
                     "budget": train.get("budget"), "train_seconds": train.get("train_seconds")})
    return sorted(runs, key=lambda r: (r["dra_weight"] > 0, r["layer"], r["t"], r["dra_weight"], r["seed"]))


def _valid_run(r: Any) -> bool:
    """One record as ``collect`` writes it: the types the table and heatmaps rely on."""
    num = is_number
    return (isinstance(r, dict) and type(r.get("t")) is int and isinstance(r.get("layer"), str)
            and num(r.get("dra_weight")) and r["dra_weight"] >= 0 and type(r.get("seed", 0)) is int
            and all(r.get(k) is None or (num(r[k]) and 0 <= r[k] <= 1) for k in ("clean", "pgd"))
            and all(k in r for k in ("clean", "pgd"))
            and (r.get("budget") is None or isinstance(r["budget"], dict)))


def check_runs(runs: Any) -> list[dict]:
    """The records of ``runs.json``, refusing what the report cannot read or compare (one line)."""
    if not isinstance(runs, list) or not runs or not all(map(_valid_run, runs)):
        raise UserError("sweep results need a non-empty list of records with t (int), layer (str), dra_weight "
                        "(number >= 0), seed (int), clean and pgd (accuracy in [0, 1] or null), budget (dict or null)")
    if not any(r["dra_weight"] > 0 for r in runs):
        raise UserError("sweep results hold no run with dra_weight > 0: nothing to tabulate over t x lambda")
    budgets = {((r.get("budget") or {}).get("steps"), (r.get("budget") or {}).get("samples")) for r in runs}
    if len(budgets) > 1:
        raise UserError(f"sweep runs trained at different budgets (steps, samples: {sorted(map(str, budgets))}): "
                        "not comparable")
    evals = {(r.get("n"), r.get("offset")) for r in runs}
    if len(evals) > 1:
        raise UserError(f"sweep runs were evaluated on different images (n, offset: {sorted(map(str, evals))}): "
                        "not comparable")
    eps = {r.get("eps") for r in runs}  # recorded by collect since the report compares evaluations
    if len(eps) > 1:
        raise UserError(f"sweep runs were evaluated at different eps ({sorted(map(str, eps))}): not comparable")
    return runs


def _axes(runs: list[dict]) -> tuple[list[int], list[str], list[float]]:
    dra = [r for r in runs if r["dra_weight"] > 0]
    return (sorted({r["t"] for r in dra}), sorted({r["layer"] for r in dra}),
            sorted({r["dra_weight"] for r in dra}))


def _cell(runs: list[dict], key: str, **match: Any) -> float | None:
    vals = [r[key] for r in runs if all(r[k] == v for k, v in match.items()) and r.get(key) is not None]
    return sum(vals) / len(vals) if vals else None


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def probe_lookup(probe: dict | None) -> dict[tuple[int, str], float]:
    """(t, layer) -> probe accuracy from ``probe.json``; malformed entries are left out (the probe
    is shown beside the sweep, never used to compute it)."""
    sets = (probe or {}).get("sets") if isinstance(probe, dict) else None
    out = {}
    for s in sets if isinstance(sets, list) else []:
        if (isinstance(s, dict) and type(s.get("t")) is int and isinstance(s.get("layer"), str)
                and isinstance(s.get("probe_accuracy"), (int, float)) and not isinstance(s["probe_accuracy"], bool)):
            out[(s["t"], s["layer"])] = float(s["probe_accuracy"])
    return out


def diagnostics_lookup(probe: dict | None) -> dict[tuple[int, str], tuple[float, float]]:
    """(t, layer) -> (effective rank, brightness R^2) of the target set, where the probe file carries
    the store's diagnostics (pipeline/cache/diagnostics.py); malformed entries are left out."""
    sets = ((probe or {}).get("diagnostics") or {}).get("sets") if isinstance(probe, dict) else None
    out = {}
    for name, d in sets.items() if isinstance(sets, dict) else []:
        m = re.fullmatch(r"t(\d+)-(.+)", str(name))
        if m and isinstance(d, dict) and all(isinstance(d.get(k), (int, float)) for k in ("effective_rank", "brightness_r2")):
            out[(int(m.group(1)), m.group(2))] = (float(d["effective_rank"]), float(d["brightness_r2"]))
    return out


def best_cell(runs: list[dict]) -> dict | None:
    """The (t, layer, lambda > 0) cell with the highest mean validation PGD accuracy over its seeds
    (runs whose evaluation checks failed, or without a PGD figure, left out): what the study adopts."""
    cells: dict[tuple, list[float]] = {}
    for r in runs:
        if r["dra_weight"] > 0 and r.get("pgd") is not None and r.get("checks_passed") is not False:
            cells.setdefault((r["t"], r["layer"], r["dra_weight"]), []).append(r["pgd"])
    if not cells:
        return None
    (t, layer, w), pgd = max(cells.items(), key=lambda kv: sum(kv[1]) / len(kv[1]))
    return {"t": t, "layer": layer, "dra_weight": w, "pgd": sum(pgd) / len(pgd), "seeds": len(pgd)}


def markdown(runs: list[dict], probe: dict | None) -> str:
    """The sweep table (rows: layer, t; columns: lambda, each clean / PGD on validation) and the
    best cell next to the lambda = 0 baseline."""
    ts, layers, weights = _axes(runs)
    probes = probe_lookup(probe)
    base = [r for r in runs if r["dra_weight"] == 0]
    first = runs[0]
    b = first.get("budget") or {}
    seeds = sorted({r.get("seed", 0) for r in runs})
    lines = [f"Validation accuracy (%) of AT+DRA, clean / PGD, on {first.get('n')} held-out images of the train "
             f"split (from image {first.get('offset')}; never the test set), one training budget for every cell "
             f"({b.get('steps', '?')} steps, {b.get('samples', '?')} samples), seed(s) {', '.join(map(str, seeds))}.",
             ""]
    diag = diagnostics_lookup(probe)  # effective rank and brightness R^2 columns where the store has them
    extra = " eff. rank | brightness R² |" if diag else ""
    head = f"| layer | t | probe (%) |{extra} " + " | ".join(f"λ = {w:g}" for w in weights) + " |"
    lines += [head, "|" + "---|" * (3 + 2 * bool(diag) + len(weights))]
    for layer in layers:
        for t in ts:
            cells = [f"{_pct(_cell(runs, 'clean', t=t, layer=layer, dra_weight=w))} / "
                     f"{_pct(_cell(runs, 'pgd', t=t, layer=layer, dra_weight=w))}" for w in weights]
            d = diag.get((t, layer))
            info = (f" {d[0]:.1f} | {d[1]:.2f} |" if d else " - | - |") if diag else ""
            lines.append(f"| {layer} | {t} | {_pct(probes.get((t, layer)))} |{info} " + " | ".join(cells) + " |")
    if base:
        lines += ["", f"λ = 0 (plain AT, no target): {_pct(_cell(base, 'clean'))} / {_pct(_cell(base, 'pgd'))}."]
    best = best_cell(runs)
    if best:
        lines += ["", f"Best validation PGD: t = {best['t']}, {best['layer']}, λ = {best['dra_weight']:g} "
                      f"({_pct(best['pgd'])}%)" + (f", against {_pct(_cell(base, 'pgd'))}% without DRA" if base else "")
                  + (". One seed per cell gives no confidence interval: re-run the chosen cell and its rivals "
                     "with several seeds (report's paired differences) before trusting a gap of a few points."
                     if len(seeds) == 1 else ".")]
    failed = [r["experiment"] for r in runs if r.get("checks_passed") is False]
    if failed:
        lines += ["", f"**Evaluation checks failed for: {', '.join(failed)}.**"]
    return "\n".join(lines)


def _ink(im: Any, value: float, diverging: bool = False) -> str:
    """Text colour readable on the cell: black on the bright end of a dark -> bright map, white on
    the dark end; on a diverging map (dark at both ends, light in the middle) black near the middle."""
    if math.isnan(value):
        return "k"
    x = float(im.norm(value))
    return ("k" if abs(x - 0.5) < 0.3 else "w") if diverging else ("k" if x > 0.6 else "w")


def heatmaps(runs: list[dict], probe: dict | None, path: Path) -> Path:
    """t x lambda heatmaps of validation clean and PGD accuracy, one row of panels per layer, and
    the probe accuracy (t x layer) beside them (``heatmap_figure``), saved as a PNG."""
    import matplotlib.pyplot as plt

    fig = heatmap_figure(runs, probe)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _scale(values: list[float | None], centre: float | None = None) -> tuple[float, float]:
    """(vmin, vmax) in % over the values shown (None and NaN left out); with ``centre`` (in %)
    symmetric around it, so that equal differences from lambda = 0 get equal colours; a flat set gets +-0.5."""
    vals = [100 * v for v in values if v is not None and not math.isnan(v)]
    if centre is not None:
        half = max([abs(v - centre) for v in vals] + [0.5])
        return centre - half, centre + half
    if not vals:
        return 0.0, 100.0
    lo, hi = min(vals), max(vals)
    return (lo - 0.5, hi + 0.5) if hi - lo < 1e-9 else (lo, hi)


def heatmap_figure(runs: list[dict], probe: dict | None) -> Any:
    """The sweep's heatmaps, read at a glance: one colour scale per metric (clean, PGD, probe),
    shared by every layer's panel. With a lambda = 0 run the accuracy maps diverge from it (white:
    as lambda = 0, blue above it, red below, symmetric so that equal differences look alike), its
    value is in each panel's title and a line on the colour bar, and each cell shows its accuracy
    and, in brackets, its difference from lambda = 0 in points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ts, layers, weights = _axes(runs)
    probes = probe_lookup(probe)
    base = [r for r in runs if r["dra_weight"] == 0]
    grids = {key: {layer: [[_cell(runs, key, t=t, layer=layer, dra_weight=w) for w in weights] for t in ts]
                   for layer in layers} for key in ("clean", "pgd")}
    refs = {key: (None if v is None else 100 * v) for key in ("clean", "pgd")
            for v in [_cell(base, key) if base else None]}
    scales = {key: _scale([v for g in grids[key].values() for row in g for v in row], refs[key])
              for key in ("clean", "pgd")}
    scales["probe"] = _scale([probes.get((t, layer)) for t in ts for layer in layers])
    fig, axes = plt.subplots(len(layers), 3, figsize=(11.5, 3.3 * len(layers)), squeeze=False)
    for i, layer in enumerate(layers):
        for j, key in enumerate(("clean", "pgd")):
            values = [[math.nan if v is None else 100 * v for v in row] for row in grids[key][layer]]
            ref = refs[key]
            ax = axes[i][j]
            im = ax.imshow(values, cmap="viridis" if ref is None else "RdBu", aspect="auto",
                           vmin=scales[key][0], vmax=scales[key][1])
            for a, row in enumerate(values):
                for c, v in enumerate(row):
                    text = "-" if math.isnan(v) else f"{v:.1f}" + ("" if ref is None else f"\n({v - ref:+.1f})")
                    ax.text(c, a, text, ha="center", va="center", color=_ink(im, v, ref is not None), fontsize=8)
            ax.set_xticks(range(len(weights)), [f"{w:g}" for w in weights])
            ax.set_yticks(range(len(ts)), [str(t) for t in ts])
            ax.set_xlabel("λ (DRA weight)")
            ax.set_ylabel("t")
            name = "clean" if key == "clean" else "PGD"
            against = "" if ref is None else f"\nagainst λ = 0: {ref:.1f} (in brackets: cell − λ = 0)"
            ax.set_title(f"{layer}: validation {name} (%){against}", fontsize=9)
            bar = fig.colorbar(im, ax=ax, fraction=0.046)
            if ref is not None:
                bar.ax.axhline(ref, color="black", lw=1.5)
                bar.set_label("line: λ = 0", fontsize=7)
        ax = axes[i][2]
        col = [[100 * probes[(t, layer)] if (t, layer) in probes else math.nan] for t in ts]
        im = ax.imshow(col, cmap="magma", aspect="auto", vmin=scales["probe"][0], vmax=scales["probe"][1])
        for a, row in enumerate(col):
            ax.text(0, a, "-" if math.isnan(row[0]) else f"{row[0]:.1f}", ha="center", va="center",
                    color=_ink(im, row[0]))
        ax.set_xticks([0], [layer])
        ax.set_yticks(range(len(ts)), [str(t) for t in ts])
        ax.set_title("linear probe (%)", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig
