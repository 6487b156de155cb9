"""The digit classifier behind the offline metrics (FD-digits and prompt accuracy).

A small CNN trained by ``recipes/train_teacher.py`` on the train split of the digits and shipped
beside the teacher. Its 128-d penultimate activations play the role Inception's pool features play
in FID; its argmax plays the role of CLIP in checking that an image shows what the prompt asked.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

FEATURE_DIM = 128


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1), nn.GroupNorm(8, c_out), nn.SiLU(),
        nn.Conv2d(c_out, c_out, 3, padding=1), nn.GroupNorm(8, c_out), nn.SiLU(),
    )


class DigitClassifier(nn.Module):
    """``(N, 3, 32, 32)`` images in [-1, 1] → logits ``(N, 10)``; ``features`` gives ``(N, 128)``."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _block(3, 32), nn.AvgPool2d(2),  # 16×16
            _block(32, 64), nn.AvgPool2d(2),  # 8×8
            _block(64, FEATURE_DIM), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(FEATURE_DIM, 10)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1:] != (3, 32, 32):
            raise ValueError(f"the digit classifier takes (N, 3, 32, 32) images in [-1, 1] (got {tuple(images.shape)})")
        return self.body(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))

    def save(self, path: str | Path) -> None:
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(path))

    @classmethod
    def load(cls, path: str | Path) -> "DigitClassifier":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no digit classifier at {path}; run `python recipes/train_teacher.py` to make one")
        model = cls()
        model.load_state_dict(load_file(str(path)))
        return model.eval().requires_grad_(False)
