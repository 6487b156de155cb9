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


class DataError(ValueError):
    """A prompts file or image folder that cannot be read; the message names the file (and line)."""


def _text_lines(path: Path) -> list[str]:
    """The lines of a UTF-8 text file; :class:`DataError` naming the line where it is not text."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise DataError(f"{path}:{line} is not UTF-8 text (byte {data[error.start]:#04x}); give a text file of "
                        "prompts") from None
    if "\x00" in text:
        line = text.count("\n", 0, text.index("\x00")) + 1
        raise DataError(f"{path}:{line} holds a NUL byte: a binary file, not a text file of prompts")
    return text.splitlines()


def read_prompts(path: str | Path) -> list[str]:
    """The prompts of a ``.txt`` (one a line) or ``.jsonl`` file, blank lines skipped; :class:`DataError`
    naming the file and line for anything else."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no prompts file at {path}")
    prompts = []
    for number, line in enumerate(_text_lines(path), 1):
        if not line.strip():
            continue
        if path.suffix != ".jsonl":
            prompts.append(line.strip())
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise DataError(f"{path}:{number} is not a JSON object (a .jsonl file has one per line)") from None
        prompt = row.get("prompt", row.get("text")) if isinstance(row, dict) else None
        if not isinstance(prompt, str):
            raise DataError(f"{path}:{number} has no 'prompt' or 'text' string field")
        prompts.append(prompt)
    if not prompts:
        raise DataError(f"{path} holds no prompts (it is empty or only blank lines)")
    return prompts


def read_image_folder(folder: str | Path, size: int) -> tuple[torch.Tensor, list[str]]:
    """Images ``(N, 3, size, size)`` in [-1, 1] (centre-cropped, resized) and their captions;
    :class:`DataError` naming the file for a bad metadata line or an unreadable image."""
    folder = Path(folder)
    metadata = folder / "metadata.jsonl"
    if not metadata.is_file():
        raise DataError(f"{folder} needs a metadata.jsonl with one {{\"file_name\", \"text\"}} object per image")
    images, captions = [], []
    for number, line in enumerate(_text_lines(metadata), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            file_name, caption = row["file_name"], row["text"]
        except (ValueError, KeyError, TypeError):
            raise DataError(f"{metadata}:{number} is not a JSON object with 'file_name' and 'text'") from None
        images.append(square_image(folder / file_name, size))
        captions.append(caption)
    if not images:
        raise DataError(f"{metadata} lists no images")
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1, captions


def square_image(path: Path, size: int) -> np.ndarray:
    """The centre square of the image at ``path``, resized to ``size``, as ``(size, size, 3)`` uint8."""
    try:
        with Image.open(path) as opened:
            picture = opened.convert("RGB")
    except (OSError, ValueError) as error:  # missing, truncated, or not an image
        raise DataError(f"cannot read the image {path}: {error}") from None
    side = min(picture.size)
    left, top = (picture.width - side) // 2, (picture.height - side) // 2
    return np.asarray(picture.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC))
