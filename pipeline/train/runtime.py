"""Where training runs: ``Dist`` (pipeline/core/runtime.py) plus what only training needs (DDP
wrapping, autocast, backward, averaging over processes). Under ``accelerate launch`` (WORLD_SIZE > 1)
the model is wrapped for data-parallel gradient sync, mixed precision is bf16 on GPUs, and per-epoch
statistics are averaged over processes. A plain CPU run imports nothing from accelerate.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn as nn

from pipeline.core.errors import UserError
from pipeline.core.runtime import Dist, choose_device, launched_world


class Runtime(Dist):
    """``Dist`` plus what training needs; an ``Accelerator`` on GPUs and with several processes."""

    def __init__(self, device: str = "auto") -> None:  # not super().__init__(): one state, the Accelerator's
        if device not in ("auto", "cpu", "cuda"):  # the Accelerator picks the GPU: no index here
            raise UserError(f"--device {device!r}: choose auto, cpu or cuda")
        cuda = choose_device(device).type == "cuda"
        multi = launched_world() > 1
        self.acc: Any = None
        self.state: Any = None
        self.rank, self.world, self.device = 0, 1, torch.device("cuda" if cuda else "cpu")
        self.precision = "bf16" if cuda else "fp32"  # what the loss forward runs in (the Accelerator's autocast)
        if multi or cuda:
            from accelerate import Accelerator  # lazy: single-process CPU runs do not need it

            self.acc = Accelerator(cpu=not cuda, mixed_precision="no" if self.precision == "fp32" else self.precision)
            self.state = self.acc.state
            self.rank, self.world, self.device = self.acc.process_index, self.acc.num_processes, self.acc.device

    def prepare(self, net: nn.Module) -> nn.Module:
        """The module the loss forward goes through (DDP-wrapped when there are several processes)."""
        return self.acc.prepare_model(net) if self.acc is not None and self.world > 1 else net

    def autocast(self) -> contextlib.AbstractContextManager:
        return self.acc.autocast() if self.acc is not None else contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        if self.acc is not None:
            self.acc.backward(loss)
        else:
            loss.backward()

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        """Average over processes (identity with one)."""
        return self.acc.reduce(t.to(self.device), reduction="mean") if self.world > 1 else t

    def synchronised(self, module: nn.Module) -> bool:
        """True when every process holds bit-identical parameters (always true with one process)."""
        if self.world == 1:
            return True
        flat = torch.cat([p.detach().float().flatten() for p in module.parameters()])[None].to(self.device)
        everyone = self.acc.gather(flat)
        return bool((everyone == everyone[:1]).all())
