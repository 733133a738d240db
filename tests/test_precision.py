"""What depends on the processor, tested both ways on every machine.

The one probe is ``pipeline.core.runtime.cpu_has_native_bf16`` (AVX512-BF16 / AMX, as oneDNN
reports it). Every capability-dependent branch (bf16 autocast in diffusion training and in
sampling, the precision recorded in ``model_info.json`` and ``generate.json``) goes through it, so
forcing it here runs the bf16 path on a machine without native bf16 (emulated: slow, hence toy
sizes) and the fp32 path on a machine with it. No test asks the machine what it offers.
The extractor has no such branch: it computes in float32 whatever autocast surrounds it
(``test_extract.py::test_extractor_computes_in_float32_under_autocast``).
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.core import runtime
from pipeline.core.runtime import bf16_autocast, cpu_model, precision
from pipeline.core.shards import read_split
from pipeline.diffusion.config import DiffusionConfig
from pipeline.diffusion.model import load_model
from pipeline.generate.config import GenerateConfig
from pipeline.generate.sampling import sample
from stages import diffusion, generate

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(params=[True, False], ids=["native-bf16", "no-bf16"])
def native_bf16(request, monkeypatch) -> bool:
    """The probe forced to the parameter for the test's duration."""
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: request.param)
    return request.param


def test_the_rule_follows_the_config_and_the_probe(native_bf16):
    assert bf16_autocast("cpu") is native_bf16 and bf16_autocast(torch.device("cpu")) is native_bf16
    assert bf16_autocast("cuda") and bf16_autocast("cuda:1")  # GPUs always (no probe asked)
    assert precision(True, "cpu") == ("bf16" if native_bf16 else "fp32")
    assert precision(False, "cpu") == "fp32" and precision(False, "cuda") == "fp32"
    assert precision(True, "cuda") == "bf16"


@pytest.mark.parametrize("answer", [True, False])
def test_the_probe_reads_onednn_and_a_torch_without_it_means_fp32(monkeypatch, answer):
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: answer)
    assert runtime.cpu_has_native_bf16() is answer

    def broken():
        raise RuntimeError("no such op")

    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", broken)
    assert runtime.cpu_has_native_bf16() is False


def diffusion_cfg(shards: Path, out: Path, bf16: bool) -> DiffusionConfig:
    return DiffusionConfig(shards=str(shards / "train"), out=str(out), limit=32, steps=2, batch_size=8,
                           block_channels=(8, 16), lr=1e-3, warmup_steps=1, checkpoint_every=0, bf16=bf16)


def test_diffusion_runs_and_records_what_the_processor_allows(native_bf16, fmnist_shards, tmp_path):
    asked = diffusion.run(diffusion_cfg(fmnist_shards, tmp_path / "asked", bf16=True))
    fp32 = diffusion.run(diffusion_cfg(fmnist_shards, tmp_path / "fp32", bf16=False))
    assert asked["precision"] == ("bf16" if native_bf16 else "fp32") and fp32["precision"] == "fp32"
    saved = json.loads((tmp_path / "asked" / "model_info.json").read_text())
    assert saved["precision"] == asked["precision"] and saved["cpu"] == cpu_model()
    # the branch is real: bf16 autocast trains other weights than fp32, and only when it ran
    assert (asked["weights_sha256"] != fp32["weights_sha256"]) is native_bf16


def test_generate_samples_and_records_what_the_processor_allows(native_bf16, tiny_model_dir, fmnist_shards,
                                                                 tmp_path):
    cfg = GenerateConfig(model=str(tiny_model_dir), real_train=str(fmnist_shards / "train"),
                         real_test=str(fmnist_shards / "test"), out=str(tmp_path / "asked"), n=8,
                         sample_steps=2, batch_size=8, shard_size=8, bf16=True, check=False, seed=3)
    generate.run(cfg)
    generate.run(replace(cfg, out=str(tmp_path / "fp32"), bf16=False))
    asked = json.loads((tmp_path / "asked" / "generate.json").read_text())
    fp32 = json.loads((tmp_path / "fp32" / "generate.json").read_text())
    assert asked["precision"] == ("bf16" if native_bf16 else "fp32") and fp32["precision"] == "fp32"
    assert asked["cpu"] == cpu_model()
    a, b = read_split(tmp_path / "asked" / "train"), read_split(tmp_path / "fp32" / "train")
    assert np.array_equal(a.labels, b.labels)
    assert (not np.array_equal(a.images, b.images)) is native_bf16


def test_sampling_autocasts_only_where_the_rule_says(native_bf16, tiny_model_dir):
    m = load_model(str(tiny_model_dir))
    y = torch.arange(4)
    kw = dict(seed=5, steps=2)
    asked, fp32 = sample(m, range(4), y, bf16=True, **kw), sample(m, range(4), y, bf16=False, **kw)
    assert (not np.array_equal(asked, fp32)) is native_bf16


ZEN4 = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC 9R14
flags\t\t: fpu avx512f avx512_bf16
processor\t: 1
model name\t: something else
"""


def test_cpu_model_names_family_and_model_and_falls_back(tmp_path):
    (tmp_path / "zen4").write_text(ZEN4)
    assert cpu_model(tmp_path / "zen4") == "AMD EPYC 9R14 (family 25 model 17)"  # the first processor's
    (tmp_path / "bare").write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\n")  # no model name
    fallback = cpu_model(tmp_path / "bare")
    assert fallback and fallback == cpu_model(tmp_path / "missing")


def test_one_probe_and_no_test_asks_the_machine():
    """Only core/runtime.py reads what the processor offers; tests force it instead of asking."""
    probes = re.compile(r"_is_mkldnn_bf16_supported|/proc/cpuinfo|sched_getaffinity|os\.cpu_count")
    for folder in ("pipeline", "stages", "scripts"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path != ROOT / "pipeline" / "core" / "runtime.py":
                assert not probes.search(path.read_text()), f"{path.relative_to(ROOT)} asks the machine itself"
    asks = re.compile(r"\b(bf16_autocast|cpu_has_native_bf16)\(")
    for path in sorted((ROOT / "tests").glob("*.py")):
        if path.name != "test_precision.py":
            assert not asks.search(path.read_text()), f"{path.name} asks the machine instead of forcing the probe"
