"""PNG plots of the report (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

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


def accuracy_bars(groups: dict[str, list[dict]], path: Path) -> Path:
    """Grouped bars: clean / PGD / AutoAttack accuracy per variant, error bars = std over seeds."""
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
    ax.set_ylim(0, 100)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("Accuracy per variant (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def training_curves(logs: dict[str, list[dict[str, list[float]]]], path: Path) -> Path:
    """One panel per logged quantity (each loss term, accuracies); one colour per variant.

    Seeds of one variant are drawn as separate thin lines in the same colour.
    """
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
    legend = {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(lab, h)
    if legend:
        fig.legend(list(legend.values()), list(legend), loc="upper center", ncol=len(legend), fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def paired_differences(groups: dict[str, list[dict]], pairs: list[tuple[str, str]], path: Path) -> Path | None:
    """One panel per accuracy: each (variant, base) pair's per-seed differences (dots), their mean
    and 95% Student-t interval (bar), and zero; None when no pair shares two seeds."""
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
    axes[0, -1].legend(fontsize=7, loc="lower right")
    fig.suptitle("Paired by training seed: variant minus its base", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
