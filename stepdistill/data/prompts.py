"""User data for recipes: prompt files and captioned image folders.

* ``--prompts_file``: ``.txt`` (one prompt per line) or ``.jsonl`` (objects with a ``"prompt"``
  or ``"text"`` field).
* ``--train_data_dir``: a folder of images with ``metadata.jsonl`` rows ``{"file_name": ..., "text": ...}``
  (the layout of diffusers' ImageFolder datasets).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def read_prompts(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no prompts file at {path}")
    if path.suffix == ".jsonl":
        prompts = []
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if "prompt" not in row and "text" not in row:
                raise ValueError(f"{path}:{number} has neither a 'prompt' nor a 'text' field")
            prompts.append(row.get("prompt", row.get("text")))
    else:
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts


def read_image_folder(folder: str | Path, size: int) -> tuple[torch.Tensor, list[str]]:
    """Images ``(N, 3, size, size)`` in [-1, 1] (centre-cropped, resized) and their captions."""
    folder = Path(folder)
    metadata = folder / "metadata.jsonl"
    if not metadata.is_file():
        raise FileNotFoundError(f"{folder} needs a metadata.jsonl with one {{\"file_name\", \"text\"}} object per image")
    images, captions = [], []
    for line in metadata.read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        picture = Image.open(folder / row["file_name"]).convert("RGB")
        side = min(picture.size)
        left, top = (picture.width - side) // 2, (picture.height - side) // 2
        picture = picture.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
        images.append(np.asarray(picture))
        captions.append(row["text"])
    if not images:
        raise ValueError(f"{metadata} lists no images")
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1, captions
