"""report: mean +- std over seeds, canonical variant order, plots, failed checks made visible."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.core.errors import UserError
from pipeline.report.config import ReportConfig
from pipeline.report.results import read_log
from pipeline.report.tables import paired_difference, t975
from stages import report

PNG = b"\x89PNG\r\n\x1a\n"


def _budget(steps: int, syn: float) -> dict:
    b_syn = round(128 * syn)
    return {"steps": steps, "batch_size": 128, "samples": steps * 128, "real_samples": steps * (128 - b_syn),
            "synthetic_samples": steps * b_syn, "steps_per_epoch": steps // 3}


def _result(variant: str, seed: int, clean: float, pgd: float, aa: float, ckpt: Path, warnings=(),
            steps: int = 237) -> dict:
    return {"variant": variant, "clean": clean, "pgd": pgd, "autoattack": aa, "n": 500,
            "threat_model": "Linf", "eps": 0.1, "attacks": ["pgd-ce-20x2", "autoattack-fast:apgd-ce"],
            "pgd_attack": {"steps": 20, "restarts": 2, "step_size": 0.0125},
            "autoattack_version": "fast", "autoattack_fast": {"targets": 3, "iters": 50}, "checks": {},
            "warnings": list(warnings),
            "checkpoint": str(ckpt),
            "train_config": {"train": {"seed": seed, "dra_weight": 0.5 * ("DRA" in variant),
                                       "synthetic_fraction": 0.7 * variant.startswith("DM")}}, "train_metrics": {"train_seconds": 100 + seed,
                              "budget": _budget(steps, 0.7 * variant.startswith("DM"))}}


@pytest.fixture
def results(tmp_path) -> Path:
    evals, train = tmp_path / "eval", tmp_path / "train"
    evals.mkdir()
    rows = [("DM-AT+DRA", 0, 0.80, 0.60, 0.58), ("AT", 0, 0.82, 0.50, 0.48), ("AT", 1, 0.84, 0.54, 0.52),
            ("AT+DRA", 0, 0.83, 0.56, 0.55), ("DM-AT", 0, 0.81, 0.58, 0.57)]
    for variant, seed, clean, pgd, aa in rows:
        ckpt = train / f"{variant}-s{seed}"
        ckpt.mkdir(parents=True)
        (ckpt / "log.tsv").write_text("epoch\tloss_at\tloss_dra\ttrain_acc\n1\t2.0\t0.9\t0.4\n2\t1.5\t0.7\t0.6\n")
        warn = ["autoattack_le_pgd"] if variant == "DM-AT" else []
        (evals / f"{variant}-s{seed}.json").write_text(json.dumps(_result(variant, seed, clean, pgd, aa, ckpt, warn)))
        (evals / f"{variant}-s{seed}.metrics.json").write_text(json.dumps({"clean": clean, "pgd": pgd}))
    (evals / "junk.json").write_text("{not json")
    return tmp_path


def test_report_table_plots_and_seeds(results, tmp_path):
    grid = tmp_path / "grid.png"
    grid.write_bytes(PNG + b"0" * 16)
    out = tmp_path / "report"
    summary = report.run(ReportConfig(evals=str(results / "eval"), train=str(results / "train"),
                                      grid=str(grid), out=str(out)))
    md = (out / "report.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| ") and "variant" not in line]
    assert [r.split("|")[1].strip() for r in rows] == ["AT", "AT+DRA", "DM-AT", "DM-AT+DRA"]
    at = [c.strip() for c in rows[0].split("|")]
    assert at[2:7] == ["2", "0.0", "0.0", "237", "30336 + 0"]
    assert at[7] == "83.00 ± 1.41"  # mean and sample std of 82, 84
    assert at[8] == "52.00 ± 2.83" and at[9] == "50.00 ± 2.83"
    assert at[10] == "100 ± 1"  # train seconds 100, 101 -> 100.5 +- 0.7
    dra = [c.strip() for c in rows[3].split("|")]
    assert dra[3:8] == ["0.5", "0.7", "237", "9006 + 21330", "80.00"] and "ok" in rows[3]
    assert "WARNING" not in md and "expected upper bound" in md and "Every variant trained for the same" in md
    assert "FAILED: autoattack_le_pgd" in rows[2]
    assert "PGD-20x2" in md and "AutoAttack-fast" in md and "eps = 0.1" in md
    for name in ("accuracy.png", "curves.png", "samples.png"):
        assert (out / name).read_bytes()[:8] == PNG and f"({name})" in md
    assert (out / "curves.png").stat().st_size > 5000
    assert len(summary["AT"]) == 2 and summary["AT"][1]["train_seconds"] == 101
    assert not (tmp_path / "report.tmp").exists()


def test_report_without_logs_or_grid(results, tmp_path):
    for log in (results / "train").rglob("log.tsv"):
        log.unlink()
    out = tmp_path / "r2"
    report.run(ReportConfig(evals=str(results / "eval"), train="", grid=str(tmp_path / "none.png"), out=str(out)))
    assert sorted(p.name for p in out.iterdir()) == ["accuracy.png", "report.md", "summary.json"]


def test_report_refuses_unequal_budgets_or_marks_them(results, tmp_path):
    """A DM-AT run trained 3.4x longer (the old steps = N_real / b_real) is not a fair comparison."""
    ckpt = results / "train" / "DM-AT-s0"
    path = results / "eval" / "DM-AT-s0.json"
    path.write_text(json.dumps(_result("DM-AT", 0, 0.81, 0.58, 0.57, ckpt, steps=789)))
    with pytest.raises(UserError, match=r"budgets .* differ .*DM-AT"):
        report.run(ReportConfig(evals=str(results / "eval"), train="", grid="", out=str(tmp_path / "r")))
    assert not (tmp_path / "r").exists()
    report.run(ReportConfig(evals=str(results / "eval"), train="", grid="", out=str(tmp_path / "r"),
                            allow_unequal_budgets=True))
    md = (tmp_path / "r" / "report.md").read_text()
    assert "WARNING: the training budgets differ (DM-AT)" in md and "Every variant trained for the same" not in md
    assert [line.split("|")[1].strip() for line in md.splitlines() if "UNEQUAL" in line] == ["DM-AT UNEQUAL BUDGET"]
    metrics = json.loads(path.read_text())
    del metrics["train_metrics"]["budget"]  # an old run without a recorded budget is not comparable either
    path.write_text(json.dumps(metrics))
    with pytest.raises(UserError, match="DM-AT"):
        report.run(ReportConfig(evals=str(results / "eval"), train="", grid="", out=str(tmp_path / "r2")))


def _edit(path: Path, change) -> dict:
    r = json.loads(path.read_text())
    change(r)
    path.write_text(json.dumps(r))
    return r


def test_report_refuses_rows_evaluated_otherwise_in_one_line_or_marks_them(results, tmp_path):
    """An evaluation at eps 0.05 with PGD-10x2 beside ones at eps 0.1 with PGD-20x2 is refused; the
    escape hatch shows it marked, the columns named from the settings the other rows share."""
    evals = results / "eval"

    def odd(r: dict) -> None:
        r |= {"eps": 0.05, "pgd_attack": {"steps": 10, "restarts": 2, "step_size": 0.0125},
              "attacks": ["pgd-ce-10x2", "autoattack-fast:apgd-ce"]}

    _edit(evals / "AT+DRA-s0.json", odd)
    with pytest.raises(UserError) as exc:
        report.run(ReportConfig(evals=str(evals), train="", grid="", out=str(tmp_path / "r")))
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith("evaluation settings differ: AT+DRA seed 0 (")
    assert "has eps 0.05, AT seed 0 (" in msg and "AT-s0.json) 0.1;" in msg and "--allow-unequal-evaluations" in msg
    assert not (tmp_path / "r").exists()
    report.run(ReportConfig(evals=str(evals), train="", grid="", out=str(tmp_path / "r"),
                            allow_unequal_evaluations=True))
    md = (tmp_path / "r" / "report.md").read_text()
    assert [line.split("|")[1].strip() for line in md.splitlines() if "UNEQUAL EVALUATION |" in line] == [
        "AT+DRA UNEQUAL EVALUATION"]
    assert "**UNEQUAL EVALUATION: AT+DRA: eps 0.05, the others 0.1." in md
    assert "WARNING: the evaluation settings differ (AT+DRA)" in md and "evaluated alike" not in md
    assert "| PGD-20x2 (%) | AutoAttack-fast (%) |" in md and "eps = 0.1," in md
    # the first rows of the table (AT, two seeds) evaluated otherwise: the header still follows the three others
    _edit(evals / "AT+DRA-s0.json", lambda r: r.update(_result("AT+DRA", 0, 0.83, 0.56, 0.55, Path("x"))))
    for seed in (0, 1):
        _edit(evals / f"AT-s{seed}.json", lambda r: r.update(
            pgd_attack={"steps": 3, "restarts": 1, "step_size": 0.05}, attacks=["pgd-ce-3x1", "autoattack-fast:apgd-ce"]))
    with pytest.raises(UserError, match=r"AT seed 0 \(.*\) has PGD steps 3, AT\+DRA seed 0 \(.*\) 20 \(1 more row differs\)"):
        report.run(ReportConfig(evals=str(evals), train="", grid="", out=str(tmp_path / "r2")))
    report.run(ReportConfig(evals=str(evals), train="", grid="", out=str(tmp_path / "r2"),
                            allow_unequal_evaluations=True))
    md = (tmp_path / "r2" / "report.md").read_text()
    assert "| PGD-20x2 (%) |" in md and "PGD-3x1" not in md.split("\n\n**UNEQUAL")[0]
    assert "AT: PGD steps 3, the others 20" in md


@pytest.mark.parametrize("change, setting", [
    (lambda r: r.update(threat_model="L2"), "threat model L2"),
    (lambda r: r.update(eps=8 / 255), "eps 0.0313725"),
    (lambda r: r["pgd_attack"].update(restarts=1), "PGD restarts 1"),
    (lambda r: r["pgd_attack"].update(step_size=0.01), "PGD step size 0.01"),
    (lambda r: r["pgd_attack"].update(random_start=False), "PGD random start False"),
    (lambda r: r.update(autoattack_version="standard", autoattack_fast=None), "AutoAttack version standard"),
    (lambda r: r["autoattack_fast"].update(targets=9), "AutoAttack-fast target classes 9"),
    (lambda r: r["autoattack_fast"].update(iters=100), "AutoAttack-fast iterations 100"),
    (lambda r: r.update(attacks=["pgd-ce-20x2"]), "attacks pgd-ce-20x2,"),
    (lambda r: r.update(n=1000), "test images \\(n\\) 1000"),
    (lambda r: r.update(offset=500), "test images \\(offset\\) 500"),
    (lambda r: r.update(shards="elsewhere/test"), "test shards /.*elsewhere/test"),
])
def test_every_evaluation_setting_is_compared(results, tmp_path, change, setting):
    _edit(results / "eval" / "DM-AT-s0.json", change)
    with pytest.raises(UserError, match=f"DM-AT seed 0 .* has {setting}"):
        report.run(ReportConfig(evals=str(results / "eval"), train="", grid="", out=str(tmp_path / "r")))


def test_shard_sets_compare_by_content_hash_where_every_row_records_one(results, tmp_path):
    """Equal: the shards path differs (another mount), the content is the same; unequal: other content."""
    for i, path in enumerate(sorted((results / "eval").glob("*-s?.json"))):
        _edit(path, lambda r, i=i: r.update(shards=f"/mnt{i}/test", shards_content_hash="abc"))
    report.run(ReportConfig(evals=str(results / "eval"), train="", grid="", out=str(tmp_path / "r")))
    _edit(results / "eval" / "DM-AT-s0.json", lambda r: r.update(shards_content_hash="def"))
    with pytest.raises(UserError, match="has test shards \\(content hash\\) def, AT seed 0 .* abc"):
        report.run(ReportConfig(evals=str(results / "eval"), train="", grid="", out=str(tmp_path / "r2")))


def _trained(folder: Path, evaluation: Path, *, seconds: float = 812.5) -> None:
    """``folder`` holds the run that ``evaluation`` measured: its config.json and metrics.json as
    evaluate read them (train_config, train_metrics), and weights."""
    r = _edit(evaluation, lambda r: r["train_config"].update(
        finished=True, progress={"epoch": 3, "step": 0, "global_step": 237, "seconds": seconds}))
    (folder / "config.json").write_text(json.dumps(r["train_config"], indent=2, sort_keys=True))
    (folder / "metrics.json").write_text(json.dumps(r["train_metrics"]))
    (folder / "model.safetensors").write_bytes(b"weights")


def test_report_refuses_an_evaluation_older_than_the_run_it_measured(results, tmp_path):
    train, evals = results / "train", results / "eval"
    for path in evals.glob("*-s?.json"):
        _trained(train / path.stem, path)
    report.run(ReportConfig(evals=str(evals), train=str(train), grid="", out=str(tmp_path / "r")))
    assert (tmp_path / "r" / "curves.png").is_file()  # the folders hold the runs evaluated: their curves
    # AT seed 1 trained again after its evaluation: its folder now records another run
    folder = train / "AT-s1"
    config = json.loads((folder / "config.json").read_text())
    config["progress"]["seconds"] = 790.0
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError) as exc:
        report.run(ReportConfig(evals=str(evals), train=str(train), grid="", out=str(tmp_path / "r2")))
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith(f"{evals / 'AT-s1.json'} is older than the run it measured: {folder}")
    assert "step 237 after 812.5 s then, step 237 after 790.0 s now" in msg and "--train ''" in msg
    assert not (tmp_path / "r2").exists()
    # without the training folders (results evaluated elsewhere, as the committed ones) there is nothing to compare
    report.run(ReportConfig(evals=str(evals), train="", grid="", out=str(tmp_path / "r3")))
    assert not (tmp_path / "r3" / "curves.png").exists()
    # evaluated while unfinished, finished since (same progress, other metrics.json)
    _trained(folder, evals / "AT-s1.json")
    _edit(evals / "AT-s1.json", lambda r: r.update(train_metrics={}) or r["train_config"].update(finished=False))
    late = ReportConfig(evals=str(evals), train=str(train), grid="", out=str(tmp_path / "r4"),
                        allow_unequal_budgets=True)  # no metrics.json then: no budget recorded
    with pytest.raises(UserError, match="it was unfinished then, finished now"):
        report.run(late)
    _edit(evals / "AT-s1.json", lambda r: r["train_config"].update(finished=True))
    with pytest.raises(UserError, match="metrics.json recorded train_seconds None then, 101 now"):
        report.run(late)


def test_a_recorded_weights_hash_decides_staleness(results, tmp_path):
    import hashlib

    train, evals = results / "train", results / "eval"
    for path in evals.glob("*-s?.json"):
        _trained(train / path.stem, path)
    digest = hashlib.sha256(b"weights").hexdigest()
    _edit(evals / "AT-s0.json", lambda r: r.update(checkpoint_sha256=digest))
    config = train / "AT-s0" / "config.json"
    config.write_text(config.read_text().replace("812.5", "1.0"))  # the hash, not the config, decides
    report.run(ReportConfig(evals=str(evals), train=str(train), grid="", out=str(tmp_path / "r")))
    (train / "AT-s0" / "model.safetensors").write_bytes(b"other weights")
    with pytest.raises(UserError, match=f"its model.safetensors had sha256 {digest[:12]}\\.\\.\\., now"):
        report.run(ReportConfig(evals=str(evals), train=str(train), grid="", out=str(tmp_path / "r2")))


def test_report_refuses_empty_folder(tmp_path):
    with pytest.raises(UserError, match="no evaluation results"):
        report.run(ReportConfig(evals=str(tmp_path), out=str(tmp_path / "r")))
    assert not (tmp_path / "r").exists()


def test_read_log_formats(tmp_path):
    (tmp_path / "a.csv").write_text("step,loss,note\n1,0.5,x\n2,0.25,y\n")
    (tmp_path / "b.jsonl").write_text('{"epoch": 1, "acc": 0.5}\n{"epoch": 2, "acc": 0.75}\n')
    assert read_log(tmp_path / "a.csv") == {"step": [1.0, 2.0], "loss": [0.5, 0.25]}
    assert read_log(tmp_path / "b.jsonl") == {"epoch": [1.0, 2.0], "acc": [0.5, 0.75]}


def test_readme_table_is_generated_between_markers(results, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# Title\n\ntext before\n<!-- report:begin -->\n| old | typed |\n<!-- report:end -->\nafter\n")
    report.run(ReportConfig(evals=str(results / "eval"), train="", grid="", out=str(tmp_path / "r"),
                            readme=str(readme)))
    text = readme.read_text()
    assert text.startswith("# Title\n\ntext before\n<!-- report:begin -->\n<!-- generated by")
    assert text.endswith("<!-- report:end -->\nafter\n") and "| old | typed |" not in text
    table = (tmp_path / "r" / "report.md").read_text().split("\n\n")
    assert next(p for p in table if p.startswith("| variant")) in text  # the report's own table
    before = readme.read_text()
    report.run(ReportConfig(evals=str(results / "eval"), train="", grid="", out=str(tmp_path / "r2"),
                            readme=str(readme)))
    assert readme.read_text() == before  # generated again from the same JSONs: the same text
    named = tmp_path / "NOTES.md"  # FILE#NAME: another table in the same file, between NAME's markers
    named.write_text("<!-- ablation:begin -->\n<!-- ablation:end -->\n<!-- report:begin -->\nkept\n<!-- report:end -->\n")
    report.run(ReportConfig(evals=str(results / "eval"), train="", grid="", out=str(tmp_path / "r4"),
                            readme=f"{named}#ablation"))
    text = named.read_text()
    assert text.index("| variant") < text.index("<!-- ablation:end -->") and "\nkept\n" in text
    readme.write_text("no markers\n")
    with pytest.raises(UserError, match="report:begin"):
        report.run(ReportConfig(evals=str(results / "eval"), train="", grid="", out=str(tmp_path / "r3"),
                                readme=str(readme)))
    assert not (tmp_path / "r3").exists() and readme.read_text() == "no markers\n"


def test_paired_difference_equals_a_direct_computation():
    # differences 0.02, 0.05, -0.01 -> mean 0.02, sample sd 0.03, t_0.975(2) = 4.303
    mean, lo, hi = paired_difference([0.52, 0.55, 0.49], [0.50, 0.50, 0.50])
    half = 4.303 * 0.03 / 3 ** 0.5
    assert mean == pytest.approx(0.02) and lo == pytest.approx(0.02 - half) and hi == pytest.approx(0.02 + half)
    assert t975(1) == 12.706 and t975(10) == 2.228 and t975(200) == 1.96
    with pytest.raises(ValueError):  # unpaired lists are an error, not a silent truncation
        paired_difference([0.1, 0.2], [0.1])


def test_report_pairs_variants_by_seed_and_says_when_a_difference_is_noise(tmp_path):
    evals = tmp_path / "eval"
    evals.mkdir()
    rows = [("base", 0, 0.50, 0.40), ("base", 1, 0.52, 0.41), ("base", 2, 0.48, 0.42),
            ("better", 2, 0.58, 0.47), ("better", 0, 0.60, 0.45), ("better", 1, 0.62, 0.46),  # +10 points, sd 0
            ("noisy", 0, 0.55, 0.40), ("noisy", 1, 0.47, 0.44), ("noisy", 2, 0.49, 0.40),
            ("single", 0, 0.90, 0.90)]
    for variant, seed, clean, pgd in rows:
        r = _result(variant, seed, clean, pgd, None, tmp_path / "none")
        (evals / f"{variant}-s{seed}.json").write_text(json.dumps(r))
    report.run(ReportConfig(evals=str(evals), train="", grid="", out=str(tmp_path / "r"), baseline="base"))
    md = (tmp_path / "r" / "report.md").read_text()
    diffs = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
             for line in md.splitlines() if " − base " in line}
    assert set(diffs) == {"better − base", "noisy − base"}  # one seed gives no interval: no row
    assert diffs["better − base"][0] == "3"
    assert diffs["better − base"][1] == "+10.00 [+10.00, +10.00], wins 3/3"  # paired by seed, not by file order
    assert diffs["better − base"][2].startswith("+5.00 [") and "noise" not in diffs["better − base"][2]
    assert diffs["noisy − base"][1].endswith("(within noise), wins 2/3")  # +5, -5, +1 points
    assert "AutoAttack" not in md.split("Paired by training seed")[1].split("\n\n")[1]  # no AA numbers: no column
    png = tmp_path / "r" / "differences.png"  # the same differences, drawn per seed with their intervals
    assert png.read_bytes().startswith(PNG) and "![differences](differences.png)" in md
    with pytest.raises(UserError, match="--baseline 'nope': no such variant"):
        report.run(ReportConfig(evals=str(evals), train="", grid="", out=str(tmp_path / "r2"), baseline="nope"))
    # pairs, each variant against its own base (the study: AT+DRA:AT, DM-AT+DRA:DM-AT)
    report.run(ReportConfig(evals=str(evals), train="", grid="", out=str(tmp_path / "r3"),
                            baseline="better:base,noisy:better"))
    md = (tmp_path / "r3" / "report.md").read_text()
    rows = [line.split("|")[1].strip() for line in md.splitlines() if " − " in line and line.startswith("|")]
    assert rows == ["better − base", "noisy − better"] and "each variant minus its base" in md
    with pytest.raises(UserError, match="no such variant 'single2'"):
        report.run(ReportConfig(evals=str(evals), train="", grid="", out=str(tmp_path / "r4"),
                                baseline="better:base,single2:base"))
    with pytest.raises(UserError, match="VARIANT:BASE pairs"):
        report.run(ReportConfig(evals=str(evals), train="", grid="", out=str(tmp_path / "r5"),
                                baseline="better:base,noisy"))


def _sweep_run(t: int, layer: str, w: float, clean: float, pgd: float, steps: int = 237) -> dict:
    return {"experiment": f"e-{t}-{layer}-{w}", "t": t, "layer": layer, "dra_weight": w, "seed": 0, "clean": clean,
            "pgd": pgd, "n": 1000, "offset": 50000, "checks_passed": True, "budget": {"steps": steps, "samples": steps * 128}}


def test_sweep_report_table_heatmap_and_refusals(tmp_path):
    runs = [_sweep_run(t, layer, w, 0.6 + t / 10000, 0.40 + w / 100 + (layer == "up_blocks.0") / 50)
            for t in (20, 100) for layer in ("mid_block", "up_blocks.0") for w in (0.5, 1.0)]
    runs.append(_sweep_run(100, "mid_block", 0.0, 0.61, 0.39))  # lambda = 0: plain AT
    (tmp_path / "runs.json").write_text(json.dumps(runs))
    probe = {"sets": [{"t": t, "layer": layer, "probe_accuracy": 0.5 + t / 1000}
                      for t in (20, 100) for layer in ("mid_block", "up_blocks.0")]}
    (tmp_path / "probe.json").write_text(json.dumps(probe))
    readme = tmp_path / "README.md"
    readme.write_text("<!-- sweep:begin -->\n<!-- sweep:end -->\n")
    report.run(ReportConfig(sweep=str(tmp_path / "runs.json"), probe=str(tmp_path / "probe.json"),
                            out=str(tmp_path / "r"), readme=f"{readme}#sweep"))
    md = (tmp_path / "r" / "report.md").read_text()
    assert "| up_blocks.0 | 100 | 60.0 | 61.0 / 42.5 | 61.0 / 43.0 |" in md  # probe, then clean / PGD per lambda
    assert "| mid_block | 20 | 52.0 | 60.2 / 40.5 | 60.2 / 41.0 |" in md
    assert "λ = 0 (plain AT, no target): 61.0 / 39.0" in md and "never the test set" in md
    assert "Best validation PGD: t = 20, up_blocks.0, λ = 1 (43.0%), against 39.0% without DRA" in md
    assert (tmp_path / "r" / "sweep.png").read_bytes()[:8] == PNG
    assert "| up_blocks.0 | 100 |" in readme.read_text() and "--sweep" in readme.read_text()
    runs[0]["budget"] = {"steps": 100, "samples": 12800}
    (tmp_path / "runs.json").write_text(json.dumps(runs))
    with pytest.raises(UserError, match="different budgets"):
        report.run(ReportConfig(sweep=str(tmp_path / "runs.json"), out=str(tmp_path / "r2")))
    (tmp_path / "runs.json").write_text("[]")
    with pytest.raises(UserError, match="non-empty list of records"):
        report.run(ReportConfig(sweep=str(tmp_path / "runs.json"), out=str(tmp_path / "r3")))
    assert not (tmp_path / "r2").exists() and not (tmp_path / "r3").exists()


def _image_panels(fig, title: str) -> list:
    return [ax for ax in fig.axes if ax.images and title in ax.get_title()]


def test_sweep_heatmaps_share_one_scale_per_metric_and_show_the_lambda_0_reference():
    """Two layers far apart in accuracy: one colour means one accuracy in both panels of a metric,
    centred on lambda = 0 (its value in the title, a line on the colour bar, each cell's difference)."""
    import matplotlib.pyplot as plt

    from pipeline.report import sweep

    runs = [_sweep_run(t, layer, w, 0.55 + 0.1 * (layer == "up_blocks.0") + t / 10000,
                       0.30 + 0.15 * (layer == "up_blocks.0") + w / 100)
            for t in (20, 100) for layer in ("mid_block", "up_blocks.0") for w in (0.5, 1.0)]
    runs.append(_sweep_run(100, "mid_block", 0.0, 0.61, 0.39))
    probe = {"sets": [{"t": t, "layer": layer, "probe_accuracy": 0.5 + t / 1000 + 0.2 * (layer == "mid_block")}
                      for t in (20, 100) for layer in ("mid_block", "up_blocks.0")]}
    fig = sweep.heatmap_figure(runs, probe)
    for metric, ref, extremes, cells in (("clean", 61.0, (55.2, 66.0), ("56.0\n(-5.0)", "66.0\n(+5.0)")),
                                         ("PGD", 39.0, (30.5, 46.0), ("31.0\n(-8.0)", "46.0\n(+7.0)"))):
        panels = _image_panels(fig, f"validation {metric}")
        assert len(panels) == 2
        scales = {(round(ax.images[0].norm.vmin, 6), round(ax.images[0].norm.vmax, 6)) for ax in panels}
        assert len(scales) == 1, scales  # one scale for both layers
        (lo, hi), = scales
        assert lo <= min(extremes) and hi >= max(extremes) and (lo + hi) / 2 == pytest.approx(ref)  # centred on it
        for ax, cell in zip(panels, cells):  # mid_block, then up_blocks.0: a cell and its difference from lambda = 0
            assert f"λ = 0: {ref:.1f}" in ax.get_title() and cell in [t.get_text() for t in ax.texts]
        bars = [ax for ax in fig.axes if not ax.images and ax.get_ylabel() == "line: λ = 0"]
        assert any(line.get_ydata()[0] == pytest.approx(ref) for ax in bars for line in ax.lines)
    probes = _image_panels(fig, "linear probe")
    assert len({(ax.images[0].norm.vmin, ax.images[0].norm.vmax) for ax in probes}) == 1
    assert probes[0].images[0].norm.vmin == pytest.approx(52.0) and probes[0].images[0].norm.vmax == pytest.approx(80.0)
    plt.close(fig)
    fig = sweep.heatmap_figure([r for r in runs if r["dra_weight"] > 0], None)  # no lambda = 0 run: min..max
    panels = _image_panels(fig, "validation PGD")
    assert [(ax.images[0].norm.vmin, ax.images[0].norm.vmax) for ax in panels] == [pytest.approx((30.5, 46.0))] * 2
    assert "λ = 0" not in panels[0].get_title()
    plt.close(fig)


def test_no_legend_covers_a_plot(results):
    """The report's legends sit outside the axes, clear of the values, and inside the figure."""
    import matplotlib.pyplot as plt

    from pipeline.report import plots
    from pipeline.report.results import aggregate, load_evals

    groups = aggregate(load_evals(results / "eval"))
    for rs in groups.values():
        for r in rs:
            r.update(clean=0.99, pgd=0.98, autoattack=0.97)  # bars up to the top, where a legend once sat
    logs = {f"variant {i} with a long name": [{"epoch": [1, 2], "loss": [2.0, 1.0], "adv_acc": [0.3, 0.9]}]
            for i in range(7)}
    evals = {f"v{i}": [{"clean": 0.5 + i / 10 + s / 100, "pgd": 0.4 + s / 100, "_path": str(s),
                        "train_config": {"seed": s}} for s in range(3)] for i in range(3)}
    figures = [plots.accuracy_figure(groups), plots.curves_figure(logs),
               plots.differences_figure(evals, [("v1", "v0"), ("v2", "v0")])]
    for fig in figures:
        fig.canvas.draw()
        assert (fig.legends or any(ax.get_legend() for ax in fig.axes)) and plots.covered(fig) == []
        plt.close(fig)
    fig, ax = plt.subplots()  # the check itself: a legend in the middle of the values is found
    ax.plot([0, 1], [0, 1], label="a line")
    ax.legend(loc="center")
    fig.canvas.draw()
    assert plots.covered(fig) == ["a line: over an axes"]
    plt.close(fig)


@pytest.mark.parametrize("bad, match", [
    (lambda runs: [r for r in runs if r["dra_weight"] == 0], "no run with dra_weight > 0"),
    (lambda runs: [{**runs[0], "t": "100"}] + runs[1:], "t \\(int\\)"),
    (lambda runs: [{**runs[0], "pgd": "0.4"}] + runs[1:], "accuracy in \\[0, 1\\]"),
    (lambda runs: [{**runs[0], "dra_weight": -1}] + runs[1:], "number >= 0"),
    (lambda runs: [{**runs[0], "budget": [237]}] + runs[1:], "budget \\(dict or null\\)"),
    (lambda runs: [{**runs[0], "offset": 0}] + runs[1:], "evaluated on different images"),
    (lambda runs: [{**runs[0], "eps": 0.05}] + [{**r, "eps": 0.1} for r in runs[1:]], "evaluated at different eps"),
])
def test_sweep_runs_that_cannot_be_compared_are_refused(tmp_path, bad, match):
    runs = [_sweep_run(t, "mid_block", w, 0.6, 0.4) for t in (20, 100) for w in (0.0, 0.5)]
    (tmp_path / "runs.json").write_text(json.dumps(bad(runs)))
    with pytest.raises(UserError, match=match):
        report.run(ReportConfig(sweep=str(tmp_path / "runs.json"), out=str(tmp_path / "r")))
    assert not (tmp_path / "r").exists()


def test_sweep_report_survives_a_malformed_probe_and_refuses_binary_input(tmp_path):
    runs = [_sweep_run(t, "mid_block", 0.5, 0.6, 0.4) for t in (20, 100)]
    (tmp_path / "runs.json").write_text(json.dumps(runs))
    probe = {"sets": [{"t": "x", "layer": "mid_block", "probe_accuracy": 0.5}, 7,
                      {"t": 20, "layer": "mid_block", "probe_accuracy": 0.625}]}
    (tmp_path / "probe.json").write_text(json.dumps(probe))
    report.run(ReportConfig(sweep=str(tmp_path / "runs.json"), probe=str(tmp_path / "probe.json"),
                            out=str(tmp_path / "r")))
    md = (tmp_path / "r" / "report.md").read_text()
    assert "| mid_block | 20 | 62.5 |" in md and "| mid_block | 100 | - |" in md  # the bad entries left out
    (tmp_path / "runs.bin").write_bytes(b"\xff\xfe\x00[")
    with pytest.raises(UserError, match="not a readable JSON file"):
        report.run(ReportConfig(sweep=str(tmp_path / "runs.bin"), out=str(tmp_path / "r2")))


def _bench_result() -> dict:
    return {"machine": {"cpu": "AMD EPYC", "cores": 2, "torch_threads": 2, "gpu": None, "load_avg_1m": 0.5},
            "load_avg_1m_end": 1.2, "seconds": 330.0, "extract_over_forward": 0.93,
            "train_cached_over_plain": 1.04, "multi_over_single": 3.15, "multi_over_single_per_timestep": 1.05,
            "bytes_per_view": 107.1}


def test_bench_report_renders_the_figures_from_the_json(tmp_path):
    """report --bench: the README's benchmark table comes from a committed bench.json, targets checked."""
    (tmp_path / "bench.json").write_text(json.dumps(_bench_result()))
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- bench:begin -->\nold\n<!-- bench:end -->\nrest\n")
    report.run(ReportConfig(bench=str(tmp_path / "bench.json"), out=str(tmp_path / "r"), readme=f"{readme}#bench"))
    text = readme.read_text()
    assert "| extract pass / bare forward | `extract_over_forward` | 0.930 | <= 1.05: met |" in text
    assert "| AT+DRA cached / plain AT (RAM) | `train_cached_over_plain` | 1.040 | <= 1.03: **MISSED** |" in text
    assert "| per timestep | `multi_over_single_per_timestep` | 1.050 | <= 1.1: met |" in text
    assert "AMD EPYC, 2 cores, 2 torch threads, no GPU;" in text and "5.5 min" in text
    assert text.startswith("intro\n") and text.endswith("rest\n") and "old" not in text
    assert (tmp_path / "r" / "report.md").is_file()


def test_bench_report_renders_the_gpu_profile_and_leaves_out_what_was_not_measured(tmp_path):
    """report --bench on `bench --profile gpu`'s result: its rows, the cached/plain target per classifier,
    small figures in scientific notation; a null (GPU memory of a CPU dry run) is left out, not refused."""
    res = {"machine": {"cpu": "Xeon", "cores": 16, "torch_threads": 16, "gpu": "NVIDIA H200", "torch": "2.11.0+cu130"},
           "extract_views_per_s_fp32": 13391.7, "extract_peak_mb": None, "wrn-28-10_cached_over_plain": 1.0,
           "preact-resnet18_cached_over_plain": 1.04, "online_vs_cpu_fp32_max_abs_diff": 0.00116}
    (tmp_path / "gpu.json").write_text(json.dumps(res))
    report.run(ReportConfig(bench=str(tmp_path / "gpu.json"), out=str(tmp_path / "r")))
    md = (tmp_path / "r" / "report.md").read_text()
    assert "| extract views/s (fp32, UNet to mid_block) | `extract_views_per_s_fp32` | 13391.700 |  |" in md
    assert "| wrn-28-10: cached / plain | `wrn-28-10_cached_over_plain` | 1.000 | <= 1.03: met |" in md
    assert "`preact-resnet18_cached_over_plain` | 1.040 | <= 1.03: **MISSED** |" in md
    assert "| 1.16e-03 |" in md and "extract_peak_mb" not in md
    assert "NVIDIA H200, torch 2.11.0+cu130" in md
    (tmp_path / "bad.json").write_text(json.dumps({**res, "wrn-28-10_cached_over_plain": "1.0"}))
    with pytest.raises(UserError, match="wrn-28-10_cached_over_plain"):
        report.run(ReportConfig(bench=str(tmp_path / "bad.json"), out=str(tmp_path / "r2")))


@pytest.mark.parametrize("doc", [[], {"extract_over_forward": 1.0}, {"machine": {}, "extract_over_forward": "1.0"},
                                 {"machine": {}}])
def test_bench_report_refuses_what_is_not_a_bench_result(tmp_path, doc):
    (tmp_path / "bench.json").write_text(json.dumps(doc))
    with pytest.raises(UserError, match="bench result"):
        report.run(ReportConfig(bench=str(tmp_path / "bench.json"), out=str(tmp_path / "r")))
    assert not (tmp_path / "r").exists()


def test_aa_report_compares_fast_with_standard_run_by_run_and_refuses_mismatches(tmp_path):
    """report --aa-standard: each run's AutoAttack-fast result beside its standard one on the same images."""
    std_dir, fast_dir = tmp_path / "std", tmp_path / "fast"
    for version, folder, aa in (("standard", std_dir, (0.50, 0.44)), ("fast", fast_dir, (0.51, 0.44))):
        for variant, acc in zip(("AT+DRA", "AT"), aa):
            r = _result(variant, 4, 0.8, 0.55, acc, tmp_path / variant) | {
                "n": 300, "offset": 0, "autoattack_version": version,
                "timings": {"autoattack": 400.0 if version == "standard" else 40.0}}
            (folder / variant).mkdir(parents=True)
            (folder / variant / "seed4.json").write_text(json.dumps(r))
    readme = tmp_path / "README.md"
    readme.write_text("a\n<!-- aa:begin -->\n<!-- aa:end -->\nb\n")
    report.run(ReportConfig(evals=str(fast_dir), aa_standard=str(std_dir), out=str(tmp_path / "r"),
                            readme=f"{readme}#aa"))
    text = readme.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| AT")]
    assert rows == ["| AT | 4 | 300 | 55.00 | 44.00 | 44.00 | +0.00 | 400 | 40 |",
                    "| AT+DRA | 4 | 300 | 55.00 | 50.00 | 51.00 | +1.00 | 400 | 40 |"]  # canonical order
    assert "+0.50 points from standard on average (range +0.00 to +1.00; above it in 1 of 2" in text
    assert "one image is 0.33 points" in text and "took 10% of its time" in text
    assert f"--aa-standard {std_dir}" in text and text.endswith("b\n")

    def refused(match: str) -> None:
        with pytest.raises(UserError, match=match):
            report.run(ReportConfig(evals=str(fast_dir), aa_standard=str(std_dir), out=str(tmp_path / "r2")))
        assert not (tmp_path / "r2").exists()

    other = json.loads((fast_dir / "AT" / "seed4.json").read_text())
    (fast_dir / "AT" / "seed4.json").write_text(json.dumps(other | {"offset": 300}))  # other images
    refused(r"not the same run on the same images \(offset 0 vs 300\)")
    (fast_dir / "AT" / "seed4.json").write_text(json.dumps(other | {"autoattack_n": 100}))  # AutoAttack on 100 of them
    refused(r"not the same run on the same images \(autoattack_n")
    (fast_dir / "AT" / "seed4.json").write_text(json.dumps(other | {"autoattack_version": "standard"}))
    refused("not a fast AutoAttack result")
    (fast_dir / "AT" / "seed4.json").unlink()
    refused(r"without their counterpart: AT seed 4 \(.*std\)")
    with pytest.raises(UserError, match="give one"):
        report.run(ReportConfig(evals=str(fast_dir), aa_standard=str(std_dir), bench="b.json", out=str(tmp_path / "r3")))


def test_readme_writes_only_between_its_markers_and_keeps_the_file(results, tmp_path):
    """CRLF outside the block, the file's mode, a symlink and a user's FILE.tmp survive; a file that
    is not UTF-8 is refused in one line and left as it was."""
    import os
    import stat

    real = tmp_path / "docs" / "RESULTS.md"
    real.parent.mkdir()
    head, tail = "# Title\r\n\r\nbefore \u00e9\r\n", "\r\nafter\r\n"
    real.write_bytes(f"{head}<!-- report:begin -->\r\nold\r\n<!-- report:end -->{tail}".encode())
    os.chmod(real, 0o600)
    link = tmp_path / "README.md"
    link.symlink_to(real)
    user_tmp = tmp_path / "README.md.tmp"
    user_tmp.write_text("a user's file\n")
    report.run(ReportConfig(evals=str(results / "eval"), train="", grid="", out=str(tmp_path / "r"),
                            readme=str(link)))
    data = real.read_bytes()
    assert data.startswith(head.encode()) and data.endswith(tail.encode()) and b"| variant" in data
    assert b"\n" not in data.replace(b"\r\n", b"")  # every line ends as the file's lines did
    assert link.is_symlink() and stat.S_IMODE(real.stat().st_mode) == 0o600
    assert user_tmp.read_text() == "a user's file\n"
    assert sorted(p.name for p in real.parent.iterdir()) == ["RESULTS.md"]  # no temporary left behind
    latin = tmp_path / "latin.md"
    latin.write_bytes("caf\u00e9\n<!-- report:begin -->\n<!-- report:end -->\n".encode("latin-1"))
    before = latin.read_bytes()
    with pytest.raises(UserError, match="not UTF-8"):
        report.run(ReportConfig(evals=str(results / "eval"), train="", grid="", out=str(tmp_path / "r2"),
                                readme=str(latin)))
    assert latin.read_bytes() == before and not (tmp_path / "r2").exists()


def _generate_json(agreement: float, guidance: float, fd: float, acc: float = 0.91, n: int = 500) -> dict:
    return {"agreement": agreement, "kept_fraction": 1.0, "filter": "none", "images_per_second": 7.5,
            "weights_sha256": "ab" * 32, "model_training_steps": 600, "classifier_test_accuracy": acc,
            "classifier": "cnn, plain CE, 10 epochs on all images of the real train split (never the test split)",
            "config": {"sampler": "ddim", "sample_steps": 20, "guidance": guidance},
            "quality": {"n": n, "k": 3, "frechet_distance": fd, "frechet_distance_real_vs_real": 0.5,
                        "precision": 0.7, "recall": 0.4, "precision_real_vs_real": 0.8, "recall_real_vs_real": 0.8}}


def test_generator_quality_table_comes_from_the_generate_jsons(tmp_path, capsys):
    """report --generator DIR: one row per DIR/NAME/generate.json, in name order, with the reference
    classifier and the real-vs-real floor said under it; settings measured with other reference
    classifiers (or sample sizes) do not compare and are refused."""
    from pipeline.cli import main

    for name, args in (("cfg-1", (0.55, 1.0, 12.5)), ("cfg-3", (0.81, 3.0, 9.25))):
        (tmp_path / "gen" / name).mkdir(parents=True)
        (tmp_path / "gen" / name / "generate.json").write_text(json.dumps(_generate_json(*args)))
    main(["report", "--generator", str(tmp_path / "gen"), "--out", str(tmp_path / "r")])
    text = (tmp_path / "r" / "report.md").read_text()
    rows = [ln for ln in text.splitlines() if ln.startswith("| cfg-")]
    assert [r.split("|")[1].strip() for r in rows] == ["cfg-1", "cfg-3"]
    assert "| 0.550 |" in rows[0] and "| 12.50 |" in rows[0] and "| 3.0 |" in rows[1] and "600 (abababab)" in rows[1]
    assert "real test accuracy 0.9100" in text and "not Inception FID" in text and "score 0.50" in text
    (tmp_path / "gen" / "other").mkdir()
    (tmp_path / "gen" / "other" / "generate.json").write_text(json.dumps(_generate_json(0.6, 1.0, 10, acc=0.8)))
    with pytest.raises(SystemExit) as exc:
        main(["report", "--generator", str(tmp_path / "gen"), "--out", str(tmp_path / "r2")])
    assert exc.value.code == 2 and "do not compare" in capsys.readouterr().err


@pytest.mark.parametrize("field, value, label", [
    ("order", {"mode": "full-shuffle", "window": 4, "rows_per_chunk": {"train": 16}}, "sample order"),
    ("model", {"weights_sha256": "b" * 64}, "upstream (diffusion model)"),
    ("eps", 0.05, "training eps"), ("attack_steps", 3, "training attack steps"),
    ("step_size", 0.01, "training attack step size")])
def test_runs_of_one_seed_that_are_not_a_pair_are_refused(tmp_path, capsys, field, value, label):
    """AT+DRA and AT of one seed that differ in sample order, upstream, or the training attack are
    refused in one line naming both runs and the field; fields a run does not record are not checked."""
    from reliability_helpers import assert_one_error_line, run_cli

    evals = tmp_path / "eval"
    evals.mkdir()
    for variant in ("AT", "AT+DRA"):
        for seed in (0, 1):
            r = _result(variant, seed, 0.8, 0.5, None, tmp_path / "none")
            order = {"mode": "chunk-aware", "window": 4, "rows_per_chunk": {"train": 16, **({"synthetic": 8} if variant == "AT+DRA" else {})}}  # not compared
            r["train_config"]["train"] |= {"order": order, "eps": 0.1, "attack_steps": 5,
                                           "step_size": 0.025}
            r["train_config"]["cache"] = {"model": {"weights_sha256": "a" * 64}}
            if variant == "AT+DRA" and seed == 1:
                if field == "model":
                    r["train_config"]["cache"]["model"] = value
                else:
                    r["train_config"]["train"][field] = value
            (evals / f"{variant}-s{seed}.json").write_text(json.dumps(r))
    code, _, err = run_cli(capsys, ["report", "--evals", evals, "--train", "", "--grid", "", "--out", tmp_path / "r"])
    line = assert_one_error_line(code, err)
    assert "AT+DRA and AT of seed 1" in line and f"differ in {label}" in line and "AT+DRA-s1.json" in line, line
    assert not (tmp_path / "r").exists()


def test_a_study_over_several_upstreams_shows_each_groups_interval_beside_the_pooled_one(tmp_path):
    evals = tmp_path / "eval"
    evals.mkdir()
    for seed in range(4):  # seeds 0-1 on one diffusion model, 2-3 on another; AT+DRA gains 1 and 3 points
        for variant, gain in (("AT", 0.0), ("AT+DRA", 0.01 if seed < 2 else 0.03)):
            r = _result(variant, seed, 0.8 + gain, 0.5 + gain + 0.001 * seed, None, tmp_path / "none")
            r["train_config"]["cache"] = {"model": {"weights_sha256": ("a" if seed < 2 else "b") * 64}}
            (evals / f"{variant}-s{seed}.json").write_text(json.dumps(r))
    report.run(ReportConfig(evals=str(evals), train="", grid="", out=str(tmp_path / "r"), baseline="AT"))
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in (tmp_path / "r" / "report.md").read_text()
            .splitlines() if line.startswith("| AT+DRA − AT")}
    assert list(rows) == ["AT+DRA − AT", f"AT+DRA − AT (upstream {'a' * 12})", f"AT+DRA − AT (upstream {'b' * 12})"]
    assert [r[0].strip() for r in rows.values()] == ["4", "2", "2"]
    assert rows[f"AT+DRA − AT (upstream {'a' * 12})"][1].strip().startswith("+1.00 [+1.00, +1.00]")
    assert rows[f"AT+DRA − AT (upstream {'b' * 12})"][1].strip().startswith("+3.00 [+3.00, +3.00]")


