"""What the trainer needs from a method, and the batch every method receives."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from stepdistill import conditioning
from stepdistill.conditioning import Condition

Losses = dict[str, torch.Tensor]
"""Named scalar losses; ``"loss"`` is the one to minimise, the others are logged."""


@dataclass
class Batch:
    """One training batch: the prompts' condition, the unconditional condition (both named tensors,
    :mod:`stepdistill.conditioning`), and (for methods with a GAN or data term) scaled VAE latents of
    real images ``(B, C, h, w)``."""

    condition: Condition
    unconditional: Condition
    real_latents: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return conditioning.batch_size(self.condition)

    @property
    def device(self) -> torch.device:
        return next(iter(self.condition.values())).device


class Method(Protocol):
    """A distillation method is its math: two losses and the ratio of their updates."""

    critic_steps_per_generator_step: int

    def generator_loss(self, batch: Batch) -> Losses:
        """Loss whose gradient updates the student (the trainer steps the generator optimiser)."""

    def critic_loss(self, batch: Batch) -> Losses:
        """Loss whose gradient updates the fake score and discriminator (the critic optimiser)."""

    # optional: ``after_generator_update()``, called once after every applied student update
    # (e.g. to move a consistency model's EMA target); skipped updates do not call it.
    # optional: ``state_dict() -> dict[str, Tensor]`` and ``load_state_dict(state)``, the method's own
    # state outside the optimised networks (a consistency model's EMA target), which every checkpoint
    # keeps and a resumed run restores.
    # optional: ``frozen_networks``, the networks the method holds besides those it is given (an EMA
    # target, a stage teacher's copy): on several processes the trainer lays them out like the others.
    # optional: ``begin_stage(stage)``, for methods trained in stages (``TrainerConfig.stage_steps``): called
    # before the first step of each stage k > 0 (progressive distillation's hand-over of the student to the
    # next stage's teacher); the stage the method is in belongs in its ``state_dict``.
