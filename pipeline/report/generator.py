"""The generator's quality table: one row per `generate` setting, from the `generate.json` each wrote
(committed under results/generator/NAME/generate.json). The measures are generate's own
(pipeline/generate/quality.py); this module only checks and lays them out, so the table that
justifies the default generator settings is data, never typed by hand."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.core.errors import UserError

NEEDED = ("agreement", "quality", "config", "images_per_second", "weights_sha256", "classifier_test_accuracy")


def load(folder: str) -> list[tuple[str, dict]]:
    """(setting name, generate.json) for every FOLDER/NAME/generate.json, by name."""
    rows = []
    for path in sorted(Path(folder).glob("*/generate.json")):
        try:
            report = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise UserError(f"{path}: not a readable JSON file ({type(exc).__name__})") from None
        missing = [k for k in NEEDED if k not in report] if isinstance(report, dict) else list(NEEDED)
        if missing or "frechet_distance" not in report["quality"]:
            raise UserError(f"{path}: not a generate.json with the quality report (missing "
                            f"{', '.join(missing) or 'quality.frechet_distance'}); run generate with --check")
        rows.append((path.parent.name, report))
    if not rows:
        raise UserError(f"{folder}: no */generate.json")
    accuracies = {r["classifier_test_accuracy"] for _, r in rows}
    if len(accuracies) > 1 or len({r["quality"]["n"] for _, r in rows}) > 1:
        raise UserError(f"{folder}: the settings were measured with different reference classifiers or sample "
                        "sizes (test accuracy, quality n): their distances do not compare")
    return rows


def markdown(rows: list[tuple[str, dict]]) -> str:
    """The table, then one line saying what the reference classifier is and what the floors mean."""
    head = ("| setting | model steps | sampler | guidance | filter | agreement | kept | Frechet distance | "
            "precision | recall | images/s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, r in rows:
        c, q = r["config"], r["quality"]
        steps = r.get("model_training_steps")
        lines.append(f"| {name} | {steps if steps is not None else '?'} ({r['weights_sha256'][:8]}) | "
                     f"{c.get('sampler')} x{c.get('sample_steps')} | {c.get('guidance')} | {r.get('filter', 'none')} | "
                     f"{r['agreement']:.3f} | {r.get('kept_fraction', 1.0):.3f} | {q['frechet_distance']:.2f} | "
                     f"{q['precision']:.3f} | {q['recall']:.3f} | {r['images_per_second']:.2f} |")
    first = rows[0][1]
    q = first["quality"]
    lines += ["", f"Reference classifier: {first.get('classifier', '?')}; real test accuracy "
                  f"{first['classifier_test_accuracy']:.4f}. Agreement: the share of every candidate drawn that it "
                  "assigns to the intended class (before any filter); kept: the share of candidates kept. Frechet "
                  f"distance and precision/recall (k = {q['k']}) in its penultimate features on {q['n']} images a "
                  f"side (not Inception FID); two disjoint real test samples score {q['frechet_distance_real_vs_real']:.2f}, "
                  f"{q['precision_real_vs_real']:.3f}, {q['recall_real_vs_real']:.3f}: the floor at this sample size."]
    return "\n".join(lines)
