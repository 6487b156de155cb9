"""An exponential moving average of parameters, the weights a run exports when it keeps one."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn


class EMA:
    """Exponential moving average of parameters, θ_ema ← d θ_ema + (1 − d) θ."""

    def __init__(self, parameters: list[nn.Parameter], decay: float) -> None:
        self.parameters = parameters
        self.decay = decay
        self.shadow = [p.detach().clone().float() for p in parameters]

    @torch.no_grad()
    def update(self) -> None:
        for shadow, param in zip(self.shadow, self.parameters):
            shadow.lerp_(param.detach().float(), 1 - self.decay)

    @torch.no_grad()
    def copy_to_parameters(self) -> None:
        for shadow, param in zip(self.shadow, self.parameters):
            param.copy_(shadow.to(param.dtype))

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Run a block with the averaged weights in place of the live ones, then put the live ones back."""
        live = [p.detach().clone() for p in self.parameters]
        self.copy_to_parameters()
        try:
            yield
        finally:
            with torch.no_grad():
                for saved, param in zip(live, self.parameters):
                    param.copy_(saved)

    def save(self, path: Path) -> None:
        save_file({str(i): shadow.contiguous() for i, shadow in enumerate(self.shadow)}, str(path))

    def load(self, path: Path) -> None:
        tensors = load_file(str(path))
        if len(tensors) != len(self.shadow):
            raise ValueError(f"{path} holds {len(tensors)} EMA tensors, this run has {len(self.shadow)}")
        self.shadow = [tensors[str(i)].to(p.device) for i, p in enumerate(self.parameters)]
