"""The first digits of the train split written in every ``--train_data_dir`` layout, for tests that read them back."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from stepdistill.data import digits


def quantised_digits(count: int) -> tuple[torch.Tensor, list[str]]:
    """The first ``count`` train digits as 8-bit RGB images would hold them, in [-1, 1], and their captions."""
    train = digits.load_digits("train")
    pixels = ((train.images[:count] + 1) * 127.5).round().clamp(0, 255)
    return pixels / 127.5 - 1, train.prompts[:count]


def pictures(count: int) -> tuple[list[Image.Image], list[str]]:
    images, captions = quantised_digits(count)
    arrays = ((images + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in arrays], captions


def png_bytes(picture: Image.Image) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format="png")
    return buffer.getvalue()


def write_layouts(root: Path, count: int, shards: int = 2) -> dict[str, str]:
    """``--train_data_dir`` values of the same ``count`` digits, in order: an ImageFolder, a ``datasets``
    ``save_to_disk`` folder, a Parquet file and ``shards`` tar shards."""
    import datasets

    images, captions = pictures(count)
    folder = root / "imagefolder"
    folder.mkdir(parents=True)
    rows = []
    for index, (picture, caption) in enumerate(zip(images, captions)):
        picture.save(folder / f"{index:05d}.png")
        rows.append(json.dumps({"file_name": f"{index:05d}.png", "text": caption}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    dataset = datasets.Dataset.from_dict({"image": images, "text": captions}).cast_column("image", datasets.Image())
    dataset.save_to_disk(str(root / "saved"))
    dataset.to_parquet(str(root / "digits.parquet"))
    per_shard = -(-count // shards)
    for shard in range(shards):
        with tarfile.open(root / f"shard-{shard}.tar", "w") as tar:
            for index in range(shard * per_shard, min(count, (shard + 1) * per_shard)):
                for suffix, data in ((".png", png_bytes(images[index])), (".txt", captions[index].encode())):
                    info = tarfile.TarInfo(f"{index:05d}{suffix}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return {"imagefolder": str(folder), "datasets": str(root / "saved"), "parquet": str(root / "digits.parquet"),
            "tar": str(root / f"shard-{{0..{shards - 1}}}.tar")}
