"""Score identity Distillation: SiD (Zhou et al. 2024, "Score identity Distillation: Exponentially
Fast Distillation of Pretrained Diffusion Models for One-Step Generation"), its guided form SiD-LSG
(Zhou et al. 2025, "Guided Score identity Distillation for Data-Free One-Step Text-to-Image
Generation") and few-step SiD (Zhou et al. 2025, "Few-Step Diffusion via Score identity Distillation").

Data-free: the student G only ever sees noise. With x_g = G(z), x_t = α_t x_g + σ_t ε, the teacher's
denoiser f_φ(x_t) and the fake score's f_ψ(x_t) (trained on detached x_g, see
:mod:`~stepdistill.methods.fake_score`), SiD minimises a Fisher divergence between the diffused
data and student distributions, E‖f_φ(x_t) − f_θ(x_t)‖², where f_θ is the student's own (unknown)
denoiser. Tweedie's identity E[f_θ(x_t) | x_t] = E[x_g | x_t] lets x_g stand in for f_θ, and f_ψ
approximates it where that is not possible; per sample and element (SiD eq. 23)

    L = (f_φ − f_ψ) ⊙ ((f_φ − x_g) − α (f_φ − f_ψ)) / mean|x_g − f_φ|

with α = 1.2 (the paper's default; α = 1 gives (f_φ − f_ψ) ⊙ (f_ψ − x_g)) and the normaliser
held constant (SiD's time weighting, the same as DMD's). Unlike DMD the gradient flows through
both denoisers' inputs: x_t depends on θ through x_g (the denoisers' weights get no update
from this loss). Guidance (LSG): the teacher and the fake score are evaluated with their own
CFG scales in this loss, and the fake score with a third while it is trained.

Few-step SiD trains one student for K steps on the uniform mixture of its outputs from all of
its generation steps: the backward-simulated draw of the shared base class.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stepdistill.methods.base import Batch, Losses
from stepdistill.methods.fake_score import FakeScoreDistillation

SID_ALPHA = 1.2


def sid_loss(
    x_g: torch.Tensor, real_x0: torch.Tensor, fake_x0: torch.Tensor, alpha: float = SID_ALPHA, normalise: bool = True
) -> torch.Tensor:
    """SiD's generator loss, the mean over samples and elements of
    (f_φ − f_ψ) ⊙ ((f_φ − x_g) − α (f_φ − f_ψ)) / mean|x_g − f_φ| (normaliser without gradient;
    ``normalise=False`` drops it).

    The paper sums over elements; the mean divides that by a constant, which changes no Adam step
    but gives the loss DMD's scale (its surrogate is a mean too), so that a GAN weight or a
    gradient-clipping norm means the same in both methods.
    Gradients flow into ``x_g``, ``real_x0`` and ``fake_x0`` (through x_t, when they were computed from it).
    """
    x_g, real_x0, fake_x0 = x_g.float(), real_x0.float(), fake_x0.float()
    difference = real_x0 - fake_x0
    per_element = difference * ((real_x0 - x_g) - alpha * difference)
    if normalise:
        reduce = tuple(range(1, x_g.ndim))
        per_element = per_element / (x_g - real_x0).detach().abs().mean(dim=reduce, keepdim=True).clamp(min=1e-5)
    return per_element.mean()


@dataclass
class SiD(FakeScoreDistillation):
    """SiD / SiD-LSG / few-step SiD: by default one fake-score update per student update, as in the paper.

    ``teacher_guidance_scale`` and ``fake_guidance_scale_generator`` are LSG's scales of the teacher
    and of the fake score in the student's loss; ``fake_guidance_scale`` (the base class's) is the
    fake score's while it is trained. All 1 (no guidance) turns LSG off.
    """

    alpha: float = SID_ALPHA
    teacher_guidance_scale: float = 1.0
    fake_guidance_scale_generator: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.alpha >= 0:
            raise ValueError(f"alpha must be ≥ 0 (got {self.alpha})")
        if self.teacher_guidance_scale < 0:  # the fake score's scale in the student loss may be < 0 (Anti-CFG)
            raise ValueError(f"teacher_guidance_scale must be ≥ 0 (got {self.teacher_guidance_scale})")

    def generator_loss(self, batch: Batch) -> Losses:
        # 1. x_g from the student (backward simulation for few-step students), diffused with gradient
        x_g, step = self.generate(batch)
        x_t, t, _ = self.noised(x_g, *self.score_timestep_range())
        # 2. both denoisers at the same x_t; their inputs carry the student's gradient
        real_x0 = self.nets.teacher(x_t, t, batch.condition, batch.unconditional, self.teacher_guidance_scale).x0
        fake_x0 = self.nets.fake_score(x_t, t, batch.condition, batch.unconditional, self.fake_guidance_scale_generator,
                                       step=step).x0
        losses: Losses = {"sid": sid_loss(x_g, real_x0, fake_x0, self.alpha)}
        total = losses["sid"]
        # 3. optional diffusion-GAN term (few-step SiD, when real images are given)
        if self.gan_generator_weight > 0:
            losses["gan_generator"] = self.gan_generator_term(x_g, step, batch)
            total = total + self.gan_generator_weight * losses["gan_generator"]
        losses["loss"] = total
        return losses
