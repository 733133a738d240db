"""The DVC pipeline end to end: dvc.yaml's code deps are exact, and the quick profile runs.

The quick profile (tests/quick_params.yaml) is the same dvc.yaml at toy size. It runs with
`dvc repro` in a temporary git repository holding a copy of the code and of real Fashion-MNIST,
after a first `dvc repro` that is interrupted (SIGINT to its process group, as Ctrl-C in a terminal)
while a variant trains, then checks: the interrupted run exited non-zero and the next finished the
work; the report has the four variants, the metrics JSONs are sane, a second `dvc repro`
does nothing, and changing only the DRA weight makes only the DRA trainings, their evaluations
and the report stale, never extraction.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from stage_deps import command, stage_files  # tests/ is on sys.path (rootdir conftest)

from pipeline.report.sweep import best_cell

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ["AT", "AT+DRA", "DM-AT", "DM-AT+DRA"]


def _stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def _code_deps(stage: dict) -> list[str]:
    body = stage.get("do", stage)
    return sorted(d for d in body["deps"] if isinstance(d, str) and d.startswith(("pipeline/", "stages/")))


@pytest.mark.parametrize("name", list(_stages()))
def test_dvc_deps_are_exactly_the_imported_code(name):
    assert _code_deps(_stages()[name]) == stage_files(command(name)), \
        f"dvc.yaml stage {name}: code deps differ from `python tests/stage_deps.py {name}`"


def test_every_stage_calls_the_one_cli_with_params():
    for name, stage in _stages().items():
        cmd = stage.get("do", stage)["cmd"]
        assert cmd.startswith(f"python -m pipeline {command(name)} "), name
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    runs = params["runs"]
    assert [r["variant"] for r in runs.values()] == VARIANTS
    shared = {k for r in runs.values() for k in r} - {"variant", "dra_weight", "synthetic_fraction", "seed"}
    assert not shared, "variants may differ only in dra_weight, synthetic_fraction and seed"


@pytest.mark.results
def test_study_profile_pairs_five_seeds_of_each_variant_with_the_sweeps_choice(tmp_path):
    """The study: 4 variants x seeds 0-4 of one budget, at least 20k real images x 8 epochs, 5000 test
    images; DRA's t, layer and weight are the best validation cell of the committed sweep."""
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    shutil.copy(ROOT / "pipeline" / "params" / "study.yaml", tmp_path / "params.yaml")
    _dvc(tmp_path, "init", "-q", "--no-scm")
    names = [line.split()[0] for line in _dvc(tmp_path, "stage", "list").splitlines()]
    trains = [n for n in names if n.startswith("train@")]
    assert len(trains) == 20 and "evaluate@dmat_dra-s4" in names
    profile = yaml.safe_load((tmp_path / "params.yaml").read_text())
    runs = profile["runs"]
    seeds = {v: sorted(r["seed"] for r in runs.values() if r["variant"] == v) for v in VARIANTS}
    assert seeds == {v: [0, 1, 2, 3, 4] for v in VARIANTS}
    assert profile["train"]["real_limit"] >= 20000 and profile["train"]["epochs"] >= 8
    assert profile["evaluate"]["n"] >= 5000 and profile["extract"]["limit"] >= profile["train"]["real_limit"]
    best = best_cell(json.loads((ROOT / "results" / "sweep" / "runs.json").read_text()))
    dra = {r["dra_weight"] for r in runs.values()} - {0.0}
    assert (str(profile["extract"]["t"]), profile["extract"]["layer"], dra) == \
        (str(best["t"]), best["layer"], {best["dra_weight"]})
    # the default pipeline adopts the study's setting, and its store holds that target set
    default = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert (default["train"]["t"], default["train"]["layer"]) == (best["t"], best["layer"])
    assert {r["dra_weight"] for r in default["runs"].values()} - {0.0} == {best["dra_weight"]}
    assert str(best["t"]) in str(default["extract"]["t"]).split(",") and best["layer"] in default["extract"]["layer"].split(",")


