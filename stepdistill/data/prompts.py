"""Reading users' prompts and images: prompts files, one image, its square crop; :class:`DataError`.

A prompts file is ``.txt`` (one prompt per line) or ``.jsonl`` (objects with a ``"prompt"`` or
``"text"`` field); :func:`read_prompts` reads a small one whole (evaluation prompts), and
:mod:`stepdistill.data.sources` reads training data of any size lazily with the same rules.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import BinaryIO

import numpy as np
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


def prompt_of_line(path: Path, number: int, line: str) -> str:
    """The prompt on line ``number`` of a prompts file: the line itself, or in a ``.jsonl`` file the
    object's ``"prompt"`` or ``"text"`` field; :class:`DataError` naming the line for anything else."""
    if path.suffix != ".jsonl":
        return line.strip()
    try:
        row = json.loads(line)
    except ValueError:
        raise DataError(f"{path}:{number} is not a JSON object (a .jsonl file has one per line)") from None
    prompt = row.get("prompt", row.get("text")) if isinstance(row, dict) else None
    if not isinstance(prompt, str):
        raise DataError(f"{path}:{number} has no 'prompt' or 'text' string field")
    return prompt


def read_prompts(path: str | Path) -> list[str]:
    """The prompts of a ``.txt`` (one a line) or ``.jsonl`` file, blank lines skipped; :class:`DataError`
    naming the file and line for anything else."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no prompts file at {path}")
    prompts = [prompt_of_line(path, number, line) for number, line in enumerate(_text_lines(path), 1) if line.strip()]
    if not prompts:
        raise DataError(f"{path} holds no prompts (it is empty or only blank lines)")
    return prompts


def open_image(source: Path | BinaryIO, name: str | Path) -> Image.Image:
    """The RGB image in ``source`` (a path or an open file); :class:`DataError` naming ``name`` when
    it is missing, truncated or not an image."""
    try:
        with Image.open(source) as opened:
            return opened.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise DataError(f"cannot read the image {name}: {error}") from None


def square_crop(picture: Image.Image, size: int, offset: float = 0.5) -> np.ndarray:
    """The largest square of ``picture``, ``offset`` of the way along its longer side (0.5: centred),
    resized to ``size`` (bicubic), as ``(size, size, 3)`` uint8."""
    side = min(picture.size)
    left, top = round((picture.width - side) * offset), round((picture.height - side) * offset)
    return np.asarray(picture.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC))


def square_image(path: Path, size: int) -> np.ndarray:
    """The centre square of the image at ``path``, resized to ``size``, as ``(size, size, 3)`` uint8."""
    return square_crop(open_image(path, path), size)
