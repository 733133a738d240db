"""Validation curves (``report --curves DIR``): does a run overfit robustly, and where is its best epoch?

Reads the per-epoch logs that ``train --val-n`` writes (``log.tsv``: ``val_clean``/``val_pgd`` on held-out
train rows, blank where ``--val-every`` skipped an epoch), one group per folder of DIR: ``DIR/NAME/log.tsv``
(one run; its ``config.json`` beside it names the setting) or ``DIR/NAME/seed*.tsv`` (one run per
seed, as a study keeps them). Per group: the best validation PGD accuracy and its epoch, the last
epoch's, their difference (the **drop**: robust overfitting is a drop that the same images and
starts show epoch after epoch), and the training batches' adversarial accuracy over the last tenth of
the epochs (the generalisation gap is the difference). The plot draws validation PGD (solid) and clean
(dashed) accuracy against the optimizer step (the epoch for logs without one), the mean over seeds with their
range shaded. ``overfit.png`` shows each group on its own panel: the training batches' adversarial
accuracy against validation PGD, so the generalisation gap and the drop after the best epoch (marked)
are read off one run's picture.
"""

from __future__ import annotations

import csv
import json
import math
from collections import Counter
from pathlib import Path

from pipeline.core.errors import UserError

NEEDED = ("epoch", "val_pgd", "val_clean", "adv_acc")
OPTIONAL = ("step", "dra_grad_share", "dra", "dra_weight", "loss")  # step: the budget; the rest: a DRA run's strength


def read_curve(path: Path) -> dict[str, list[float | None]]:
    """The log's columns as numbers (None where blank); refused without the validation columns."""
    try:
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh, delimiter="\t"))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise UserError(f"{path}: not a readable log ({type(exc).__name__})") from None
    if not rows or any(k not in rows[0] for k in NEEDED):
        raise UserError(f"{path}: not a training log with per-epoch validation (needs {', '.join(NEEDED)}: "
                        "train with --val-n)")
    try:
        return {k: [float(r[k]) if r[k] not in ("", None) else None for r in rows]
                for k in (*NEEDED, *(o for o in OPTIONAL if o in rows[0]))}
    except ValueError as exc:
        raise UserError(f"{path}: a value is not a number ({exc})") from None


def _config(folder: Path) -> dict:
    path = folder / "config.json"
    c = json.loads(path.read_text()) if path.is_file() else {}
    return c.get("train", c)  # a checkpoint's config.json holds the run's settings under "train"


def _setting(folder: Path) -> str:
    c = _config(folder)
    if not c:
        return ""
    limit = c.get("real_limit") or "all"
    method = c.get("method", "?") + (f" β{c['trades_beta']:g}" if c.get("method") == "trades" else "")
    text = f"{c.get('arch', '?')}, {method}, N={limit}, {c.get('epochs', '?')} epochs"
    if c.get("augment") is False:
        text += ", no augmentation"
    if c.get("synthetic_fraction"):
        text += f", {c['synthetic_fraction']:g} synthetic"
    if c.get("dra_weight"):
        text += (f", DRA λ={c['dra_weight']:g} on t={c.get('t')} {c.get('layer')} from "
                 f"{c.get('align_layer') or 'the pooled features'}")
    return text


def load(folder: str) -> dict[str, dict]:
    """Group name -> {"setting": text, "runs": {run name: curve}}, groups in name order."""
    groups: dict[str, dict] = {}
    for sub in sorted(p for p in Path(folder).iterdir() if p.is_dir()) if Path(folder).is_dir() else []:
        logs = sorted(sub.glob("seed*.tsv")) or ([sub / "log.tsv"] if (sub / "log.tsv").is_file() else [])
        if logs:
            c = _config(sub)
            target = f"t{c['t']}-{c['layer']}" if c.get("dra_weight") and c.get("t") is not None else None
            groups[sub.name] = {"setting": _setting(sub), "target": target,
                                "runs": {p.stem: read_curve(p) for p in logs}}
    if not groups:
        raise UserError(f"--curves {folder}: no NAME/log.tsv or NAME/seed*.tsv under it")
    return groups