def test_validation_curves_report_best_last_and_drop_per_group(tmp_path, capsys):
    """``report --curves``: per group the best validation PGD (first maximum) and its epoch, the last
    validated epoch's (blank --val-every epochs skipped), the drop between them, averaged over seeds;
    a log without validation columns is one error line."""
    from reliability_helpers import assert_one_error_line, run_cli

    def log(folder, name, pgd):
        folder.mkdir(parents=True, exist_ok=True)
        rows = ["epoch\tadv_acc\tval_clean\tval_pgd"] + [
            f"{e}\t0.8\t{'' if p is None else p + 0.1}\t{'' if p is None else p}" for e, p in enumerate(pgd, 1)]
        (folder / name).write_text("\n".join(rows) + "\n")

    log(tmp_path / "logs" / "overfits", "seed0.tsv", [0.3, None, 0.6, None, 0.5])
    log(tmp_path / "logs" / "overfits", "seed1.tsv", [0.3, None, 0.5, None, 0.5])
    log(tmp_path / "logs" / "rises", "log.tsv", [0.2, 0.4, 0.6, 0.6, 0.7])
    from stages import report

    report.run(ReportConfig(curves=str(tmp_path / "logs"), out=str(tmp_path / "r")))
    out = capsys.readouterr().out
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in out.splitlines() if line.startswith("| ")}
    assert rows["overfits"][2:7] == ["2", "55.0", "3 (×2) of 5", "50.0", "5.0 (0.0 to 10.0)"]  # both seeds at 3
    assert rows["rises"][2:7] == ["1", "70.0", "5 of 5", "70.0", "0.0"]
    assert (tmp_path / "r" / "curves.png").is_file() and (tmp_path / "r" / "overfit.png").is_file()
    # the overfitting figure: one panel per group, each seed's best epoch marked, the legend clear of them
    from pipeline.report import curves, plots

    fig = curves.overfit_figure(curves.load(str(tmp_path / "logs")))
    fig.canvas.draw()
    panels = [ax for ax in fig.axes if ax.axison]
    assert [ax.get_title() for ax in panels] == ["overfits (2 seeds)", "rises (1 seed)"]
    assert [[ln.get_xdata()[0] for ln in ax.lines[2:]] for ax in panels] == [[3], [5]]
    assert [[t.get_text() for t in ax.texts] for ax in panels] == [["×2"], []]  # two seeds' best epoch: one tick
    assert plots.covered(fig) == []
    # a DRA run: its treatment strength, the mean over epochs of the gradient share and of λ·DRA / loss
    (tmp_path / "dra" / "cell").mkdir(parents=True)
    (tmp_path / "dra" / "cell" / "log.tsv").write_text(
        "epoch\tadv_acc\tval_clean\tval_pgd\tdra_weight\tdra\tloss\tdra_grad_share\n"
        "1\t0.5\t0.6\t0.4\t2.0\t0.5\t2.0\t0.2\n2\t0.6\t0.7\t0.5\t2.0\t0.25\t2.0\t0.4\n")
    report.run(ReportConfig(curves=str(tmp_path / "dra"), out=str(tmp_path / "r3")))
    cells = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| cell")).split(" | ")
    assert cells[-2:] == ["30.0", "37.5 |"]  # (0.2 + 0.4) / 2; (1.0 / 2 + 0.5 / 2) / 2
    # with the store's probe file: the DRA run's target set (its config's t and layer) and its diagnostics
    (tmp_path / "dra" / "cell" / "config.json").write_text(json.dumps({"train": {"dra_weight": 2.0, "t": 100,
                                                                                  "layer": "mid_block", "augment": False}}))
    probe = {"sets": [{"t": 100, "layer": "mid_block", "probe_accuracy": 0.81}],
             "diagnostics": {"sets": {"t100-mid_block": {"effective_rank": 15.3, "brightness_r2": 0.25}}}}
    (tmp_path / "probe.json").write_text(json.dumps(probe))
    report.run(ReportConfig(curves=str(tmp_path / "dra"), probe=str(tmp_path / "probe.json"), out=str(tmp_path / "r4")))
    cells = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| cell")).split(" | ")
    assert cells[-3:] == ["15.3", "0.25", "81.0 |"] and "no augmentation, DRA λ=2 on t=100 mid_block" in cells[1]
    (tmp_path / "bad" / "x").mkdir(parents=True)
    (tmp_path / "bad" / "x" / "log.tsv").write_text("epoch\tloss\n1\t2.0\n")
    code, _, err = run_cli(capsys, ["report", "--curves", tmp_path / "bad", "--out", tmp_path / "r2"])
    assert "not a training log with per-epoch validation" in assert_one_error_line(code, err)


