"""The command line: stages registered by name, closed sets listed as choices, one-line refusals."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pipeline.cli import STAGES, config_class, main


def _modules_after(argv: list[str]) -> set[str]:
    code = (f"import json, sys\nfrom pipeline.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith(('pipeline', 'stages')))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(json.loads(out.strip().splitlines()[-1]))


def test_a_stage_imports_only_its_own_config_and_the_top_level_help_none():
    loaded = _modules_after(["prepare", "--help"])
    assert "pipeline.data.config" in loaded
    others = {m for m in loaded if m.split(".")[1:2] and m.split(".")[1] in
              ("train", "cache", "evaluate", "generate", "diffusion", "report", "bench")}
    assert not others, others
    top = _modules_after(["--help"])
    assert not {m for m in top if m.endswith(".config") and m != "pipeline.core.config"}, top


def test_closed_sets_are_listed_as_choices():
    import click

    from pipeline.cli import stage_command

    want = {"train": {"method": {"pgd", "trades"}, "target_norm": {"none", "center", "whiten", "pca"},
                      "lr_schedule": {"cosine", "onecycle"}, "dra_schedule": {"constant", "linear-warmup", "cosine-decay"},
                      "arch": {"cnn", "resnet", "preact-resnet18", "wrn-28-10", "wrn-16-2", "robustbench-wrn-28-10",
                               "robustbench-preact-resnet18"}},
            "extract": {"pooling": {"mean", "flatten", "grid4", "grid7"}, "condition": {"null", "label", "none"}},
            "generate": {"sampler": {"ddim", "dpm"}}, "evaluate": {"autoattack": {"standard", "fast", "none"}}}
    for stage, options in want.items():
        cmd = stage_command(stage)
        params, ctx = {p.name: p for p in cmd.params}, click.Context(cmd)
        for name, choices in options.items():
            shown = params[name].get_help_record(ctx)[0].split()[-1]  # what --help prints: <a|b|c>
            assert set(shown.strip("<>").split("|")) == choices, (stage, name, shown)
    for stage in STAGES:  # every registered stage has a config with validate()
        assert callable(config_class(stage)().validate)


def test_unknown_choice_is_one_error_line(capsys):
    with pytest.raises(SystemExit) as ex:
        main(["extract", "--pooling", "max"])
    assert ex.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "mean" in err
