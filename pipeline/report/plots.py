"""PNG plots of the report (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
from matplotlib.figure import Figure  # noqa: E402

X_KEYS = ("epoch", "step", "iter")
SKIP = ("lr", "dra_weight", "step_time_s", "seconds")  # bookkeeping, not curves of the method
METRICS = (("clean", "clean"), ("pgd", "PGD"), ("autoattack", "AutoAttack"))


def _mean_std(values: list[float]) -> tuple[float, float]:
    vals = [v for v in values if v is not None]
    if not vals:
        return math.nan, 0.0
    mean = sum(vals) / len(vals)
    std = (sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5 if len(vals) > 1 else 0.0
    return mean, std


def _save(fig: Figure, path: Path, dpi: int) -> Path:
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def covered(fig: Figure) -> list[str]:
    """Legends that overlap the plotting area of an axes (where the values are) or leave the figure;
    empty when every legend sits clear of them. Every plot of the report is checked when drawn."""
    renderer = fig.canvas.get_renderer()
    legends = list(fig.legends) + [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    frame = fig.bbox
    bad = []
    for legend in legends:
        box = legend.get_window_extent(renderer)
        title = legend.get_texts()[0].get_text() if legend.get_texts() else "legend"
        if any(box.overlaps(ax.get_window_extent(renderer)) for ax in fig.axes if ax.axison):
            bad.append(f"{title}: over an axes")
        if box.x0 < frame.x0 - 1 or box.y0 < frame.y0 - 1 or box.x1 > frame.x1 + 1 or box.y1 > frame.y1 + 1:
            bad.append(f"{title}: outside the figure")
    return bad


def legend_entries(axes) -> dict:  # noqa: ANN001 (matplotlib Axes)
    """Label -> handle over every axes, each label once (its first handle): one figure legend for
    panels that share their series."""
    legend: dict = {}
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(lab, h)
    return legend


def _checked(fig: Figure) -> Figure:
    """The figure, after a note on stdout for any legend that ``covered`` finds (the tests hold
    every plot to none; a note, not an error: a crowded legend is no reason to lose the report)."""
    fig.canvas.draw()
    for problem in covered(fig):
        print(f"note: {fig.texts[0].get_text() if fig.texts else 'a plot'}: legend {problem}")
    return fig


def accuracy_bars(groups: dict[str, list[dict]], path: Path) -> Path:
    """Grouped bars: clean / PGD / AutoAttack accuracy per variant, error bars = std over seeds."""
    return _save(accuracy_figure(groups), path, 110)


def accuracy_figure(groups: dict[str, list[dict]]) -> Figure:
    """The figure of ``accuracy_bars``; its legend sits right of the axes, clear of the bars."""
    names = list(groups)
    width = 0.8 / len(METRICS)
    version = next(iter(groups.values()))[0].get("autoattack_version")
    labels = {"autoattack": f"AutoAttack-{version}" if version else "AutoAttack"}
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(names) + 2), 3.6))
    for j, (key, label) in enumerate(METRICS):
        stats = [_mean_std([r.get(key) for r in groups[n]]) for n in names]
        xs = [i + (j - 1) * width for i in range(len(names))]
        bars = ax.bar(xs, [100 * m for m, _ in stats], width, yerr=[100 * s for _, s in stats],
                      label=labels.get(key, label), capsize=3)
        ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=2)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 105)  # room for the labels of bars near 100
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0, fontsize=8)
    ax.set_title("Accuracy per variant (mean ± std over seeds)")
    fig.tight_layout()
    return _checked(fig)


def training_curves(logs: dict[str, list[dict[str, list[float]]]], path: Path) -> Path:
    """One panel per logged quantity (each loss term, accuracies); one colour per variant.

    Seeds of one variant are drawn as separate thin lines in the same colour.
    """
    return _save(curves_figure(logs), path, 100)


def curves_figure(logs: dict[str, list[dict[str, list[float]]]]) -> Figure:
    """The figure of ``training_curves``; its legend is a band above the panels."""
    keys = sorted({k for runs in logs.values() for log in runs for k in log if k not in X_KEYS + SKIP})
    cols = min(3, max(1, len(keys)))
    rows = max(1, math.ceil(len(keys) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.8 * rows), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, key in zip(axes.flat, keys):
        for i, (name, runs) in enumerate(logs.items()):
            for s, log in enumerate(runs):
                if key not in log:
                    continue
                xkey = next((k for k in X_KEYS if k in log), None)
                xs = log[xkey] if xkey else list(range(1, len(log[key]) + 1))
                ax.plot(xs, log[key], color=colours[i % len(colours)], lw=1.2, marker="o", ms=3,
                        label=name if s == 0 else None)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel(next((k for k in X_KEYS if any(k in log for r in logs.values() for log in r)), "row"),
                      fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    legend = legend_entries(axes.flat)
    ncol = min(len(legend), 4)
    band = (0.28 * math.ceil(len(legend) / max(ncol, 1)) + 0.1) / fig.get_figheight()  # figure fraction
    if legend:
        fig.legend(list(legend.values()), list(legend), loc="upper center", ncol=ncol, fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 1 - band))
    return _checked(fig)


def paired_differences(groups: dict[str, list[dict]], pairs: list[tuple[str, str]], path: Path) -> Path | None:
    """One panel per accuracy: each (variant, base) pair's per-seed differences (dots), their mean
    and 95% Student-t interval (bar), and zero; None when no pair shares two seeds."""
    fig = differences_figure(groups, pairs)
    return None if fig is None else _save(fig, path, 110)


def differences_figure(groups: dict[str, list[dict]], pairs: list[tuple[str, str]]) -> Figure | None:
    """The figure of ``paired_differences``; its legend is a band below the panels."""
    from pipeline.report.tables import metric_keys, paired_difference, paired_values

    keys = metric_keys(groups, pairs)
    shown = [(n, b) for n, b in pairs if any(len(paired_values(groups, n, b, k)) >= 2 for k in keys)]
    if not shown:
        return None
    version = next(iter(groups.values()))[0].get("autoattack_version")
    labels = dict(METRICS) | ({"autoattack": f"AutoAttack-{version}"} if version else {})
    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 0.9 * len(shown) + 1.6), squeeze=False,
                             sharey=True)
    for ax, key in zip(axes.flat, keys):
        for i, (name, base) in enumerate(shown):
            values = paired_values(groups, name, base, key)
            if len(values) < 2:
                continue
            diffs = [100 * (a - b) for a, b in values]
            mean, lo, hi = (100 * v for v in paired_difference(*zip(*values)))
            ax.errorbar([mean], [i], xerr=[[mean - lo], [hi - mean]], fmt="D", color="black", capsize=4, ms=5,
                        label="mean, 95% CI" if i == 0 else None)
            ax.scatter(diffs, [i + 0.18] * len(diffs), s=14, alpha=0.7, color="tab:blue",
                       label="one seed" if i == 0 else None)
        ax.axvline(0, color="grey", lw=0.8, ls="--")
        ax.set_title(f"Δ {labels[key]} (points)", fontsize=9)
        ax.tick_params(labelsize=7)
    axes[0, 0].set_yticks(range(len(shown)), [f"{n} − {b}" for n, b in shown], fontsize=8)
    axes[0, 0].set_ylim(-0.6, len(shown) - 0.4)
    axes[0, 0].invert_yaxis()
    legend = legend_entries(axes.flat)
    fig.legend(list(legend.values()), list(legend), loc="lower center", ncol=max(len(legend), 1), fontsize=7)
    fig.suptitle("Paired by training seed: variant minus its base", fontsize=10)
    fig.tight_layout(rect=(0, 0.4 / fig.get_figheight(), 1, 1))
    return _checked(fig)