def test_validation_curves_line_up_at_equal_steps(tmp_path):
    """Runs whose epochs differ in length (N = 500 and N = 1000 at one batch size) are drawn against the
    optimizer step, so equal budgets line up; logs without a step column fall back to the epoch."""
    from pipeline.report import curves

    def log(name, steps_per_epoch, pgd, step=True):
        (tmp_path / name).mkdir(exist_ok=True)
        head = "epoch\tstep\tadv_acc\tval_clean\tval_pgd" if step else "epoch\tadv_acc\tval_clean\tval_pgd"
        rows = [f"{e}\t{e * steps_per_epoch}\t0.8\t0.9\t{p}" if step else f"{e}\t0.8\t0.9\t{p}"
                for e, p in enumerate(pgd, 1)]
        (tmp_path / name / "seed0.tsv").write_text("\n".join([head, *rows]) + "\n")

    log("n500", 4, [0.1, 0.2, 0.3, 0.4])
    log("n1000", 8, [0.5, 0.6])
    groups = curves.load(str(tmp_path))
    x = curves.axis(groups)
    pts = curves.series(groups, "val_pgd", x)
    assert x == "step"
    assert pts["n500"] == {4: [10.0], 8: [20.0], 12: [30.0], 16: [40.0]}
    assert pts["n1000"] == {8: [50.0], 16: [60.0]}
    log("old", 4, [0.7], step=False)
    groups = curves.load(str(tmp_path))
    x = curves.axis(groups)
    pts = curves.series(groups, "val_pgd", x)
    assert x == "epoch" and pts["n1000"] == {1: [50.0], 2: [60.0]}
    assert curves.plot(curves.load(str(tmp_path)), tmp_path / "c.png").stat().st_size > 5000


