"""Nothing loaded from a file runs code: an AST scan of pipeline/ and stages/ for pickle, unsafe
torch.load/np.load/yaml.load, eval/exec and trust_remote_code (with the one restricted unpickler
allowed), and malicious pickles planted in checkpoint, resume-state and diffusion-model folders
that are ignored or refused without running.
"""

from __future__ import annotations

import ast
import os
import shutil
from pathlib import Path

import pytest
import torch
from reliability_helpers import train_cfg

from pipeline.classifiers.zoo import build_classifier, load_classifier, save_checkpoint
from pipeline.core.errors import UserError
from pipeline.diffusion.model import load_model
from stages import train

ROOT = Path(__file__).resolve().parents[1]


# the one documented exception: CIFAR's python batches are pickles, read by an unpickler that
# admits numpy arrays only (pipeline/data/sources.py; tests/test_prepare.py::test_cifar_pickle_cannot_run_code)
RESTRICTED_UNPICKLERS = {("pipeline/data/sources.py", "_NumpyOnlyUnpickler")}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _kw(call: ast.Call, name: str) -> ast.AST | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _true(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def unsafe_loads(source: str, filename: str) -> list[str]:
    """Calls that can run code from a file: pickle and friends, torch.load without
    weights_only=True, np.load(allow_pickle=True), eval/exec, yaml.load without a safe loader,
    trust_remote_code=True. Restricted unpicklers must override find_class and be listed."""
    found = []
    for node in ast.walk(ast.parse(source)):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.ClassDef):
            bases = {_dotted(b) for b in node.bases}
            if bases & {"pickle.Unpickler", "Unpickler", "_pickle.Unpickler"}:
                overrides = any(isinstance(f, ast.FunctionDef) and f.name == "find_class" for f in node.body)
                if (filename, node.name) not in RESTRICTED_UNPICKLERS or not overrides:
                    found.append(f"{where}: unpickler {node.name}")
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        if name in {"pickle.load", "pickle.loads", "pickle.Unpickler", "_pickle.loads", "cPickle.loads",
                    "dill.load", "dill.loads", "joblib.load", "marshal.load", "marshal.loads", "shelve.open",
                    "yaml.unsafe_load", "yaml.full_load", "torch.jit.load", "eval", "exec"}:
            found.append(f"{where}: {name}")
        elif name == "torch.load" and not _true(_kw(node, "weights_only")):
            found.append(f"{where}: torch.load without weights_only=True")
        elif name in {"np.load", "numpy.load"} and _true(_kw(node, "allow_pickle")):
            found.append(f"{where}: {name}(allow_pickle=True)")
        elif name == "yaml.load" and "Safe" not in _dotted(_kw(node, "Loader") or ast.Name("")):
            found.append(f"{where}: yaml.load without SafeLoader")
        if _true(_kw(node, "trust_remote_code")):
            found.append(f"{where}: trust_remote_code=True")
    return found


def test_scanner_catches_each_unsafe_pattern():
    bad = """
import pickle, torch, numpy as np, yaml
pickle.loads(b"")
torch.load("x")
torch.load("x", weights_only=False)
np.load("x", allow_pickle=True)
eval("1")
exec("1")
yaml.load(s)
yaml.load(s, Loader=yaml.Loader)
M.from_pretrained("x", trust_remote_code=True)
class U(pickle.Unpickler):
    pass
"""
    assert len(unsafe_loads(bad, "pipeline/x.py")) == 10
    ok = """
import torch, numpy as np, yaml
torch.load("x", weights_only=True)
np.load("x", allow_pickle=False)
yaml.load(s, Loader=yaml.SafeLoader)
yaml.safe_load(s)
model.eval()
"""
    assert unsafe_loads(ok, "pipeline/x.py") == []


def test_no_code_runs_from_loaded_files_in_the_source():
    files = sorted([*ROOT.glob("pipeline/*.py"), *ROOT.glob("stages/*.py")])
    assert len(files) > 10
    found = [f for p in files for f in unsafe_loads(p.read_text(), str(p.relative_to(ROOT)))]
    assert found == [], found


class _Evil:
    """Pickles to a call of os.mkdir(marker): loading it with plain pickle creates the folder."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def _evil_file(path: Path, marker: Path) -> None:
    probe = path.with_name("probe.pt")
    torch.save({"weight": _Evil(marker)}, probe)
    # the file really is dangerous: an unrestricted load runs the call (then we undo it)
    torch.load(probe, weights_only=False)
    assert marker.is_dir()
    marker.rmdir()
    probe.rename(path)


def test_checkpoint_folder_pickles_are_ignored_or_refused(tmp_path):
    marker = tmp_path / "pwned"
    folder = tmp_path / "ckpt"
    save_checkpoint(folder, build_classifier("cnn", 1, 10, 28),
                    {"arch": "cnn", "in_channels": 1, "num_classes": 10, "image_size": 28})
    for name in ("model.pt", "pytorch_model.bin", "state.pt", "optimizer.pt"):
        _evil_file(folder / name, marker)
    load_classifier(folder)  # pickles beside the safetensors weights are never opened
    assert not marker.exists()
    _evil_file(folder / "model.safetensors", marker)  # a pickle under the weights' name
    with pytest.raises(UserError, match="cannot load checkpoint"):
        load_classifier(folder)
    assert not marker.exists()


def test_resume_state_that_is_a_pickle_is_refused(store, tmp_path):
    marker = tmp_path / "pwned"
    out = tmp_path / "run"
    out.mkdir()
    _evil_file(out / "state.safetensors", marker)
    with pytest.raises(UserError, match="unreadable checkpoint"):
        train.run(train_cfg(store, out, resume=True))
    assert not marker.exists()


def test_diffusion_model_folder_pickles_do_not_run(model_dir, tmp_path):
    marker = tmp_path / "pwned"
    # a pickle beside our safetensors weights: ignored
    beside = tmp_path / "beside"
    shutil.copytree(model_dir, beside)
    _evil_file(beside / "unet" / "diffusion_pytorch_model.bin", marker)
    load_model(str(beside))
    assert not marker.exists()
    # pickle-only weights (the old diffusers .bin layout): torch.load(weights_only=True) refuses
    only = tmp_path / "only"
    shutil.copytree(model_dir, only)
    (only / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    (only / "model_info.json").unlink()  # no recorded sha256 to trip over first
    _evil_file(only / "unet" / "diffusion_pytorch_model.bin", marker)
    with pytest.raises(UserError):
        load_model(str(only))
    assert not marker.exists()
