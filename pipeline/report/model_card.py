"""A RobustBench model-card entry for a run evaluated with standard AutoAttack.

The fields are those of RobustBench's leaderboard JSON files (RobustBench/robustbench
``model_info/<dataset>/<threat model>/<name>.json``: link, name, authors, additional_data,
number_forward_passes, dataset, venue, architecture, eps, clean_acc, reported, autoattack_acc,
footnote, unreliable), percentages as strings with two decimals, eps as a fraction of 255 where it
is one. What the project cannot know (the paper's link, authors and venue) is left empty to fill in.
Only a standard-AutoAttack result qualifies (the leaderboard's evaluation); the number of test images
it measured is stated in the footnote (the leaderboard uses the whole test set).
"""

from __future__ import annotations

from fractions import Fraction

from pipeline.core.errors import UserError

# the registry's architectures as RobustBench's cards name them
ARCHITECTURES = {"wrn-28-10": "WideResNet-28-10", "robustbench-wrn-28-10": "WideResNet-28-10",
                 "preact-resnet18": "PreActResNet-18", "robustbench-preact-resnet18": "PreActResNet-18",
                 "wrn-16-2": "WideResNet-16-2", "resnet": "ResNet (small)", "cnn": "CNN (small)"}
DATASETS = {(3, 32, 10): "cifar10", (3, 32, 100): "cifar100", (1, 28, 10): "fashion-mnist"}


def _eps_text(eps: float) -> str:
    f = Fraction(eps * 255).limit_denominator(1000)
    return f"{f.numerator}/255" if f.denominator == 1 and abs(float(f) - eps * 255) < 1e-9 else f"{eps:g}"


def _percent(x: float) -> str:
    return f"{100 * x:.2f}"


def model_card(result: dict, path: str = "the result") -> dict:
    """The leaderboard entry of one evaluate result JSON, or one error line saying why it cannot be one."""
    if result.get("autoattack_version") != "standard" or result.get("autoattack") is None:
        raise UserError(f"{path}: evaluated with AutoAttack {result.get('autoattack_version')!r}; a RobustBench "
                        "entry needs standard AutoAttack (evaluate --autoattack standard)")
    if result.get("warnings"):
        raise UserError(f"{path}: the evaluation's checks failed ({'; '.join(result['warnings'])}); no entry")
    tc = result.get("train_config") if isinstance(result.get("train_config"), dict) else {}
    train = tc.get("train") if isinstance(tc.get("train"), dict) else {}
    zoo = tc.get("robustbench") if isinstance(tc.get("robustbench"), dict) else None
    shape = (tc.get("in_channels"), tc.get("image_size"), tc.get("num_classes"))
    dataset = zoo["dataset"] if zoo else DATASETS.get(shape, "unknown")
    arch = str(tc.get("arch", ""))
    notes = [f"Standard AutoAttack on {result.get('autoattack_n') or result['n']} test images from offset {result.get('offset', 0)} "
             "(the project's evaluation, not RobustBench's benchmark())."]
    synthetic = train.get("synthetic_fraction") or 0
    if synthetic:
        notes.append(f"It trains on diffusion-generated images ({synthetic:.0%} of each batch).")
    if train.get("dra_weight"):
        notes.append(f"Diffusion representation alignment, weight {train['dra_weight']}.")
    aa = _percent(result["autoattack"])
    return {"link": "", "name": result.get("variant", ""), "authors": "", "additional_data": False,
            "number_forward_passes": 1, "dataset": dataset, "venue": "",
            "architecture": ARCHITECTURES.get(arch, arch), "eps": _eps_text(float(result["eps"])),
            "clean_acc": _percent(result["clean"]), "reported": aa, "autoattack_acc": aa,
            "footnote": " ".join(notes), "unreliable": False}
