"""On-disk caches of VAE latents and text-encoder outputs: sharded safetensors files and a manifest.

    cache/shard-00000.safetensors   latents (n, C, h, w) (of images; none for a prompts file),
                                    condition.<entry> (n, ...) for every entry of the backbone's
                                    condition, captions as UTF-8 bytes with offsets
    cache/manifest.json             written last: what made the cache (``description``: teacher,
                                    resolution, crop, encoder fingerprints), the entries, the shards

Rows are read one at a time (safetensors slices), so a cache of any size loads in constant memory.
The models that fill a cache and the checks against a run's teacher live above this layer
(``python -m stepdistill cache``, :mod:`stepdistill.run.data`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import Dataset

from stepdistill.conditioning import Condition
from stepdistill.data.prompts import DataError

MANIFEST = "manifest.json"
FORMAT = 1
CONDITION_PREFIX = "condition."


class CacheWriter:
    """Append encoded batches; every ``shard_size`` rows become a shard; :meth:`close` writes the manifest."""

    def __init__(self, folder: str | Path, description: dict, shard_size: int = 4096) -> None:
        self.folder, self.description, self.shard_size = Path(folder), description, shard_size
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / MANIFEST).unlink(missing_ok=True)  # a cache being rewritten is not a cache until closed
        self.pending: list[tuple[list[str], torch.Tensor | None, Condition]] = []
        self.shards: list[dict] = []
        self.entries: list[str] | None = None
        self.has_images = False

    def add(self, captions: list[str], latents: torch.Tensor | None, condition: Condition) -> None:
        """One batch: its captions, their images' latents (``None`` without images), their condition."""
        self.entries, self.has_images = self.entries or sorted(condition), latents is not None
        latents = latents.cpu() if latents is not None else torch.empty(len(captions), 0)
        self.pending.append((captions, latents, {k: v.cpu() for k, v in condition.items()}))
        while sum(len(c) for c, _, _ in self.pending) >= self.shard_size:
            self._write_shard(self.shard_size)

    def _write_shard(self, rows: int) -> None:
        captions = [c for batch, _, _ in self.pending for c in batch]
        latents = torch.cat([latent for _, latent, _ in self.pending])
        condition = {name: torch.cat([c[name] for _, _, c in self.pending]) for name in self.entries}
        encoded = [caption.encode("utf-8") for caption in captions[:rows]]
        tensors = {
            **({"latents": latents[:rows].contiguous()} if self.has_images else {}),
            "captions": torch.frombuffer(bytearray(b"".join(encoded) or b"\0"), dtype=torch.uint8).clone(),
            "caption_offsets": torch.from_numpy(np.cumsum([0] + [len(e) for e in encoded])),
            **{CONDITION_PREFIX + name: value[:rows].contiguous() for name, value in condition.items()},
        }
        name = f"shard-{len(self.shards):05d}.safetensors"
        save_file(tensors, str(self.folder / name))
        self.shards.append({"file": name, "count": rows})
        rest = latents[rows:], {k: v[rows:] for k, v in condition.items()}
        self.pending = [(captions[rows:], *rest)] if len(captions) > rows else []

    def close(self) -> dict:
        """Write what is left and the manifest (last, atomically); the manifest."""
        left = sum(len(c) for c, _, _ in self.pending)
        if left:
            self._write_shard(left)
        manifest = {"format": FORMAT, "description": self.description, "entries": self.entries or [],
                    "has_images": self.has_images,
                    "count": sum(s["count"] for s in self.shards), "shards": self.shards}
        partial = self.folder / (MANIFEST + ".partial")
        partial.write_text(json.dumps(manifest, indent=1))
        os.replace(partial, self.folder / MANIFEST)
        return manifest


def read_manifest(folder: str | Path) -> dict:
    """A cache's manifest; :class:`DataError` when there is none (not a cache, or its writing did not finish)."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise DataError(f"{folder} is not a finished cache (no {MANIFEST}): run python -m stepdistill cache")
    try:
        manifest = json.loads(path.read_text())
    except ValueError:
        raise DataError(f"{path} is not readable JSON: rewrite the cache") from None
    if manifest.get("format") != FORMAT:
        raise DataError(f"{folder} is a cache of format {manifest.get('format')}; this version reads {FORMAT}: rewrite it")
    return manifest


class CachedExamples(Dataset):
    """``dataset[(index, place)]`` → ``{"caption", "condition", "latents"}`` of row ``index`` (no
    ``"latents"`` in a cache of prompts)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.manifest = read_manifest(folder)
        self.ends = np.cumsum([shard["count"] for shard in self.manifest["shards"]])

    def __len__(self) -> int:
        return int(self.manifest["count"])

    def _locate(self, index: int) -> tuple[Path, int]:
        shard = int(np.searchsorted(self.ends, index, side="right"))
        start = int(self.ends[shard - 1]) if shard else 0
        return self.folder / self.manifest["shards"][shard]["file"], index - start

    @staticmethod
    def _caption(file, row: int) -> str:
        start, end = file.get_slice("caption_offsets")[row : row + 2].tolist()
        return bytes(file.get_slice("captions")[start:end].numpy()).decode("utf-8") if end > start else ""

    def caption(self, index: int) -> str:
        path, row = self._locate(index)
        with safe_open(str(path), "pt") as file:
            return self._caption(file, row)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        path, row = self._locate(key[0])
        with safe_open(str(path), "pt") as file:
            item = {"caption": self._caption(file, row),
                    "condition": {name: file.get_slice(CONDITION_PREFIX + name)[row : row + 1][0]
                                  for name in self.manifest["entries"]}}
            if self.manifest["has_images"]:
                item["latents"] = file.get_slice("latents")[row : row + 1][0]
            return item
