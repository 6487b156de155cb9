"""The embedded dataset: scikit-learn's handwritten digits as a tiny text-to-image task.

``sklearn.datasets.load_digits`` ships 1,797 grey 8×8 images (ink values 0–16) of the
digits 0–9. We upsample them bilinearly to 32×32, repeat the grey channel into RGB and
scale to [-1, 1], the range diffusers' VAEs expect. Each image is captioned
``"a handwritten digit <name>"``.

The split is fixed and documented: a class-stratified 75 / 25 split drawn with
``random_state=0`` (1,347 train, 450 held out). Everything that learns (teacher, VAE,
classifier, recipes that see real images) uses ``train`` only; FD-digits is always measured
against ``heldout``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
IMAGE_SIZE = 32
HELDOUT_FRACTION = 0.25
SPLIT_SEED = 0
SPLITS = ("train", "heldout")


def prompt_for(label: int) -> str:
    """The caption of a digit class, e.g. ``prompt_for(7) == "a handwritten digit seven"``."""
    if not 0 <= label <= 9:
        raise ValueError(f"a digit label is in 0..9 (got {label})")
    return f"a handwritten digit {DIGIT_NAMES[label]}"


def label_of(prompt: str) -> int | None:
    """The digit a prompt asks for (its last word), or ``None`` when it names no digit."""
    words = prompt.strip().lower().split()
    return DIGIT_NAMES.index(words[-1]) if words and words[-1] in DIGIT_NAMES else None


def evaluation_prompts(num_samples: int) -> list[str]:
    """``num_samples`` prompts cycling through the ten digits (100 per digit for 1,000)."""
    if num_samples <= 0:
        raise ValueError(f"num_samples must be ≥ 1 (got {num_samples})")
    return [prompt_for(i % 10) for i in range(num_samples)]


@dataclass(frozen=True)
class DigitsSplit:
    """Images ``(N, 3, 32, 32)`` float32 in [-1, 1], labels ``(N,)`` int64 and their prompts."""

    images: torch.Tensor
    labels: torch.Tensor

    @property
    def prompts(self) -> list[str]:
        return [prompt_for(int(y)) for y in self.labels]

    def __len__(self) -> int:
        return len(self.labels)


def to_images(pixels_8x8: torch.Tensor) -> torch.Tensor:
    """Map raw digits ``(N, 64)`` with ink in [0, 16] to ``(N, 3, 32, 32)`` in [-1, 1]."""
    grey = (pixels_8x8.float() / 16.0).reshape(-1, 1, 8, 8)
    grey = F.interpolate(grey, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    return (grey.clamp(0, 1) * 2 - 1).repeat(1, 3, 1, 1).contiguous()


def load_digits(split: str) -> DigitsSplit:
    """The ``train`` (1,347) or ``heldout`` (450) split, always the same images in the same order."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} (got {split!r})")
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    data = sklearn_digits()
    indices = torch.arange(len(data.target)).numpy()
    train_idx, heldout_idx = train_test_split(
        indices, test_size=HELDOUT_FRACTION, random_state=SPLIT_SEED, stratify=data.target
    )
    chosen = train_idx if split == "train" else heldout_idx
    return DigitsSplit(
        images=to_images(torch.from_numpy(data.data[chosen])),
        labels=torch.from_numpy(data.target[chosen]).long(),
    )