@pytest.mark.results
def test_the_default_budget_over_seeds_pairs_at_and_dmat_on_one_upstream():
    """results/default-seeds: seeds 0-4 of AT and DM-AT at the default profile's budget, one code
    commit, one cache (so one diffusion model and synthetic set), the committed generator's weights."""
    runs = [json.loads(p.read_text()) for p in (ROOT / "results" / "default-seeds").glob("*/seed*.json")]
    by = {(r["variant"], r["train_config"]["train"]["seed"]) for r in runs}
    assert len(by) == len(runs) == 10 and by == {(v, s) for v in ("AT", "DM-AT") for s in range(5)}
    assert len({r["study"]["code_commit"] for r in runs}) == 1
    assert len({r["train_config"]["cache"]["digest"] for r in runs}) == 1
    assert len({(r["train_metrics"]["budget"]["steps"], r["train_metrics"]["budget"]["samples"]) for r in runs}) == 1
    upstream = json.loads((ROOT / "results" / "default-seeds-upstream" / "generate.json").read_text())
    model = json.loads((ROOT / "models" / "fmnist-ddpm-3000" / "model_info.json").read_text())
    assert upstream["weights_sha256"] == model["weights_sha256"] and upstream["config"]["guidance"] == 2.0


@pytest.mark.results
def test_the_committed_study_is_complete_and_pairs_never_cross_upstreams():
    """results/study holds seeds 0-4 of every variant at one budget, from one code commit, evaluated
    on 5000 test images, with the sweep's target set; each DRA variant and its base share the cache
    (and so the diffusion model and synthetic set) of every seed: a paired difference compares like
    with like even where pieces ran on other machines."""
    runs = {p: json.loads(p.read_text()) for p in (ROOT / "results" / "study").glob("*/seed*.json")}
    by = {(r["variant"], r["train_config"]["train"]["seed"]): r
          for r in runs.values()}
    assert len(by) == len(runs) == 20 and {s for _, s in by} == {0, 1, 2, 3, 4}
    assert {v for v, _ in by} == set(VARIANTS)
    assert len({(r["train_metrics"]["budget"]["steps"], r["train_metrics"]["budget"]["samples"])
                for r in runs.values()}) == 1
    assert {r["study"]["code_commit"] for r in runs.values()} == {next(iter(runs.values()))["study"]["code_commit"]}
    assert {r["n"] for r in runs.values()} == {5000} and all(not r["warnings"] for r in runs.values())
    best = best_cell(json.loads((ROOT / "results" / "sweep" / "runs.json").read_text()))
    for (variant, seed), r in by.items():
        cache = r["train_config"]["cache"]
        assert (int(cache["t"]), cache["layer"]) == (best["t"], best["layer"])
        if variant.endswith("+DRA"):
            base = by[(variant.removesuffix("+DRA"), seed)]
            assert cache["digest"] == base["train_config"]["cache"]["digest"], (variant, seed)
            assert r["train_config"]["train"]["dra_weight"] == best["dra_weight"]


# --- the quick profile through dvc repro --------------------------------------------------------
def _dvc(repo: Path, *args: str, timeout: int = 600) -> str:
    env = dict(os.environ, DVC_NO_ANALYTICS="1", PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    proc = subprocess.run([str(Path(sys.executable).parent / "dvc"), *args], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"dvc {' '.join(args)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True,
                   env=dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
                            GIT_COMMITTER_EMAIL="t@t"))


def quick_repo(tmp: Path, fmnist_dir: Path) -> Path:
    """A git + DVC repository with this code, the quick params and a copy of Fashion-MNIST."""
    repo = tmp / "repo"
    for sub in ("pipeline", "stages", "models"):
        shutil.copytree(ROOT / sub, repo / sub, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", repo / "dvc.yaml")
    shutil.copy(ROOT / "tests" / "quick_params.yaml", repo / "params.yaml")
    shutil.copytree(fmnist_dir, repo / "data" / "fashion-mnist")
    (repo / ".gitignore").write_text("/artifacts\n/data\n__pycache__/\n")
    _git(repo, "init", "-q")
    _dvc(repo, "init", "-q")
    _dvc(repo, "add", "-q", "data")  # data.dvc, as in this repository: experiments restore the data from the cache
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "quick profile")
    return repo


INTERRUPTED: dict = {}  # what the interrupted first `dvc repro` of quick_run did


