"""Run a command under ``accelerate launch`` with several CPU processes (tests only).

Important: on CPU it takes ``ACCELERATE_USE_CPU=true ... --multi_gpu --num_processes N``;
``accelerate launch --cpu --num_processes N`` silently runs one process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def accelerate_run(argv: list[str], *, processes: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    """``accelerate launch ... ARGV`` (a script and its arguments, or ``-m module ...``) on CPU processes,
    one torch thread each."""
    cmd = [str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu", "--num_processes",
           str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           *map(str, argv)]
    # PYTHONPATH: a launched script imports this checkout's pipeline, not another install of it
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def accelerate_launch(args: list[str], *, processes: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m pipeline ARGS`` under ``accelerate_run``."""
    return accelerate_run(["-m", "pipeline", *args], processes=processes, timeout=timeout)
