"""Where training runs: one CPU process (no accelerate), or accelerate (GPU and/or >1 process).

Under ``accelerate launch`` (WORLD_SIZE > 1) the model is wrapped for data-parallel gradient sync
(DDP via accelerate), mixed precision is bf16 on GPUs, and per-epoch statistics are averaged over
processes. A plain CPU run imports nothing from accelerate.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch
import torch.nn as nn

from pipeline.errors import UserError


class Runtime:
    def __init__(self, device: str = "auto") -> None:
        if device not in ("auto", "cpu", "cuda"):
            raise UserError(f"--device {device!r}: choose auto, cpu or cuda")
        if device == "cuda" and not torch.cuda.is_available():
            raise UserError("--device cuda, but no CUDA device is available")
        cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
        multi = int(os.environ.get("WORLD_SIZE", "1")) > 1
        self.acc: Any = None
        self.rank, self.world, self.device = 0, 1, torch.device("cuda" if cuda else "cpu")
        if multi or cuda:
            from accelerate import Accelerator  # lazy: single-process CPU runs do not need it

            self.acc = Accelerator(cpu=not cuda, mixed_precision="bf16" if cuda else "no")
            self.rank, self.world, self.device = self.acc.process_index, self.acc.num_processes, self.acc.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

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

    def barrier(self) -> None:
        if self.acc is not None:
            self.acc.wait_for_everyone()

    def synchronised(self, module: nn.Module) -> bool:
        """True when every process holds bit-identical parameters (always true with one process)."""
        if self.world == 1:
            return True
        flat = torch.cat([p.detach().float().flatten() for p in module.parameters()])[None].to(self.device)
        everyone = self.acc.gather(flat)
        return bool((everyone == everyone[:1]).all())