def summary(curve: dict[str, list[float | None]]) -> dict[str, float]:
    """Best (first maximum) and last validation PGD, their epochs, the drop, the late training adv. accuracy."""
    pts = [(e, p, c) for e, p, c in zip(curve["epoch"], curve["val_pgd"], curve["val_clean"]) if p is not None]
    if not pts:
        raise UserError("a log has no validated epoch")
    best = max(pts, key=lambda t: (t[1], -t[0]))
    last = pts[-1]
    tail = [a for a in curve["adv_acc"][-max(1, len(curve["adv_acc"]) // 10):] if a is not None]
    out = {"best_epoch": best[0], "best_pgd": best[1], "last_epoch": last[0], "last_pgd": last[1],
           "last_clean": last[2], "drop": best[1] - last[1], "train_adv": sum(tail) / len(tail)}
    share = [v for v in curve.get("dra_grad_share", []) if v is not None]
    if share and any(w for w in curve.get("dra_weight", []) if w):
        out["dra_grad_share"] = sum(share) / len(share)
        terms = [(w * d, t) for w, d, t in zip(curve["dra_weight"], curve.get("dra", []), curve.get("loss", []))
                 if None not in (w, d, t) and t]
        out["dra_loss_share"] = sum(a / t for a, t in terms) / len(terms) if terms else None
    return out


def best_epochs(summaries: list[dict[str, float]]) -> dict[int, int]:
    """Each best validated epoch and how many seeds had it, in epoch order (seeds that share one are
    counted, not merged: a group of 5 seeds shows 5)."""
    return dict(sorted(Counter(int(x["best_epoch"]) for x in summaries).items()))


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def markdown(groups: dict[str, dict], probe: dict | None = None) -> str:
    """The table; ``probe`` (``cache probe``'s JSON): each DRA group's target set's probe accuracy and
    diagnostics (effective rank, brightness R²) beside it."""
    head = ("| runs | setting | seeds | best val. PGD (%) | at epoch | last val. PGD (%) | drop best − last (points) | "
            "train adv. acc., last 10% (%) | gap train − val. (points) |")
    summaries = {name: [summary(c) for c in g["runs"].values()] for name, g in groups.items()}
    dra = any("dra_grad_share" in x for s in summaries.values() for x in s)
    if dra:
        head += " DRA share of the backbone gradient (%) | λ·DRA share of the loss (%) |"
    diag = ((probe or {}).get("diagnostics") or {}).get("sets") or {}
    sets = {f"t{d['t']}-{d['layer']}": d for d in (probe or {}).get("sets") or [] if isinstance(d, dict) and "t" in d}
    shown = probe is not None and any(g.get("target") for g in groups.values())
    if shown:
        head += " target: effective rank | brightness R² | probe acc. (%) |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, g in groups.items():
        s = summaries[name]
        strength = ""
        if dra:
            grad = [x["dra_grad_share"] for x in s if "dra_grad_share" in x]
            loss = [x["dra_loss_share"] for x in s if x.get("dra_loss_share") is not None]
            strength = (f" {100 * _mean(grad):.1f} |" if grad else " - |") + (f" {100 * _mean(loss):.1f} |" if loss else " - |")
        drops = [x["drop"] for x in s]
        spread = f" ({100 * min(drops):.1f} to {100 * max(drops):.1f})" if len(s) > 1 else ""
        epochs = best_epochs(s)
        lines.append(f"| {name} | {g['setting'] or '-'} | {len(s)} | {100 * _mean([x['best_pgd'] for x in s]):.1f} | "
                     f"{', '.join(f'{e} (×{n})' if n > 1 else str(e) for e, n in epochs.items())} of "
                     f"{int(s[0]['last_epoch'])} | "
                     f"{100 * _mean([x['last_pgd'] for x in s]):.1f} | {100 * _mean(drops):.1f}{spread} | "
                     f"{100 * _mean([x['train_adv'] for x in s]):.1f} | "
                     f"{100 * _mean([x['train_adv'] - x['last_pgd'] for x in s]):.1f} |{strength}"
                     + (_target_cells(g.get("target"), diag, sets) if shown else ""))
    lines += ["", "Validation: the EMA model on held-out train rows (never the test set), the same images and "
                  "PGD starts at every epoch; several seeds: means (the drop's range over seeds in brackets). "
                  "Train adv. acc.: the training batches' accuracy under the training attack (TRADES: its KL "
                  "attack), in train mode." + (" DRA shares: means over the epochs of ||grad(λ·DRA)|| / "
                                               "||grad(loss)|| on the backbone and of λ·DRA / loss." if dra else "")]
    return "\n".join(lines)


def _target_cells(target: str | None, diag: dict, sets: dict) -> str:
    d, p = diag.get(target or "") or {}, sets.get(target or "") or {}
    rank, r2, acc = d.get("effective_rank"), d.get("brightness_r2"), p.get("probe_accuracy")
    return (f" {rank:.1f} |" if rank is not None else " - |") + (f" {r2:.2f} |" if r2 is not None else " - |") + \
        (f" {100 * acc:.1f} |" if acc is not None else " - |")


def axis(groups: dict[str, dict]) -> str:
    """The x axis: the optimizer step when every log has one (groups whose epochs differ in length, such
    as N = 500 and N = 1000 at one batch size, line up at equal budgets), else the epoch."""
    return "step" if all("step" in c for g in groups.values() for c in g["runs"].values()) else "epoch"


def series(groups: dict[str, dict], key: str, x: str) -> dict[str, dict[float, list[float]]]:
    """Per group, x -> the runs' values of ``key`` (%) there (blank, unvalidated rows left out)."""
    out: dict[str, dict[float, list[float]]] = {}
    for name, g in groups.items():
        pts = out.setdefault(name, {})
        for c in g["runs"].values():
            for e, v in zip(c[x], c[key]):
                if v is not None:
                    pts.setdefault(e, []).append(100 * v)
    return out


def plot(groups: dict[str, dict], path: Path) -> Path:
    from pipeline.report.plots import _checked, _save, plt

    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    x = axis(groups)
    for key, style, label in (("val_pgd", "-", "val. PGD"), ("val_clean", "--", "val. clean")):
        for i, (name, pts) in enumerate(series(groups, key, x).items()):
            colour, xs = f"C{i % 10}", sorted(pts)
            ax.plot(xs, [_mean(pts[v]) for v in xs], style, color=colour, lw=1.3, label=f"{name}: {label}")
            if len(groups[name]["runs"]) > 1:
                ax.fill_between(xs, [min(pts[v]) for v in xs], [max(pts[v]) for v in xs], color=colour,
                                alpha=0.15, lw=0)
    ax.set_xlabel("optimizer step" if x == "step" else "epoch")
    ax.set_ylabel("validation accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle("Validation during training (held-out train rows)", fontsize=10)
    fig.tight_layout()
    return _save(_checked(fig), path, 110)


def overfit_figure(groups: dict[str, dict]):  # noqa: ANN201  (a matplotlib Figure)
    """One panel per group against the epoch: the training batches' adversarial accuracy (mean over
    seeds), validation PGD (mean, the seeds' range shaded) and each seed's best validated epoch (ticks
    on the top edge); the legend is a band below the panels."""
    from pipeline.report.plots import legend_entries, plt

    cols = min(3, len(groups))
    rows = math.ceil(len(groups) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.5 * rows + 0.5), squeeze=False, sharey=True)
    train, val = series(groups, "adv_acc", "epoch"), series(groups, "val_pgd", "epoch")
    for ax, (name, g) in zip(axes.flat, groups.items()):
        xs = sorted(train[name])
        ax.plot(xs, [_mean(train[name][e]) for e in xs], color="0.55", lw=0.8, label="training batches: adv. acc.")
        xs = sorted(val[name])
        ax.plot(xs, [_mean(val[name][e]) for e in xs], color="C3", lw=1.4, label="validation PGD (mean)")
        if len(g["runs"]) > 1:
            ax.fill_between(xs, [min(val[name][e]) for e in xs], [max(val[name][e]) for e in xs], color="C3",
                            alpha=0.2, lw=0, label="validation PGD (seeds' range)")
        for e, n in best_epochs([summary(c) for c in g["runs"].values()]).items():
            ax.axvline(e, ymin=0.93, ymax=1.0, color="k", lw=1.0, label="a seed's best validated epoch (×n: n seeds)")
            if n > 1:
                ax.text(e, 0.9, f"×{n}", transform=ax.get_xaxis_transform(), fontsize=6, ha="center", va="top")
        ax.set_title(f"{name} ({len(g['runs'])} seed{'s' if len(g['runs']) > 1 else ''})", fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel("accuracy (%)", fontsize=8)
    for ax in list(axes.flat)[len(groups):]:
        ax.set_axis_off()
    legend = legend_entries(axes.flat)
    ncol = len(legend) if cols == 3 else 1  # one row under three panels, one entry a row under fewer
    band = 0.22 * math.ceil(len(legend) / ncol) + 0.08  # inches
    fig.set_figheight(fig.get_figheight() + band - 0.3)
    fig.legend(list(legend.values()), list(legend), loc="lower center", ncol=ncol, fontsize=7)
    fig.suptitle("The generalisation gap and robust overfitting:" + ("\n" if cols < 3 else " ") +
                 "training batches against held-out validation", fontsize=10)
    fig.tight_layout(rect=(0, band / fig.get_figheight(), 1, 1))
    return fig


def overfit_plot(groups: dict[str, dict], path: Path) -> Path:
    from pipeline.report.plots import _checked, _save

    return _save(_checked(overfit_figure(groups)), path, 110)
