"""AutoAttack-fast with a correctly built schedule vs the old way, on one checkpoint (issue 15).

APGD derives its step-size checkpoints from ``n_iter`` in ``__init__`` (fra31/auto-attack
``autopgd_base.py``). The old evaluation built 100-iteration attacks and then set ``n_iter = 50``,
which keeps the 100-iteration checkpoints. Same model, images and seed; writes a JSON.

    .venv/bin/python scripts/autoattack_schedule.py artifacts/train/at artifacts/shards/real/test \\
        --n 1000 --out results/autoattack_schedule/at.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.evaluate import robust  # noqa: E402
from pipeline.evaluate.config import AutoAttackVersion  # noqa: E402
from stages.evaluate import load_classifier, load_test_images  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("shards")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--eps", type=float, default=0.1)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--targets", type=int, default=3)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted

    model, cfg = load_classifier(args.checkpoint)
    x, y = load_test_images(args.shards, args.n, (cfg["in_channels"], cfg["image_size"], cfg["image_size"]),
                            cfg["num_classes"])
    logging.getLogger("auto-attack").setLevel(logging.WARNING)
    res = {"checkpoint": args.checkpoint, "n": len(y), "eps": args.eps, "iters": args.iters, "targets": args.targets}
    for way in ("built_for_iters", "old_overwritten_100"):
        aa = robust.make_autoattack(model, eps=args.eps, version=AutoAttackVersion.fast, fast_targets=args.targets,
                                    fast_iters=args.iters, seed=0)
        if way == "old_overwritten_100":
            kw = dict(norm="Linf", n_restarts=1, eps=args.eps, seed=0, eot_iter=1, rho=0.75, verbose=False,
                      device=x.device, logger=aa.logger)
            aa.apgd = APGDAttack(model, n_iter=100, **kw)
            aa.apgd_targeted = APGDAttack_targeted(model, n_iter=100, n_target_classes=args.targets, **kw)
            aa.apgd.n_iter = aa.apgd_targeted.n_iter = args.iters
        t0 = time.time()
        x_adv, _ = aa.run_standard_evaluation(x, y, batch_size=250)
        res[way] = {"accuracy": float((robust.predict(model, x_adv) == y).float().mean()),
                    "n_iter_2": aa.apgd.n_iter_2, "size_decr": aa.apgd.size_decr, "seconds": round(time.time() - t0, 1)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