def _training_with_handlers(pid: int) -> bool:
    """A `pipeline train` process under ``pid`` that catches SIGTERM (bit 15 of /proc's SigCgt)."""
    import psutil

    for child in psutil.Process(pid).children(recursive=True):
        try:
            if "train" not in child.cmdline():
                continue
            caught = next(ln for ln in Path(f"/proc/{child.pid}/status").read_text().splitlines()
                          if ln.startswith("SigCgt:"))
        except (psutil.Error, OSError, StopIteration):
            continue
        if int(caught.split()[1], 16) >> (signal.SIGTERM - 1) & 1:
            return True
    return False


def _interrupted_repro(repo: Path) -> dict:
    """`dvc repro` (what `make pipeline` runs) stopped by SIGINT to its whole process group while the
    first training stage runs (once its process has installed the CLI's handlers: it catches
    SIGTERM, which Python alone does not): exit status, output, `dvc status` right after."""
    env = dict(os.environ, DVC_NO_ANALYTICS="1", PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    log = repo.parent / "interrupted-repro.log"
    with log.open("w") as fh:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "dvc"), "repro"], cwd=repo, env=env, stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 900
        while proc.poll() is None and time.time() < deadline and not _training_with_handlers(proc.pid):
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=300)
    return {"rc": proc.returncode, "output": log.read_text(), "status": _dvc(repo, "status")}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, fmnist_dir) -> Path:
    repo = quick_repo(tmp_path_factory.mktemp("pipeline"), fmnist_dir)
    INTERRUPTED.update(_interrupted_repro(repo))
    _dvc(repo, "repro")  # the second run finishes the work
    return repo


def test_an_interrupted_repro_exits_nonzero_and_the_next_one_finishes(quick_run):
    assert INTERRUPTED["rc"] != 0 and "failed to reproduce 'train@" in INTERRUPTED["output"], \
        INTERRUPTED["output"][-2000:]
    assert "error: interrupted (SIGINT)" in INTERRUPTED["output"], INTERRUPTED["output"][-2000:]
    # the interrupted stage was not recorded as done: the next `dvc repro` runs it again
    assert "train@at:" in INTERRUPTED["status"], INTERRUPTED["status"]
    for key in ("at", "at_dra", "dmat", "dmat_dra"):  # every run finished by the second repro
        assert json.loads((quick_run / "artifacts" / "train" / key / "config.json").read_text())["finished"]
    assert "up to date" in _dvc(quick_run, "status")


def test_quick_profile_report_and_metrics(quick_run):
    md = (quick_run / "artifacts" / "report" / "report.md").read_text()
    rows = [line.split("|")[1].strip() for line in md.splitlines() if line.startswith("| ") and "variant" not in line]
    assert rows == VARIANTS
    for name in ("accuracy.png", "curves.png", "samples.png"):
        assert (quick_run / "artifacts" / "report" / name).stat().st_size > 1000, name
    for key in ("at", "at_dra", "dmat", "dmat_dra"):
        m = json.loads((quick_run / "artifacts" / "metrics" / f"{key}.json").read_text())
        assert 0 <= m["autoattack"] <= m["pgd"] <= m["clean"] <= 1 and m["n"] == 100, (key, m)
        full = json.loads((quick_run / "artifacts" / "eval" / f"{key}.json").read_text())
        assert full["checks"]["eval_mode"] and full["checks"]["deterministic"], full["checks"]
    shown = _dvc(quick_run, "metrics", "show", "--json")
    assert "artifacts/metrics/at.json" in shown and "artifacts/train/at/metrics.json" in shown
    assert "probe_accuracy" in shown
    _dvc(quick_run, "plots", "show", "-o", "plots-html")
    html = (quick_run / "plots-html" / "index.html").read_text()
    assert "log.tsv" in html and "accuracy.png" in html and "dvclive/plots/metrics/train/loss.tsv" in html


def _set_dra_weight(repo: Path, value: float) -> None:
    params = repo / "params.yaml"
    text = params.read_text()
    assert "dra_weight: &dra 0.5" in text
    params.write_text(text.replace("dra_weight: &dra 0.5", f"dra_weight: &dra {value}"))


