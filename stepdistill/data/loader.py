"""Examples as tensors for a ``torch.utils.data.DataLoader``: read, cropped and flipped in its workers.

A loader's keys are ``(index, place)`` pairs from :class:`~stepdistill.data.order.EpochOrder`: the
example to read, and its place in the one-process stream, which seeds the example's random crop and
flip, so that batches are the same with any number of workers or processes and after a resume.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from stepdistill.data.prompts import DataError, square_crop
from stepdistill.data.sources import Source

BAD_IMAGE_CHOICES = ("stop", "skip")


class TrainingExamples(Dataset):
    """``dataset[(index, place)]`` → ``{"caption", "pixels"}`` (``(3, size, size)`` uint8), or
    ``{"caption", "skipped"}`` naming an unreadable image when ``on_bad_image == "skip"`` (with
    ``"stop"`` it raises :class:`DataError`). Images are the largest square, centred or (without
    ``center_crop``) at a random offset, resized to ``size``, flipped left-right at random with ``random_flip``."""

    def __init__(self, source: Source, size: int, center_crop: bool = True, random_flip: bool = False,
                 seed: int = 0, on_bad_image: str = "stop") -> None:
        if on_bad_image not in BAD_IMAGE_CHOICES:
            raise ValueError(f"on_bad_image is one of {BAD_IMAGE_CHOICES} (got {on_bad_image!r})")
        self.source, self.size, self.center_crop, self.random_flip = source, size, center_crop, random_flip
        self.seed, self.on_bad_image = seed, on_bad_image

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, place = key
        example = self.source[index]
        if example.open_image is None:
            return {"caption": example.caption}
        try:
            picture = example.open_image()
        except DataError as error:
            if self.on_bad_image == "stop":
                raise DataError(f"{error} (--on_bad_image skip passes over unreadable images)") from None
            return {"caption": example.caption, "skipped": str(error)}
        draws = np.random.default_rng([self.seed, place]).random(2)  # the crop's offset, the flip
        pixels = square_crop(picture, self.size, 0.5 if self.center_crop else draws[0])
        if self.random_flip and draws[1] < 0.5:
            pixels = pixels[:, ::-1]
        return {"caption": example.caption, "pixels": torch.from_numpy(np.array(pixels)).permute(2, 0, 1).contiguous()}

    def __len__(self) -> int:
        return len(self.source)

    def caption(self, index: int) -> str:
        return self.source.caption(index)


def collate(items: list[dict]) -> dict:
    """A batch: ``captions`` and ``images`` ``(B, 3, H, W)`` in [-1, 1] (when the examples have them) of
    the readable examples, ``latents`` and ``condition`` when they come from a cache, and ``skipped``,
    the reasons the others were passed over."""
    kept = [item for item in items if "skipped" not in item]
    batch = {"captions": [item["caption"] for item in kept], "skipped": [i["skipped"] for i in items if "skipped" in i]}
    if kept and "pixels" in kept[0]:
        batch["images"] = torch.stack([item["pixels"] for item in kept]).float() / 127.5 - 1
    if kept and "latents" in kept[0]:
        batch["latents"] = torch.stack([item["latents"] for item in kept])
    if kept and "condition" in kept[0]:
        batch["condition"] = {name: torch.stack([item["condition"][name] for item in kept]) for name in kept[0]["condition"]}
    return batch
