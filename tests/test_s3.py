"""The object-store path against a real S3 protocol peer: moto's server on 127.0.0.1, reached
through s3fs (both from the `s3` and `dev` extras). Nothing leaves this machine.

prepare -> extract -> train -> evaluate with every shard set and the cache on ``s3://``, then
`cache verify` and a second "team" (a fresh process that knows only the URL and the digest)
reading the same store.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("s3fs", reason="the s3 extra (pip install .[s3]) is not installed")
moto_server = pytest.importorskip("moto.server", reason="moto[server] (dev extra) is not installed")

from test_storage import stages_end_to_end  # noqa: E402  (tests/ is on sys.path)

from pipeline.cache.store import open_cache, verify_cache  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "team-a"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_env():
    with moto_s3() as env:
        yield env


@contextlib.contextmanager
def moto_s3():
    """A moto S3 server on loopback with bucket BUCKET; env for this process and the CLI processes
    it starts (tests/test_portability.py uses it too)."""
    import fsspec

    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": endpoint, "FSSPEC_S3_ENDPOINT_URL": endpoint}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    fsspec.config.conf.setdefault("s3", {})["endpoint_url"] = endpoint  # read once at import by fsspec
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    # important: moto keeps its buckets in process-global state, so a second server in the same
    # pytest process sees the first one's bucket: start from an empty one and leave none behind
    if fs.exists(BUCKET):
        fs.rm(BUCKET, recursive=True)
    fs.mkdir(BUCKET)
    try:
        yield env
    finally:
        with contextlib.suppress(OSError):
            fs.rm(BUCKET, recursive=True)
        server.stop()
        fsspec.config.conf.get("s3", {}).pop("endpoint_url", None)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.mark.e2e
def test_stages_end_to_end_on_s3(s3_env, fmnist_dir, tiny_model_dir, tmp_path):
    store = stages_end_to_end(f"s3://{BUCKET}/{tmp_path.name}", fmnist_dir, tiny_model_dir, tmp_path)
    digest = open_cache(store).attrs["digest"]
    assert verify_cache(store, digest=digest) == []

    # a second team: another process, the URL and the digest it was given, nothing else
    env = {**os.environ, **s3_env, "PYTHONPATH": str(ROOT)}
    run = lambda *args: subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=ROOT, env=env,  # noqa: E731
                                       capture_output=True, text=True, timeout=300)
    proc = run("cache", "verify", store, "--digest", digest)
    assert proc.returncode == 0 and proc.stdout.strip().endswith(f"{store}: ok"), proc.stderr[-2000:]
    proc = run("train", "--cache", store, "--out", str(tmp_path / "team-b"), "--epochs", "1", "--batch-size", "32",
               "--attack-steps", "1", "--head-hidden", "16", "--real-limit", "0", "--memory-budget-mb", "0")
    assert proc.returncode == 0, proc.stderr[-2000:]
    team_b = json.loads((tmp_path / "team-b" / "config.json").read_text())
    assert team_b["cache"]["digest"] == digest and team_b["cache"]["target_mode"] == "stream"
    proc = run("cache", "verify", store, "--digest", "0" * 64)
    assert proc.returncode == 2 and proc.stderr.startswith("error:")