def test_second_repro_does_nothing_and_dra_weight_stales_only_dra_trainings(quick_run):
    assert "up to date" in _dvc(quick_run, "status")
    assert "Running stage" not in _dvc(quick_run, "repro")
    original = (quick_run / "params.yaml").read_text()
    try:
        _set_dra_weight(quick_run, 0.25)
        assert _stale(quick_run) == {"train@at_dra", "train@dmat_dra"}  # downstream of them: evaluate, report
    finally:
        (quick_run / "params.yaml").write_text(original)


def _stale(repo: Path) -> set[str]:
    status = _dvc(repo, "status")
    return {line.strip().rstrip(":") for line in status.splitlines() if line and not line[0].isspace()}


def test_a_training_default_or_a_source_reader_never_reruns_upstream_stages(quick_run):
    """Edit the file that holds train's defaults, then a dataset reader, in the quick repository:
    `dvc status` (the stage deps) names only the stage that owns each file. Upstream stages (and
    the hours of diffusion training and extraction a real user would lose) stay up to date."""
    import inspect

    from pipeline.data.sources import read_source
    from pipeline.train.config import TrainConfig

    trains = {f"train@{k}" for k in ("at", "at_dra", "dmat", "dmat_dra")} | {"train-sweep"}
    for obj, owners in ((TrainConfig, trains), (read_source, {"prepare"})):
        rel = Path(inspect.getsourcefile(obj)).resolve().relative_to(ROOT)
        path = quick_run / rel
        original = path.read_text()
        try:
            path.write_text(original.replace("from __future__ import annotations",
                                             "from __future__ import annotations  # edited", 1))
            assert path.read_text() != original
            assert _stale(quick_run) == owners, rel
        finally:
            path.write_text(original)
    assert "up to date" in _dvc(quick_run, "status")


@pytest.mark.slow
def test_dra_weight_reruns_only_dra_training_evaluation_and_report(quick_run):
    """Runs the stale stages for real and lists what ran (~1 minute more)."""
    _set_dra_weight(quick_run, 0.25)
    out = _dvc(quick_run, "repro")
    ran = {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}
    assert ran == {"train@at_dra", "train@dmat_dra", "evaluate@at_dra", "evaluate@dmat_dra", "report"}, out


def test_a_sweep_point_is_a_dvc_experiment_that_reruns_only_the_sweep_stages(quick_run, tmp_path):
    """`dvc exp run --temp -S sweep.t=... -S sweep.layer=... -S sweep.dra_weight=...` (what the queue
    runs, in a temporary workspace): another target set and weight re-run train-sweep and
    evaluate-sweep only (no extraction); `dvc exp show --json` gives one record per experiment
    (pipeline/report/sweep.py: collect) and `report --sweep` renders it."""
    from pipeline.report.sweep import collect

    _git(quick_run, "add", "-A")
    _git(quick_run, "commit", "-qm", "quick run")
    out = _dvc(quick_run, "exp", "run", "--temp", "-n", "t20-up", "-S", "sweep.t=20", "-S", "sweep.layer=up_blocks.0",
               "-S", "sweep.dra_weight=0.25")
    ran = {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}
    assert ran == {"train-sweep", "evaluate-sweep"}, out
    shown = json.loads(_dvc(quick_run, "exp", "show", "--json"))
    (runs,) = [r for r in collect(shown) if r["experiment"] == "t20-up"]
    assert (runs["t"], runs["layer"], runs["dra_weight"], runs["seed"]) == (20, "up_blocks.0", 0.25, 0)
    assert runs["n"] == 50 and runs["offset"] == 300 and 0 <= runs["pgd"] <= runs["clean"] <= 1
    assert runs["budget"]["steps"] == 5 and runs["checks_passed"] is not None
    assert "up to date" in _dvc(quick_run, "status")  # the workspace itself is untouched
    (tmp_path / "runs.json").write_text(json.dumps(collect(shown)))
    env = dict(os.environ, PYTHONPATH=str(quick_run))
    proc = subprocess.run([sys.executable, "-m", "pipeline", "report", "--sweep", str(tmp_path / "runs.json"),
                           "--probe", str(quick_run / "artifacts" / "probe.json"), "--out", str(tmp_path / "r")],
                          cwd=quick_run, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    md = (tmp_path / "r" / "report.md").read_text()
    assert "| up_blocks.0 | 20 |" in md and "λ = 0.25" in md and (tmp_path / "r" / "sweep.png").stat().st_size > 5000