def test_interaction_rows_and_the_detectable_difference(tmp_path):
    """``--baseline 'A:B/C:D'`` adds (A − B) − (C − D) per seed with its interval; every row gives the
    smallest PGD difference a 5% paired t-test detects with 80% power, (t_.975 + t_.80) sd / sqrt(n),
    whose t quantiles match a numerical integration of Student's density."""
    import math

    import numpy as np

    from pipeline.report.tables import T80, T975, detectable, interactions, paired_table

    def run(variant, seed, pgd):
        return {"variant": variant, "clean": 0.9, "pgd": pgd, "train_config": {"seed": seed}, "_path": f"{variant}{seed}"}

    # (A − B) − (C − D) per seed: (0.05 − 0.01) = 0.04, 0.06 − 0.00 = 0.06, 0.01 − 0.02 = −0.01
    vals = {"A": [0.55, 0.56, 0.51], "B": [0.50, 0.50, 0.50], "C": [0.41, 0.40, 0.42], "D": [0.40, 0.40, 0.40]}
    groups = {v: [run(v, s, x) for s, x in enumerate(xs)] for v, xs in vals.items()}
    inter = interactions(groups, "A:B,A:B/C:D")
    assert inter == [("A", "B", "C", "D")]
    table = paired_table(groups, [("A", "B")], inter)
    row = next(line for line in table.splitlines() if line.startswith("| (A − B) − (C − D)"))
    d = [0.04, 0.06, -0.01]
    sd = float(np.std(d, ddof=1))
    half = 4.303 * sd / 3 ** 0.5
    assert f"+{100 * np.mean(d):.2f} [{100 * (np.mean(d) - half):+.2f}, {100 * (np.mean(d) + half):+.2f}]" in row
    assert row.endswith(f"| {100 * (4.303 + 1.061) * sd / 3 ** 0.5:.2f} |") and "wins 2/3" in row
    with pytest.raises(UserError, match="an interaction is VARIANT:BASE/VARIANT:BASE"):
        interactions(groups, "A:B/C")

    x = np.linspace(0, 60, 600001)

    def quantile(df, p):  # Student's t by numerical integration of its density from 0
        c = math.gamma((df + 1) / 2) / (math.sqrt(df * math.pi) * math.gamma(df / 2))
        pdf = c * (1 + x ** 2 / df) ** (-(df + 1) / 2)
        cdf = 0.5 + np.concatenate([[0], np.cumsum((pdf[1:] + pdf[:-1]) / 2) * (x[1] - x[0])])
        return float(x[np.searchsorted(cdf, p)])

    for df in (2, 3, 4, 5, 9, 20, 30):
        assert abs(quantile(df, 0.80) - T80[df - 1]) < 2e-3, df
        assert abs(quantile(df, 0.975) - T975[df - 1]) < 2e-3, df
    assert abs(detectable([0.01, -0.01, 0.02, 0.0, 0.01]) - (2.776 + 0.941) * float(np.std([0.01, -0.01, 0.02, 0.0, 0.01], ddof=1)) / 5 ** 0.5) < 1e-12
