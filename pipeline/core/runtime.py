"""Where a stage runs: one CPU process (no accelerate), or accelerate (GPU and/or >1 process).

``Dist`` is the small part every sample-parallel stage (extract, generate, evaluate) needs: rank,
world size, device, barrier and gathering a Python object from every process. Training's
``Runtime`` (pipeline/train/runtime.py) adds what only training needs on top (DDP wrapping,
autocast, backward, averaging).

Under ``accelerate launch`` (WORLD_SIZE > 1) the model is wrapped for data-parallel gradient sync
(DDP via accelerate), mixed precision is bf16 on GPUs, and per-epoch statistics are averaged over
processes. A plain CPU run imports nothing from accelerate.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path
from typing import Any

import torch

from pipeline.core.errors import UserError


def cpu_model(cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """The processor as /proc/cpuinfo names it, with its family and model numbers (VMs often name
    only the vendor line, e.g. "AMD EPYC": the numbers tell a Zen 3 from a Zen 4 with native bf16)."""
    try:
        info = {}
        for line in Path(cpuinfo).read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
        if "model name" in info:
            return f"{info['model name']} (family {info.get('cpu family', '?')} model {info.get('model', '?')})"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask; all of them where there is none)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB.

    Important: on Linux, ``ru_maxrss`` survives fork + exec, so a child started by a large
    parent reports the parent's size; ``VmHWM`` belongs to the process's own address space.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**10
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def choose_device(device: str = "auto") -> torch.device:
    """The device a ``--device`` flag names: auto (CUDA when there is one), cpu, cuda or cuda:N."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    if device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit()):
        if not torch.cuda.is_available():
            raise UserError(f"--device {device}, but no CUDA device is available")
        return torch.device(device)
    raise UserError(f"--device {device!r}: choose auto, cpu or cuda[:N]")


def cpu_has_native_bf16() -> bool:
    """THE probe of what the processor offers: native bf16 instructions (AVX512-BF16 / AMX), as
    oneDNN reports them. Every capability-dependent branch asks this one function (through
    ``bf16_autocast`` / ``precision``), so tests force it both ways with one monkeypatch."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without the probe: stay in fp32
        return False


def bf16_autocast(device: str | torch.device) -> bool:
    """Whether bf16 autocast pays on ``device``: always on CUDA; on a CPU only with native bf16
    instructions. Without them oneDNN emulates bf16: measured on a 2-core AVX2-only AMD EPYC, a
    default diffusion step took 18.5 s under bf16 autocast and 2.3 s in fp32."""
    if torch.device(device).type != "cpu":
        return True
    return cpu_has_native_bf16()


def precision(bf16: bool, device: str | torch.device) -> str:
    """What a stage asked to run in bf16 (``bf16``) actually runs in on ``device``: "bf16" or "fp32".
    Outputs record this, not the request: weights and images differ between the two."""
    return "bf16" if bf16 and bf16_autocast(device) else "fp32"


def launched_world() -> int:
    """Processes started by ``accelerate launch`` / torchrun (1 for a plain command)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


class Dist:
    """Rank, world size, device and collectives: accelerate's process group when launched with >1 process."""

    def __init__(self) -> None:
        self.state: Any = None
        if launched_world() > 1:
            from accelerate import PartialState  # lazy: single-process runs do not need it

            # important: PartialState ignores ACCELERATE_USE_CPU; without cpu=True it silently runs
            # every process as rank 0 of 1 on a machine without CUDA
            self.state = PartialState(cpu=not torch.cuda.is_available())
        self.rank = self.state.process_index if self.state else 0
        self.world = self.state.num_processes if self.state else 1
        self.device = self.state.device if self.state else torch.device("cuda" if torch.cuda.is_available() else "cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.state:
            self.state.wait_for_everyone()

    def gather(self, obj: Any) -> list[Any]:
        """``obj`` of every process, in rank order (``[obj]`` with one process)."""
        if self.world == 1:
            return [obj]
        from accelerate.utils import gather_object

        return gather_object([obj])

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every process (pickled; for small things such as a classifier)."""
        if self.world == 1:
            return obj
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([obj if self.is_main else None])[0]
