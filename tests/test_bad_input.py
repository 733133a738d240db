"""Bad input at the CLI: for each stage, missing or wrong-kind inputs, out-of-range numbers,
corrupted or truncated tar shards and an --out that is a file end in exactly one ``error:`` line,
exit != 0, no traceback and no partial output; prepare refuses bad sizes before reading, and a
real ``python -m pipeline`` process shows the user a one-line stderr.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from reliability_helpers import _no_training, assert_one_error_line, run_cli

from pipeline.core.errors import UserError
from pipeline.data.config import PrepareConfig
from stages import prepare

ROOT = Path(__file__).resolve().parents[1]


def _corrupt_member(split: Path) -> None:
    """Replace the PNG of sample 3 by junk and re-record the shard's sha256 (a well-formed tar
    whose checksums match, with one undecodable member)."""
    shard = split / "shard-000000.tar"
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w") as tar:
        for m, data in members:
            if m.name.endswith("0000003.png"):
                data = b"\x89PNG junk"
                m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    fp = json.loads((split / "fingerprint.json").read_text())
    fp["shards"][0]["sha256"] = hashlib.sha256(shard.read_bytes()).hexdigest()
    (split / "fingerprint.json").write_text(json.dumps(fp))


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, fmnist_shards) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("rel-bad")
    text = root / "notes.txt"
    text.write_text("not a dataset, not a model, not a store\n")
    badtar = root / "badtar"
    shutil.copytree(fmnist_shards, badtar)
    _corrupt_member(badtar / "train")
    trunc = root / "trunc"
    shutil.copytree(fmnist_shards, trunc)
    shard = trunc / "train" / "shard-000000.tar"
    shard.write_bytes(shard.read_bytes()[:5000])
    return {"text": text, "badtar": badtar, "trunc": trunc, "nope": root / "does-not-exist"}


# id -> argv template; {out} is a fresh folder that must not exist afterwards, {text} a text file
CASES = {
    "prepare/missing-source": "prepare --source {nope} --out {out}/s",
    "prepare/text-as-source": "prepare --source {text} --out {out}/s",
    "prepare/shard-size-0": "prepare --source {fmnist} --shard-size 0 --limit 8 --out {out}/s",
    "prepare/negative-limit": "prepare --limit -5 --out {out}/s",
    "prepare/out-is-a-file": "prepare --source {fmnist} --limit 8 --out {text}",
    "diffusion/text-as-shards": "diffusion --shards {text} --out {out}/m",
    "diffusion/batch-size-0": "diffusion --batch-size 0 --out {out}/m",
    "diffusion/text-as-model": "diffusion --pretrained {text} --out {out}/m",
    "diffusion/shards-as-model": "diffusion --pretrained {real}/train --out {out}/m",
    "diffusion/corrupted-tar-member": "diffusion --shards {badtar}/train --steps 1 --out {out}/m",
    "generate/negative-n": "generate --model {model} --n -5 --out {out}/g",
    "generate/guidance-nan": "generate --model {model} --guidance nan --no-check --out {out}/g",
    "generate/text-as-model": "generate --model {text} --out {out}/g",
    "generate/absurd-steps": "generate --model {model} --sample-steps 100000 --no-check --out {out}/g",
    "extract/t-negative": "extract --model {model} --real-splits {real} --synthetic '' --t -1 --out {out}/f.zarr",
    "extract/t-outside-schedule": "extract --model {model} --real-splits {real} --synthetic '' --t 100000 --out {out}/f.zarr",
    "extract/views-0": "extract --model {model} --real-splits {real} --synthetic '' --views 0 --out {out}/f.zarr",
    "extract/batch-size-negative": "extract --model {model} --real-splits {real} --synthetic '' --batch-size -1 --out {out}/f.zarr",
    "extract/unknown-layer": "extract --model {model} --real-splits {real} --synthetic '' --layer nope --out {out}/f.zarr",
    "extract/text-as-shards": "extract --model {model} --real-splits {text} --synthetic '' --out {out}/f.zarr",
    "extract/corrupted-tar-member": "extract --model {model} --real-splits {badtar} --synthetic '' --limit 64 --out {out}/f.zarr",
    "extract/truncated-tar": "extract --model {model} --real-splits {trunc} --synthetic '' --limit 64 --out {out}/f.zarr",
    "extract/view-pad-overflows-int8": "extract --model {model} --real-splits {real} --synthetic '' --view-pad 64 --out {out}/f.zarr",
    "extract/out-is-a-file": "extract --model {model} --real-splits {real} --synthetic '' --limit 16 --out {text}",
    "train/missing-cache": "train --cache {nope} --out {out}/t",
    "train/text-as-cache": "train --cache {text} --out {out}/t",
    "train/shards-as-cache": "train --cache {real} --out {out}/t",
    "train/t-negative": "train --cache {nope} --t -3 --out {out}/t",
    "train/t-not-an-integer": "train --cache {nope} --t 1,2 --out {out}/t",
    "train/batch-size-0": "train --cache {store} --batch-size 0 --out {out}/t",
    "train/batch-size-negative": "train --cache {store} --batch-size -1 --out {out}/t",
    "train/eps-negative": "train --cache {store} --eps -0.1 --out {out}/t",
    "train/no-augment-on-random-view-0": "train --cache {store} --no-augment --out {out}/t",
    "train/no-augment-with-fresh-views": "train --cache {store} --no-augment --fresh-views --dra-weight 0 --out {out}/t",
    "train/view-pad-overflows-int8": "train --cache {store} --view-pad 64 --out {out}/t",
    "train/lr-inf": "train --cache {store} --lr inf --out {out}/t",
    "train/dra-weight-inf": "train --cache {store} --dra-weight inf --out {out}/t",
    "train/trades-beta-nan": "train --cache {store} --method trades --trades-beta nan --out {out}/t",
    "train/weight-decay-nan": "train --cache {store} --weight-decay nan --out {out}/t",
    "train/momentum-1": "train --cache {store} --momentum 1 --out {out}/t",
    "train/corrupted-tar-member": "train --cache {store} --real-shards {badtar}/train --out {out}/t",
    "train/out-is-a-file": "train --cache {store} --real-limit 0 --epochs 1 --batch-size 32 --out {text}",
    "evaluate/text-as-checkpoint": "evaluate --checkpoint {text} --shards {real}/test --out {out}/e.json",
    "evaluate/store-as-checkpoint": "evaluate --checkpoint {store} --shards {real}/test --out {out}/e.json",
    "evaluate/negative-n": "evaluate --checkpoint {ckpt} --shards {real}/test --n -5 --out {out}/e.json",
    "evaluate/autoattack-n-above-n": "evaluate --checkpoint {ckpt} --shards {real}/test --n 8 --autoattack-n 9 --out {out}/e.json",
    "evaluate/eps-negative": "evaluate --checkpoint {ckpt} --shards {real}/test --eps -0.1 --out {out}/e.json",
    "evaluate/pgd-step-size-nan": "evaluate --checkpoint {ckpt} --shards {real}/test --pgd-step-size nan --out {out}/e.json",
    "diffusion/lr-nan": "diffusion --lr nan --out {out}/m",
    "evaluate/corrupted-tar-member": ("evaluate --checkpoint {ckpt} --shards {badtar}/train --n 8 "
                                      "--autoattack none --out {out}/e.json"),
    "evaluate/out-is-a-folder": "evaluate --checkpoint {ckpt} --shards {real}/test --out {real}",
    "report/missing-evals": "report --evals {nope} --out {out}/r",
    "cache-info/text": "cache info {text}",
    "cache-verify/missing": "cache verify {nope}",
    "bench/n-0": "bench --n 0 --out {out}/b.json",
    "cli/not-an-integer": "train --batch-size abc --out {out}/t",
    "train/seed-negative": "train --cache {store} --seed -1 --real-limit 0 --epochs 1 --out {out}/t",
    "train/head-hidden-1e9": "train --cache {store} --head-hidden 1000000000 --dra-weight 0.1 --out {out}/t",
    "diffusion/seed-negative": "diffusion --shards {real}/train --seed -1 --out {out}/m",
    "generate/seed-negative": "generate --model {model} --seed -1 --no-check --out {out}/g",
    "extract/seed-negative": "extract --model {model} --real-splits {real} --synthetic '' --seed -1 --out {out}/f.zarr",
    "evaluate/seed-negative": "evaluate --checkpoint {ckpt} --shards {real}/test --seed -1 --out {out}/e.json",
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_one_line_and_no_output(case, bad_inputs, fmnist_dir, fmnist_shards, model_dir, store,
                                          checkpoint, tmp_path, capsys):
    import shlex

    out = tmp_path / "out"
    paths = {**bad_inputs, "fmnist": fmnist_dir, "real": fmnist_shards, "model": model_dir, "store": store, "ckpt": checkpoint,
             "out": out}
    before = {p: p.read_bytes() for p in [bad_inputs["text"]]}
    real_listing = sorted(p.name for p in (fmnist_shards).rglob("*"))
    argv = shlex.split(CASES[case].format(**paths))
    code, _, err = run_cli(capsys, argv)
    assert_one_error_line(code, err)
    assert not out.exists(), sorted(out.rglob("*"))  # no partial output at all
    assert {p: p.read_bytes() for p in before} == before  # an input given as --out is untouched
    assert sorted(p.name for p in fmnist_shards.rglob("*")) == real_listing


def test_prepare_refuses_bad_sizes_before_reading(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare, "open_rows", _no_training)
    a_file = tmp_path / "f"
    a_file.write_text("x")
    for kw in ({"shard_size": 0}, {"shard_size": -3}, {"limit": -1}, {"out": str(a_file)}):
        with pytest.raises(UserError):
            prepare.run(PrepareConfig(**{"out": str(tmp_path / "o"), **kw}))
    assert not (tmp_path / "o").exists()


def test_bad_input_in_a_real_process(model_dir, fmnist_shards, tmp_path):
    """One extract refusal through `python -m pipeline`: the stderr a user sees is one line."""
    proc = subprocess.run([sys.executable, "-m", "pipeline", "extract", "--model", str(model_dir),
                           "--real-splits", str(fmnist_shards), "--synthetic", "", "--t", "5000",
                           "--out", str(tmp_path / "f.zarr")], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: timestep t=5000"), proc.stderr
    assert not (tmp_path / "f.zarr").exists()

