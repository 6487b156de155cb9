"""Distribution Matching Distillation: DMD (Yin et al. 2024a) and DMD2 (Yin et al. 2024b,
"Improved Distribution Matching Distillation for Fast Image Synthesis").

The student G maps noise to x = G(z). DMD minimises KL(p_fake ‖ p_real) between the student's
distribution and the teacher's, diffused to every noise level t. Its gradient with respect to
a sample is the difference of the two scores, which we read off two denoisers:

    ∇_x KL ≈ E_{t, ε} [ w_t (x̂0_fake(x_t) − x̂0_real(x_t)) ],   x_t = α_t x + σ_t ε,
    w_t = 1 / mean|x − x̂0_real(x_t)|                               (DMD eq. 8, per sample)

where x̂0_real is the frozen teacher with classifier-free guidance and x̂0_fake a "fake score"
denoiser trained online on the student's own samples (DMD2 §4.1: updated 5–10 times per
generator step, the two time-scale update rule). The gradient enters through the surrogate
½‖x − sg(x − ∇)‖², whose gradient in x is exactly ∇ (scaled by the mean over elements).

DMD2 adds a GAN term (§4.2) and multi-step students trained on their own sampler's
intermediate states, "backward simulation" (§4.3): both live in
:mod:`~stepdistill.methods.fake_score`, shared with SiD. DMD's regression loss (DMD eq. 9) is
optional; here it is an MSE in latent space against teacher ODE outputs for fixed noises (the
paper uses LPIPS, whose weights cannot be fetched offline).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from stepdistill import conditioning, draws
from stepdistill.conditioning import Condition
from stepdistill.methods.base import Batch, Losses
from stepdistill.methods.fake_score import FakeScoreDistillation


def dmd_gradient(x: torch.Tensor, real_x0: torch.Tensor, fake_x0: torch.Tensor) -> torch.Tensor:
    """The normalised distribution-matching gradient (x̂0_fake − x̂0_real) / mean|x − x̂0_real| per sample."""
    reduce = tuple(range(1, x.ndim))
    normaliser = (x - real_x0).abs().mean(dim=reduce, keepdim=True).clamp(min=1e-8)
    return torch.nan_to_num((fake_x0 - real_x0) / normaliser)


def dmd_surrogate_loss(x: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """½ mean‖x − sg(x − g)‖²: a scalar whose gradient with respect to x is g / x.numel()."""
    return 0.5 * F.mse_loss(x.float(), (x - gradient).detach().float())


@dataclass
class DMD2(FakeScoreDistillation):
    """DMD2 with TTUR, optional GAN term, backward simulation and optional regression loss.

    Defaults follow the paper's SD1.5 setting where it applies: t ∈ [0.02 T, 0.98 T] for the
    distribution-matching loss, fake-score guidance 1, 5 critic updates per student update, GAN
    weights 3e-3 (generator) and 1e-2 (critic) when real images are given.
    """

    guidance_scale: float = 1.0
    critic_steps_per_generator_step: int = 5
    regression_weight: float = 0.0
    regression_pairs: tuple[torch.Tensor, Condition, torch.Tensor] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.regression_weight > 0 and self.regression_pairs is None:
            raise ValueError("regression_weight > 0 needs regression_pairs (noise, condition, teacher output)")

    def generator_loss(self, batch: Batch) -> Losses:
        # 1. generate with the student (backward simulation for multi-step students)
        x, step = self.generate(batch)
        # 2. distribution matching: diffuse x, compare teacher (CFG) and fake score denoisers
        x_t, t, _ = self.noised(x.detach(), *self.score_timestep_range())
        with torch.no_grad():
            real_x0 = self.nets.teacher(x_t, t, batch.condition, batch.unconditional, self.guidance_scale).x0
            fake_x0 = self.nets.fake_score(x_t, t, batch.condition, step=step).x0
        losses: Losses = {"dmd": dmd_surrogate_loss(x, dmd_gradient(x.detach(), real_x0, fake_x0))}
        total = losses["dmd"]
        # 3. GAN generator term: the discriminator should call noised student samples real
        if self.gan_generator_weight > 0:
            losses["gan_generator"] = self.gan_generator_term(x, step, batch)
            total = total + self.gan_generator_weight * losses["gan_generator"]
        # 4. optional regression onto teacher ODE outputs (DMD eq. 9)
        if self.regression_weight > 0:
            losses["regression"] = self._regression_loss(batch.size, x.device)
            total = total + self.regression_weight * losses["regression"]
        losses["loss"] = total
        return losses

    def _regression_loss(self, batch_size: int, device: torch.device) -> torch.Tensor:
        noise, condition, target = self.regression_pairs
        pick = draws.randint(0, len(noise), (batch_size,))
        t = torch.full((batch_size,), float(self.student_timesteps[0]), device=device)
        condition = conditioning.to(conditioning.select(condition, pick), device)
        return F.mse_loss(self._student_x0(noise[pick].to(device), t, condition), target[pick].to(device))
