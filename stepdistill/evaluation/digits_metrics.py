"""Offline metrics on the digits task: FD-digits and prompt accuracy.

* **FD-digits**: the Fréchet distance (FID's formula) between the shipped classifier's 128-d
  features of generated images and of the held-out real split (450 images).
* **Prompt accuracy**: the share of generated images the classifier labels as the digit their
  prompt asked for (the offline stand-in for CLIP score).
* **Real-vs-real floor**: FD-digits of ``n`` train images against the held-out split, the value a
  perfect generator would get at the same sample size (FD is biased upwards for small sets).
* **Train-copy share** (the memorisation check for recipes that see real images): the share of
  generated images whose nearest train image, in the same feature space, is closer than the
  ``COPY_QUANTILE`` quantile of the held-out images' nearest-train distances. Unseen real digits score
  ``COPY_QUANTILE`` (5%) by construction; a student that copies its training images scores more.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import torch

from stepdistill.assets import DIGITS_CLASSIFIER
from stepdistill.data import digits
from stepdistill.evaluation.classifier import DigitClassifier
from stepdistill.evaluation.frechet import frechet_distance

COPY_QUANTILE = 0.05


def nearest_distance(features: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Each row's Euclidean distance to its nearest row of ``candidates`` (in float64)."""
    return torch.cdist(features.double(), candidates.double()).min(dim=1).values


class DigitsEvaluator:
    """Scores ``(N, 3, 32, 32)`` images in [-1, 1] against the held-out digits."""

    def __init__(self, classifier_path: str | Path = DIGITS_CLASSIFIER, batch_size: int = 500) -> None:
        self.classifier = DigitClassifier.load(classifier_path)
        self.batch_size = batch_size
        self.reference_features = self.features(digits.load_digits("heldout").images)

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.classifier.features(chunk.float()) for chunk in images.split(self.batch_size)])

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.classifier(chunk.float()).argmax(1) for chunk in images.split(self.batch_size)])

    def fd(self, images: torch.Tensor) -> float:
        return frechet_distance(self.features(images), self.reference_features)

    def prompt_accuracy(self, images: torch.Tensor, prompts: list[str]) -> float:
        labels = [digits.label_of(p) for p in prompts]
        if None in labels:
            raise ValueError("prompt accuracy needs digit prompts such as 'a handwritten digit seven'")
        return (self.predict(images) == torch.tensor(labels)).float().mean().item()

    def evaluate(self, images: torch.Tensor, prompts: list[str]) -> dict[str, float]:
        if images.shape[1:] != (3, digits.IMAGE_SIZE, digits.IMAGE_SIZE):
            raise ValueError(
                f"FD-digits scores 32×32 RGB digits; these images are {tuple(images.shape[1:])}. "
                "For other models use FID/CLIP (--inception_weights / --clip_model)."
            )
        return {"fd_digits": self.fd(images), "prompt_accuracy": self.prompt_accuracy(images, prompts)}

    def train_copy_share(self, images: torch.Tensor) -> float:
        """The share of ``images`` nearer (in feature space) to a train image than all but
        ``COPY_QUANTILE`` of the held-out digits are; about ``COPY_QUANTILE`` for unseen real data."""
        train_features, threshold = self._copy_reference
        return (nearest_distance(self.features(images), train_features) < threshold).float().mean().item()

    @cached_property
    def _copy_reference(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The train split's features and the ``COPY_QUANTILE`` quantile of the held-out digits' distances to them."""
        train_features = self.features(digits.load_digits("train").images)
        return train_features, torch.quantile(nearest_distance(self.reference_features, train_features), COPY_QUANTILE)

    def real_floor(self, num_samples: int) -> float:
        """FD-digits of the first ``num_samples`` train images (at most 1,347) against the held-out split."""
        train = digits.load_digits("train")
        return self.fd(train.images[: min(num_samples, len(train))])
