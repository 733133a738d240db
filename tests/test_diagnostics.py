"""Target diagnostics: each measure against a case whose answer is known in closed form, and the
figures extract writes into the store (under its digest) and `cache info` shows."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.cache.diagnostics import (
    brightness_r2,
    centred_cosine,
    diagnose,
    linear_cka,
    pixels_r2,
    spectrum,
)
from pipeline.cache.store import open_cache, verify_cache

RNG = np.random.default_rng(0)


def test_effective_rank_of_a_rank_one_and_of_an_isotropic_target():
    one = RNG.normal(size=(400, 1)) @ RNG.normal(size=(1, 12)) + 5.0  # an offset changes nothing: centred
    assert spectrum(one) == {"effective_rank": pytest.approx(1.0), "top_share": pytest.approx(1.0),
                             "dims_90": 1, "dims_99": 1}
    iso = spectrum(RNG.normal(size=(20000, 12)))
    assert 11.8 < iso["effective_rank"] <= 12 and iso["top_share"] < 0.1 and iso["dims_99"] == 12
    two = np.concatenate([RNG.normal(size=(20000, 1)) * 3, RNG.normal(size=(20000, 1))], axis=1)  # variances 9:1
    p = np.array([0.9, 0.1])
    assert spectrum(two)["effective_rank"] == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=0.02)
    assert spectrum(two)["dims_90"] == 1 and spectrum(two)["dims_99"] == 2


def test_brightness_and_pixels_explain_what_they_should():
    images = RNG.integers(0, 256, (600, 8, 8, 1)).astype(np.float64) / 255
    bright = images.reshape(600, -1).mean(axis=1)
    exact = np.outer(bright, RNG.normal(size=6)) + 2.0  # an affine function of brightness
    assert brightness_r2(exact, bright) == pytest.approx(1.0)
    assert abs(brightness_r2(RNG.normal(size=(600, 6)), bright)) < 0.05
    linear = images.reshape(600, -1) @ RNG.normal(size=(64, 6))  # a linear map of the pixels
    assert pixels_r2(linear, images) > 0.9
    assert pixels_r2(RNG.normal(size=(600, 6)), images) < 0.05  # held-out: noise is not explained


def test_similarity_of_rotated_scaled_and_independent_sets():
    a = RNG.normal(size=(3000, 10))
    q, _ = np.linalg.qr(RNG.normal(size=(10, 10)))
    assert linear_cka(a, 3 * a @ q) == pytest.approx(1.0)  # a rotation and a scale: the same information
    assert linear_cka(a, RNG.normal(size=(3000, 7))) < 0.05  # independent, another dimension
    assert centred_cosine(a, a + 10) == pytest.approx(1.0) and centred_cosine(a, -a) == pytest.approx(-1.0)
    d = diagnose({"x": a[:, :4], "y": a[:, :4] * 2, "z": a[:, :3]}, RNG.integers(0, 256, (3000, 4, 4, 1), dtype=np.uint8))
    pairs = {(p["a"], p["b"]): p for p in d["similarity"]}
    assert pairs[("x", "y")]["centred_cosine"] == pytest.approx(1.0) and "centred_cosine" not in pairs[("x", "z")]
    assert set(d["sets"]) == {"x", "y", "z"} and d["rows"] == 3000


def test_extract_writes_the_diagnostics_under_the_digest_and_info_shows_them(store, tmp_path, capsys):
    import shutil

    from pipeline.cli import main

    cache = open_cache(str(store))
    diag = cache.attrs["diagnostics"]
    assert set(diag["sets"]) == {s.name for s in cache.targets}
    for d in diag["sets"].values():
        assert 1 <= d["effective_rank"] <= cache.part("train").d and 0 < d["top_share"] <= 1
        assert -1 <= d["pixels_r2"] <= 1 and 0 <= d["brightness_r2"] <= 1
    main(["cache", "info", str(store)])
    assert "effective rank" in capsys.readouterr().out
    copy = tmp_path / "copy.zarr"
    shutil.copytree(store, copy)
    meta = json.loads((copy / "zarr.json").read_text())
    name = next(iter(meta["attributes"]["diagnostics"]["sets"]))
    meta["attributes"]["diagnostics"]["sets"][name]["effective_rank"] = 60.0  # a nicer-looking target
    (copy / "zarr.json").write_text(json.dumps(meta))
    assert any("digest" in p for p in verify_cache(str(copy))), verify_cache(str(copy))


def test_the_sweep_table_shows_each_sets_rank_and_brightness_where_the_probe_file_has_them():
    from test_report import _sweep_run

    from pipeline.report import sweep

    runs = sweep.check_runs([_sweep_run(t, "mid_block", w, 0.8, 0.5) for t in (20, 100) for w in (0.0, 0.5)])
    probe = {"sets": [{"t": 20, "layer": "mid_block", "probe_accuracy": 0.7}],
             "diagnostics": {"sets": {"t20-mid_block": {"effective_rank": 2.2, "brightness_r2": 0.66}}}}
    rows = [line for line in sweep.markdown(runs, probe).splitlines() if line.startswith("| ")]
    assert "eff. rank | brightness R² |" in rows[0]
    assert rows[1].startswith("| mid_block | 20 | 70.0 | 2.2 | 0.66 |") and "| - | - |" in rows[2]
    plain = sweep.markdown(runs, {"sets": probe["sets"]})  # a probe file without diagnostics: as before
    assert "eff. rank" not in plain
