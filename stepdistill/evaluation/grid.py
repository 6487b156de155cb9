"""Image grids: the quickest honest look at what a model makes."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from PIL import Image


def save_grid(images: torch.Tensor, path: str | Path, num_columns: int = 10, upscale: int = 2) -> Path:
    """Tile ``(N, 3, H, W)`` images in [-1, 1] row by row into one PNG (nearest-neighbour ``upscale``)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"save_grid takes (N, 3, H, W) images (got {tuple(images.shape)})")
    n, _, height, width = images.shape
    rows = math.ceil(n / num_columns)
    canvas = torch.full((3, rows * height, num_columns * width), -1.0)
    for i, image in enumerate(images):
        r, c = divmod(i, num_columns)
        canvas[:, r * height : (r + 1) * height, c * width : (c + 1) * width] = image.float()
    pixels = ((canvas.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    picture = Image.fromarray(pixels)
    if upscale > 1:
        picture = picture.resize((picture.width * upscale, picture.height * upscale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path)
    return path
