"""Validation during training: sample the student as it is now, save a grid, score it.

The student is sampled with the trainer's own sampler (``few_step_sample``, or ``ddim_sample`` for
deterministic students; each equals its exported diffusers pipeline on the same noise, see
tests/test_export.py) and decoded with the teacher's VAE, so a validation number means the same as the
final report's at the same sample count.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch
from accelerate import PartialState

from stepdistill import conditioning
from stepdistill.conditioning import Condition
from stepdistill.diffusion import NoiseProcess, Prediction, ddim_sample, few_step_sample
from stepdistill.evaluation.digits_metrics import DigitsEvaluator
from stepdistill.evaluation.grid import save_grid
from stepdistill.evaluation.sampling import initial_noise
from stepdistill.models.teacher import Teacher


class StudentModel(Protocol):
    """What validation samples: ``student(x_t, t, condition).x0`` on the noise process ``student.process``
    (a :class:`Denoiser`, or a method's wrapper of one, e.g. a consistency function)."""

    process: NoiseProcess

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, condition: Condition) -> Prediction: ...


class StudentValidator:
    """``validator(step)`` → metrics of the student on fixed prompts and noise; writes ``validation/step-N.png``.

    Metrics are FD-digits and prompt accuracy when a :class:`DigitsEvaluator` is given (the digits
    teacher), otherwise none: the grid is then the thing to look at. ``timesteps`` may be a function
    that gives them at each validation (a staged method's current student); ``deterministic`` samples
    by DDIM steps instead of re-noising with fresh noise.
    """

    def __init__(
        self,
        teacher: Teacher,
        student: StudentModel,
        timesteps: tuple[float, ...] | Callable[[], tuple[float, ...]],
        prompts: list[str],
        output_dir: str | Path,
        evaluator: DigitsEvaluator | None = None,
        seed: int = 0,
        batch_size: int = 250,
        deterministic: bool = False,
    ) -> None:
        self.teacher, self.student, self.deterministic = teacher, student, deterministic
        self.timesteps = timesteps if callable(timesteps) else lambda: timesteps
        self.prompts, self.evaluator, self.batch_size = prompts, evaluator, batch_size
        self.output_dir = Path(output_dir) / "validation"
        self.condition = teacher.encode_prompts(prompts)
        self.noise = initial_noise(teacher.pipeline, len(prompts), seed, teacher.resolution)
        self.seed = seed

    @torch.no_grad()
    def sample(self) -> torch.Tensor:
        """Images ``(N, 3, H, W)`` in [-1, 1] from the student's ``len(timesteps)``-step sampler."""
        device = self.teacher.network.device
        generator = torch.Generator().manual_seed(self.seed)  # re-noising draws, as ``sampling.generate`` makes them
        timesteps, images = self.timesteps(), []
        for noise, condition in zip(self.noise.split(self.batch_size), conditioning.split(self.condition, self.batch_size)):
            condition = conditioning.to(condition, device)
            if self.deterministic:
                latents = ddim_sample(lambda x, t: self.student(x, t, condition), noise.to(device), timesteps,
                                      self.student.process)
            else:
                latents = few_step_sample(
                    lambda x, t: self.student(x, t, condition).x0, noise.to(device), timesteps,
                    self.student.process, generator=generator, draw_noise=self.teacher.backbone.draw_noise,
                )
            images.append(self.teacher.decode_latents(latents).cpu())
        return torch.cat(images)

    def __call__(self, step: int) -> dict[str, float]:
        images = self.sample()
        if PartialState().is_main_process:  # every process samples when the student is sharded over them
            save_grid(images[:100], self.output_dir / f"step-{step}.png")
        if self.evaluator is None:
            return {}
        scores = self.evaluator.evaluate(images, self.prompts)
        return {f"validation/{name}": value for name, value in scores.items()}
