"""extract reads its images shard by shard (SplitRows): the same keys, labels and pixels as the
whole split read into memory, each shard checked when it is decoded."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.core.errors import UserError
from pipeline.core.shards import Split, make_keys, read_split, write_split
from pipeline.core.streamed import SplitRows


def _split(tmp_path, n=50, shard_size=8):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 4, 4, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, n)
    out = tmp_path / "train"
    write_split(out, Split(images, labels, [str(c) for c in range(10)]), make_keys("s", "train", n),
                shard_size=shard_size, progress=False)
    return out, images, labels


@pytest.mark.parametrize("limit", [0, 21])
def test_rows_read_shard_by_shard_equal_the_split_read_whole(tmp_path, limit):
    path, images, labels = _split(tmp_path)
    whole, rows = read_split(path, limit=limit), SplitRows(path, limit=limit)
    assert rows.n == len(whole.keys) == (limit or 50)
    assert [k.decode() for k in rows.keys] == whole.keys and np.array_equal(rows.labels, whole.labels)
    for a, b in ((0, rows.n), (3, 17), (7, 9), (rows.n - 1, rows.n)):  # ranges across shard boundaries
        np.testing.assert_array_equal(rows.images(a, b), whole.images[a:b])
    pick = np.random.default_rng(1).choice(rows.n, 9, replace=False)
    np.testing.assert_array_equal(rows.take(pick), whole.images[pick])
    assert len(rows._cache) <= SplitRows.CACHED
    with pytest.raises(IndexError):
        rows.take(np.array([rows.n]))


def test_a_shard_damaged_after_opening_is_refused_when_it_is_decoded(tmp_path):
    path, *_ = _split(tmp_path)
    rows = SplitRows(path)
    shard = path / "shard-000003.tar"
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF
    shard.write_bytes(bytes(data))
    rows.images(0, 8)  # other shards still read
    with pytest.raises(UserError, match="checksum mismatch"):
        rows.images(20, 30)


def test_repeated_keys_are_refused_at_opening(tmp_path):
    rng = np.random.default_rng(0)
    out = tmp_path / "dup"
    split = Split(rng.integers(0, 256, (4, 2, 2, 1), dtype=np.uint8), np.arange(4) % 2, ["a", "b"])
    write_split(out, split, ["k-0", "k-1", "k-2", "k-3"], shard_size=2, progress=False)
    import json
    fp = json.loads((out / "fingerprint.json").read_text())
    (out / "shard-000001.tar").write_bytes((out / "shard-000000.tar").read_bytes())  # keys k-0, k-1 twice
    fp["shards"][1] = dict(fp["shards"][0], name="shard-000001.tar")
    from pipeline.core.shards import shards_digest
    fp["shards_digest"] = shards_digest(fp["shards"])
    (out / "fingerprint.json").write_text(json.dumps(fp))
    with pytest.raises(UserError, match="occurs more than once"):
        SplitRows(out)


def test_hostile_npy_images_are_refused_in_one_line(tmp_path):
    """A shard's .npy member is read like a PNG one is: no pickles, no other dtype, no shape beyond
    the pixel limit, exactly the bytes its header announces."""
    import hashlib
    import io
    import json

    import webdataset as wds

    from pipeline.core.members import encode_npy
    from pipeline.core.shards import make_fingerprint, shard_name

    good = encode_npy(np.zeros((4, 4, 3), np.uint8))
    obj = io.BytesIO()
    np.save(obj, np.array([{"a": 1}] * 3, dtype=object).reshape(1, 3, 1), allow_pickle=True)
    flt = io.BytesIO()
    np.save(flt, np.zeros((4, 4, 3), np.float32))
    huge = io.BytesIO()
    np.lib.format.write_array_header_1_0(huge, {"descr": "|u1", "fortran_order": False, "shape": (2**16, 2**16, 3)})
    cases = {"object": obj.getvalue(), "float": flt.getvalue(),
             "huge": huge.getvalue() + bytes(48), "short": good[:-1], "long": good + b"x"}
    for name, member in cases.items():
        out = tmp_path / name
        out.mkdir()
        buf = io.BytesIO()
        with wds.TarWriter(buf, mtime=0.0) as sink:
            sink.write({"__key__": "k-0", "npy": member, "cls": b"0"})
        data = buf.getvalue()
        (out / shard_name(0)).write_bytes(data)
        fp = make_fingerprint(1, [4, 4, 3], ["a"], [{"name": shard_name(0), "count": 1,
                                                      "sha256": hashlib.sha256(data).hexdigest()}], "x")
        (out / "fingerprint.json").write_text(json.dumps(fp))
        with pytest.raises(UserError, match="corrupted sample k-0") as exc:
            SplitRows(out).images(0, 1)
        assert "\n" not in str(exc.value), name
