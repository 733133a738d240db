"""`report --model-card`: a RobustBench leaderboard entry for a run evaluated with standard AutoAttack,
and (in the main environment, which has no RobustBench) `evaluate --robustbench` saying in one line
where RobustBench is."""

from __future__ import annotations

import importlib.util
import json

import pytest
from reliability_helpers import assert_one_error_line, run_cli

from pipeline.cli import main
from pipeline.report.model_card import model_card

# the fields of RobustBench's leaderboard files (RobustBench/robustbench model_info/cifar10/Linf/*.json)
CARD_FIELDS = ["link", "name", "authors", "additional_data", "number_forward_passes", "dataset", "venue",
               "architecture", "eps", "clean_acc", "reported", "autoattack_acc", "footnote", "unreliable"]


def _result(**change) -> dict:
    res = {"variant": "DM-AT+DRA", "clean": 0.8312, "pgd": 0.51, "autoattack": 0.4887, "n": 500, "offset": 0,
           "eps": 8 / 255, "threat_model": "Linf", "autoattack_version": "standard", "warnings": [],
           "train_config": {"arch": "wrn-28-10", "in_channels": 3, "image_size": 32, "num_classes": 10,
                            "train": {"synthetic_fraction": 0.7, "dra_weight": 0.5}}}
    return {**res, **change}


def test_the_card_has_robustbenchs_fields_and_the_evaluations_numbers():
    card = model_card(_result())
    assert list(card) == CARD_FIELDS
    assert card["clean_acc"] == "83.12" and card["autoattack_acc"] == card["reported"] == "48.87"
    assert card["eps"] == "8/255" and card["dataset"] == "cifar10" and card["architecture"] == "WideResNet-28-10"
    assert card["additional_data"] is False and card["unreliable"] is False and card["number_forward_passes"] == 1
    assert "500 test images" in card["footnote"] and "70%" in card["footnote"] and "0.5" in card["footnote"]
    assert model_card(_result(eps=0.031))["eps"] == "0.031"  # not a whole number of 255ths: as it is


def test_report_writes_the_card_and_refuses_what_is_not_a_standard_autoattack_result(tmp_path, capsys):
    good, fast = tmp_path / "good.json", tmp_path / "fast.json"
    good.write_text(json.dumps(_result()))
    fast.write_text(json.dumps(_result(autoattack_version="fast")))
    main(["report", "--model-card", str(good), "--out", str(tmp_path / "card")])
    card = json.loads((tmp_path / "card" / "model_card.json").read_text())
    assert card == model_card(_result())
    for bad, want in ((fast, "needs standard AutoAttack"), (tmp_path / "none.json", "not a readable JSON")):
        code, _, err = run_cli(capsys, ["report", "--model-card", bad, "--out", tmp_path / "card2"])
        assert want in assert_one_error_line(code, err)
        assert not (tmp_path / "card2").exists()
    failed = tmp_path / "failed.json"
    failed.write_text(json.dumps(_result(warnings=["pgd above clean"])))
    code, _, err = run_cli(capsys, ["report", "--model-card", failed, "--out", tmp_path / "card3"])
    assert "checks failed" in assert_one_error_line(code, err)


@pytest.mark.skipif(importlib.util.find_spec("robustbench") is not None, reason="RobustBench is installed here")
def test_evaluate_robustbench_without_robustbench_says_where_it_is(tmp_path, capsys):
    code, _, err = run_cli(capsys, ["evaluate", "--robustbench", "Standard", "--out", tmp_path / "x.json"])
    assert "make setup-robustbench" in assert_one_error_line(code, err)
    assert not (tmp_path / "x.json").exists()
