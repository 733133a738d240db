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
from pipeline.cache.store import PartInit, open_cache, verify_cache

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


def test_cka_of_sets_wider_than_their_rows_uses_the_equal_gram_form():
    """A grid target can be far wider than the rows measured: CKA then goes through N x N Gram
    matrices; it must equal the D x D formula and stay invariant to a rotation."""
    a, b = RNG.normal(size=(40, 90)), RNG.normal(size=(40, 70))
    ac, bc = a - a.mean(axis=0), b - b.mean(axis=0)
    direct = np.linalg.norm(ac.T @ bc) ** 2 / (np.linalg.norm(ac.T @ ac) * np.linalg.norm(bc.T @ bc))
    assert 90 * 70 > 40 ** 2 and linear_cka(a, b) == pytest.approx(direct, rel=1e-10)
    q, _ = np.linalg.qr(RNG.normal(size=(90, 90)))
    assert linear_cka(a, a @ q) == pytest.approx(1.0)
    grid = RNG.normal(size=(40, 8, 3, 3))  # (N, C, G, G): flattened to C*G*G per row
    assert linear_cka(grid, grid.reshape(40, -1) * 2) == pytest.approx(1.0)
    assert spectrum(grid)["effective_rank"] <= 39  # at most N - 1 directions after centring


def test_bad_input_is_one_clear_error_and_non_finite_rows_are_left_out():
    a = RNG.normal(size=(50, 4))
    with pytest.raises(ValueError, match="same rows"):
        linear_cka(a, a[:40])
    with pytest.raises(ValueError, match="one dimension"):
        centred_cosine(a, a[:, :3])
    with pytest.raises(ValueError, match="at least 2 rows"):
        spectrum(a[:1])
    with pytest.raises(ValueError, match="NaN/Inf"):
        spectrum(np.where(np.arange(50)[:, None] == 3, np.nan, a))
    with pytest.raises(ValueError, match="rows for"):
        diagnose({"x": a}, np.zeros((49, 4, 4, 1), np.uint8))
    views = RNG.integers(0, 256, (50, 4, 4, 1), dtype=np.uint8)
    bad = a.copy()
    bad[[3, 7]] = np.inf
    d, clean = diagnose({"x": bad, "y": a}, views), diagnose({"x": a[2:], "y": a[2:]}, views[2:])
    assert d["rows"] == 48 and d["non_finite_rows"] == 2 and "non_finite_rows" not in clean
    keep = np.setdiff1d(np.arange(50), [3, 7])
    assert d["sets"]["y"] == diagnose({"x": a[keep], "y": a[keep]}, views[keep])["sets"]["y"]
    from pipeline.cache.diagnostics import diagnosis_lines

    assert diagnosis_lines({"rows": 3, "error": "only\x1b[2J 1 finite row"}) == [
        "target diagnostics: not computed (only?[2J 1 finite row)"]
    assert diagnosis_lines(None) == [] and diagnosis_lines({"sets": "x"}) == []


def test_extract_measures_a_bounded_seeded_subset_of_rows_read_alone(store, monkeypatch):
    """compute_diagnostics reproduces what extract stored, and with fewer rows allowed than the part
    has it reads only a seeded subset (the same one each time)."""
    import zarr

    from pipeline.cache import build
    from pipeline.cache.store import CacheWriter

    cache = open_cache(str(store))
    part = cache.part("train")
    writer = CacheWriter(str(store), zarr.open_group(str(store), mode="r"), 1)
    name = cache.targets[0].name
    rows = np.array([1, 5, 33, 60])
    assert np.array_equal(writer.read_identity("train", name, rows), writer.read_identity("train", name)[rows])
    train = PartInit(part.read_keys(0, part.n), part.labels, part.views, np.zeros((part.n, 1), np.int64),
                     list(cache.targets), part.record)
    images, pad, seed = part.read_images(0, part.n), cache.plan.view_spec.pad, cache.plan.seed
    again = json.loads(json.dumps(build.compute_diagnostics(writer, train, images, pad, seed)))
    assert again == cache.meta.diagnostics
    monkeypatch.setattr(build, "MAX_ROWS", 20)
    small = build.compute_diagnostics(writer, train, images, pad, seed)
    assert small["rows"] == 20 and small == build.compute_diagnostics(writer, train, images, pad, seed)


def test_a_store_without_diagnostics_opens_verifies_and_reports_as_before(store, tmp_path, capsys):
    """A store written before extract measured its targets: no ``diagnostics`` attribute."""
    import shutil

    from pipeline.cache.store import attrs_digest
    from pipeline.cli import main

    old = tmp_path / "old.zarr"
    shutil.copytree(store, old)
    meta = json.loads((old / "zarr.json").read_text())
    del meta["attributes"]["diagnostics"]
    meta["attributes"]["digest"] = attrs_digest(meta["attributes"])  # as extract sealed it then
    (old / "zarr.json").write_text(json.dumps(meta))
    assert "diagnostics" not in open_cache(str(old)).attrs and verify_cache(str(old)) == []
    main(["cache", "info", str(old)])
    assert "effective rank" not in capsys.readouterr().out
    main(["cache", "probe", str(old), "--out", str(tmp_path / "probe.json")])
    assert "diagnostics" not in json.loads((tmp_path / "probe.json").read_text())


def test_each_sets_line_names_its_closest_other_set():
    from pipeline.cache.diagnostics import diagnosis_lines

    a = RNG.normal(size=(300, 5))
    views = RNG.integers(0, 256, (300, 4, 4, 1), dtype=np.uint8)
    lines = diagnosis_lines(diagnose({"t20-mid": a, "t100-mid": a + 0.01 * RNG.normal(size=a.shape),
                                      "t20-up": RNG.normal(size=(300, 3))}, views))
    assert lines[0] == "target diagnostics (300 train rows, view 0):" and len(lines) == 4
    assert "closest t100-mid (CKA 1.00)" in lines[1] and "closest t20-mid (CKA 1.00)" in lines[2]
    one = diagnosis_lines(diagnose({"x": a}, views))
    assert "closest" not in one[1]
    odd = {"sets": {"x": {"effective_rank": 1.0, "top_share": 1.0, "dims_90": 1, "brightness_r2": 0.5,
                          "pixels_r2": 0.5}}, "similarity": [{"a": "x", "b": 3, "cka": 0.9}, "junk"]}
    assert "closest" not in diagnosis_lines(odd)[1]
