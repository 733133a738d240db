"""What a shard's tar holds: the members of a sample (``KEY.png`` or ``KEY.npy``, ``KEY.cls``),
how an image is encoded and decoded (checked before decoding), and a fast parser of the plain tars
``write_shard`` writes."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from pipeline.core.errors import UserError

MAX_IMAGE_PIXELS = 4096 * 4096  # per image (folder sources, shards): larger ones are refused unread


def check_image(im: Image.Image, where: object) -> None:
    """Before decoding: a size a dataset can have (no decompression bomb) and 8 bits per channel.

    Important: PIL's convert("L") clips a 16-bit image to 255 instead of scaling it; this pipeline
    stores uint8, so such images are refused rather than silently saturated.
    """
    w, h = im.size
    if w * h > MAX_IMAGE_PIXELS or w == 0 or h == 0:
        raise UserError(f"{where}: image of {w}x{h} pixels refused (at most {MAX_IMAGE_PIXELS} pixels)")
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        raise UserError(f"{where}: {im.mode} image (more than 8 bits per channel); convert it to 8-bit first")


def encode_npy(image: np.ndarray) -> bytes:
    """An (H, W, C) uint8 image as a .npy file: its raw bytes behind a 128-byte header."""
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(image, np.uint8), allow_pickle=False)
    return buf.getvalue()


def decode_npy(data: bytes, where: str) -> np.ndarray:
    """A shard's .npy image, checked like a PNG one: (H, W[, C]) uint8 of a size a dataset can have,
    no pickles, exactly the bytes its header announces."""
    fh = io.BytesIO(data)
    version = np.lib.format.read_magic(fh)
    if version not in ((1, 0), (2, 0), (3, 0)):
        raise ValueError(f"unsupported .npy format version {version}")
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read_header(fh, max_header_size=10_000)
    if dtype != np.uint8 or fortran or len(shape) not in (2, 3) or (len(shape) == 3 and shape[-1] not in (1, 3)):
        raise ValueError(f"{where}: a .npy image must be C-ordered uint8 (H, W[, C]) with C 1 or 3, "
                         f"got {dtype} {shape}{' Fortran' if fortran else ''}")
    if shape[0] * shape[1] > MAX_IMAGE_PIXELS or min(shape[:2]) < 1:
        raise ValueError(f"{where}: image of {shape[1]}x{shape[0]} pixels refused (at most {MAX_IMAGE_PIXELS} pixels)")
    body = data[fh.tell():]
    if len(body) != int(np.prod(shape)):
        raise ValueError(f"{where}: .npy image of {len(body)} bytes, its header says {int(np.prod(shape))}")
    return np.frombuffer(body, np.uint8).reshape(shape)


def encode_png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buf, format="PNG")
    return buf.getvalue()


ENCODINGS = {"png": lambda image: encode_png(image), "npy": lambda image: encode_npy(image)}  # image member -> encoder


def plain_tar_samples(data: bytes) -> list[dict] | None:
    """The samples of a tar holding only regular files (ustar, pax path records: what
    ``write_shard`` writes), grouped as webdataset groups them (``KEY.EXT`` members in a row share
    their KEY); parsed from the 512-byte headers, ~10x faster than ``tarfile``. None for anything
    else (links, GNU extensions, base-256 sizes, a header that does not add up, a member repeated
    in a sample): the caller then uses webdataset's own parser, which explains what it finds."""
    samples: list[dict] = []
    pos, end, path = 0, len(data), None
    while pos + 512 <= end:
        head = data[pos:pos + 512]
        if head.count(0) == 512:
            break  # the end-of-archive blocks
        size_field = head[124:136].split(b"\0", 1)[0].strip()
        if not size_field or not all(48 <= c <= 55 for c in size_field):
            return None
        size, kind = int(size_field, 8), head[156:157]
        checksum = head[148:156].split(b"\0", 1)[0].strip()
        if not checksum or int(checksum or b"0", 8) != sum(head[:148]) + 256 + sum(head[156:]):
            return None
        body_at, pos = pos + 512, pos + 512 + -(-size // 512) * 512
        if pos > end:
            return None
        body = data[body_at:body_at + size]
        if kind == b"x":  # pax: keep only the path record ("LEN path=NAME\n")
            for record in body.split(b"\n"):
                if b" path=" in record:
                    path = record.split(b" path=", 1)[1]
            continue
        if kind not in (b"0", b"\0"):
            if kind == b"5":
                continue  # a folder
            return None
        name = path if path is not None else head[:100].split(b"\0", 1)[0]
        if head[257:262] == b"ustar" and path is None and head[345] != 0:
            name = head[345:500].split(b"\0", 1)[0] + b"/" + name
        path = None
        base = name.rsplit(b"/", 1)[-1]
        if b"." not in base:
            return None
        key, ext = name[:len(name) - len(base)] + base.split(b".", 1)[0], base.split(b".", 1)[1].lower()
        key_s, ext_s = key.decode("utf-8", "replace"), ext.decode("utf-8", "replace")
        if not samples or samples[-1]["__key__"] != key_s:
            samples.append({"__key__": key_s})
        elif ext_s in samples[-1]:
            return None
        samples[-1][ext_s] = body
    return samples
