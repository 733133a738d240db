"""Defaults of `evaluate`."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from pipeline.core.config import coerce_enums, require


class AutoAttackVersion(str, Enum):
    """Which AutoAttack runs (pipeline/evaluate/robust.py documents the subsets)."""

    standard = "standard"  # apgd-ce, apgd-t, fab-t, square: the reference evaluation
    fast = "fast"  # apgd-ce (1 restart) + apgd-t (fast_targets classes): a cheaper CPU subset
    none = "none"  # no AutoAttack (clean and PGD only)


@dataclass(frozen=True)
class EvaluateConfig:
    checkpoint: str = "artifacts/train/default"  # a `train` run folder (its EMA classifier)
    # instead of a run: a RobustBench model-zoo entry by name, read by RobustBench's loader from
    # MODEL_DIR/DATASET/THREAT_MODEL/NAME.pt (never downloaded); needs the .venv-rb environment
    robustbench: str = ""
    dataset: str = "cifar10"  # the zoo of --robustbench: cifar10 | cifar100
    threat_model: str = "Linf"  # the zoo of --robustbench (Linf: what evaluate attacks in)
    model_dir: str = "models/robustbench"  # RobustBench's model folder for --robustbench
    shards: str = "artifacts/shards/real/test"  # the images: a split's shard folder
    out: str = "artifacts/eval/default.json"  # the full result (attacks, checks, timings)
    metrics: str = ""  # flat {clean, pgd, autoattack} JSON for `dvc metrics`; "": OUT with .metrics.json
    name: str = ""  # variant label recorded in the result; "": the checkpoint folder's name
    n: int = 1000  # N images of the shards, from --offset on
    # first image evaluated: a validation slice of the train split (for tuning) starts past every row
    # the checkpoint trained on (an overlapping slice is refused); the test split is read from 0
    offset: int = 0
    eps: float = 0.0  # Linf budget, a number or a fraction (8/255); 0: the eps the checkpoint was trained at
    pgd_steps: int = 20  # iterations of each PGD-CE restart
    pgd_restarts: int = 2  # random restarts (a point counts as robust only if it survives all)
    pgd_step_size: float = 0.0  # PGD step size (0: 2.5 * eps / steps, Madry et al.)
    autoattack: AutoAttackVersion = AutoAttackVersion.fast  # which AutoAttack runs after PGD
    # AutoAttack on the first M of the N images (0: all N), the cheaper half of "PGD on many, AutoAttack on
    # fewer"; clean and PGD accuracy stay over all N, and the AutoAttack <= PGD check compares the same M
    autoattack_n: int = 0  # images AutoAttack attacks: the first M of --n (0: all of them)
    fast_targets: int = 3  # target classes of apgd-t in the fast subset (standard: 9)
    fast_iters: int = 50  # iterations of each APGD attack in the fast subset (standard: 100); the profiles' 50
    check_n: int = 100  # images used by the model checks and the large-eps check
    batch_size: int = 250  # images attacked at once
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 0  # PGD random starts and AutoAttack's seed

    def __post_init__(self) -> None:
        coerce_enums(self)

    def validate(self) -> None:
        require(self, [
            (self.n > 0, f"--n must be positive, got {self.n}"),
            (self.offset >= 0, f"--offset must be >= 0, got {self.offset}"),
            (0 <= self.autoattack_n <= self.n, f"--autoattack-n must be in [0, --n = {self.n}], got {self.autoattack_n}"),
            (0 <= self.eps <= 1, f"--eps must be in [0, 1] (images are in [0, 1]; 0: the eps the checkpoint was trained at), got {self.eps}"),
            (self.pgd_steps >= 1 and self.pgd_restarts >= 1, "--pgd-steps and --pgd-restarts must be >= 1"),
            (self.pgd_step_size >= 0 and min(self.batch_size, self.check_n, self.fast_targets, self.fast_iters) >= 1,
             "--pgd-step-size must be >= 0; --batch-size, --check-n, --fast-targets, --fast-iters >= 1"),
            (self.device in ("auto", "cpu") or self.device.startswith("cuda"),
             f"--device must be auto, cpu or cuda[:N], got {self.device!r}")])
