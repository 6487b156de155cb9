"""Adversarial distillation: ADD (Sauer et al., "Adversarial Diffusion Distillation", 2023) and LADD
(Sauer et al., "Fast High-Resolution Image Synthesis with Latent Adversarial Diffusion Distillation", 2024).

The student G starts as the teacher and denoises at its own few timesteps s₁ > … > s_N: pure noise at
s₁ (where its sampler starts), and at a later s a real latent x0 noised to it, x_s = α_s x0 + σ_s ε,
becomes x̂0 = G(x_s, s) (ADD §3.1: the student sees real data noised at its timesteps, as its own
sampler's later steps see its earlier outputs re-noised).
A discriminator tells x̂0 from real latents; the student is trained to fool it:

* **LADD**: the discriminator reads the *frozen teacher's* features of several blocks on the latents
  re-noised at t̂, x_t̂ = α_t̂ x + σ_t̂ ε′, with t̂ = T · sigmoid(m + s z), z ~ N(0, 1) (logit-normal,
  biased towards high noise for m > 0: LADD §3.2 finds the noise level sets the feedback's scale,
  global shape at high t̂, detail at low), heads conditioned on the prompt and t̂. No pixels, no decoder.
* **ADD**: the discriminator reads a frozen *pixel-space* feature network (DINOv2 in the paper) on the
  decoded x̂0 and real images, and the student also matches the teacher: λ c(t) ‖x̂0 − sg(x̂0_teacher(x_t, t))‖²
  with x_t = α_t x̂0 + σ_t ε at a random t and c(t) = ᾱ_t (ADD eq. 4–5, λ = 2.5).

Both use the hinge loss and an R1 penalty on real inputs (ADD: γ = 1e-5), exact or approximate
(:mod:`~stepdistill.methods.adversarial_losses`). The discriminator's feature extractor is frozen;
gradients reach the student only through x̂0.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from stepdistill import draws
from stepdistill.conditioning import Condition
from stepdistill.diffusion import NoiseProcess
from stepdistill.methods import adversarial_losses
from stepdistill.methods.base import Batch, Losses
from stepdistill.models.discriminator import FeatureFunction
from stepdistill.models.networks import Networks

VARIANTS = ("ladd", "add")
R1_KINDS = ("approximate", "exact")


@dataclass
class AdversarialDistillation:
    """ADD / LADD's losses. ``features`` is the frozen extractor the heads (``nets.discriminator``) read:
    LADD's is the teacher on noised latents, ADD's a pixel network on decoded latents (it ignores t).
    ``pooled`` maps a condition to the one vector per prompt the heads are conditioned on."""

    nets: Networks
    process: NoiseProcess
    student_timesteps: tuple[float, ...]
    features: FeatureFunction
    pooled: Callable[[Condition], torch.Tensor]
    variant: str = "ladd"
    loss_kind: str = "hinge"
    distillation_weight: float = 0.0
    guidance_scale: float = 1.0
    r1_weight: float = 1e-5
    r1_kind: str = "approximate"
    r1_sigma: float = 0.01
    logit_mean: float = 1.0
    logit_std: float = 1.0
    critic_steps_per_generator_step: int = 1

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant is one of {VARIANTS} (got {self.variant!r})")
        if self.r1_kind not in R1_KINDS:
            raise ValueError(f"r1_kind is one of {R1_KINDS} (got {self.r1_kind!r})")
        if not self.student_timesteps:
            raise ValueError("student_timesteps must hold at least one timestep")
        if self.nets.discriminator is None:
            raise ValueError("adversarial distillation needs networks with a discriminator")

    # -- the student ------------------------------------------------------------------------
    def generate(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """x̂0 = G(x_s, s) at a student timestep s drawn per sample, and s: at the first, x_s is pure noise,
        as the sampler starts (on a DDPM-family teacher the first timestep may be below T: the student
        reads noise as that timestep's sample, as DMD2's does); at the later ones, x_s = α_s x0 + σ_s ε of
        real latents x0 (ADD §3.1)."""
        if batch.real_latents is None:
            raise ValueError("adversarial distillation noises real latents: the batch has none")
        steps = torch.tensor(self.student_timesteps, dtype=torch.float32, device=batch.device)
        s = steps[draws.randint(0, len(steps), (batch.size,))].to(batch.device)
        noise = draws.randn_like(batch.real_latents)
        first = (s == steps[0]).reshape(-1, *([1] * (noise.ndim - 1)))
        x_s = torch.where(first, noise, self.process.add_noise(batch.real_latents, noise, s))
        return self.nets.student(x_s, s, batch.condition).x0, s

    # -- the discriminator --------------------------------------------------------------------
    def discriminator_timesteps(self, size: int, device: torch.device) -> torch.Tensor:
        """t̂ = T · sigmoid(m + s z) (LADD's logit-normal draw) in the teacher's timestep units."""
        fractions = torch.sigmoid(self.logit_mean + self.logit_std * draws.randn((size,)))
        return torch.tensor([self.process.timestep_at(float(u)) for u in fractions], dtype=torch.float32, device=device)

    def discriminator_input(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """LADD re-noises latents to t̂ before the teacher reads them; ADD's pixel network reads them clean."""
        return self.process.add_noise(x0, eps, t) if self.variant == "ladd" else x0

    def logits(self, x: torch.Tensor, t: torch.Tensor, condition: Condition) -> torch.Tensor:
        """D(x) at noise level t: the heads on the frozen extractor's features, conditioned on prompt and t."""
        return self.nets.discriminator(self.features(x, t, condition), self.pooled(condition), t)

    # -- the losses -----------------------------------------------------------------------------
    def generator_loss(self, batch: Batch) -> Losses:
        x0, s = self.generate(batch)
        t = self.discriminator_timesteps(batch.size, batch.device)
        fake = self.discriminator_input(x0, t, draws.randn_like(x0))
        losses: Losses = {"adversarial": adversarial_losses.generator_loss(self.logits(fake, t, batch.condition),
                                                                           self.loss_kind)}
        total = losses["adversarial"]
        if self.distillation_weight > 0:
            losses["distillation"] = self.distillation_loss(x0, batch)
            total = total + self.distillation_weight * losses["distillation"]
        losses["loss"] = total
        return losses

    def distillation_loss(self, x0: torch.Tensor, batch: Batch) -> torch.Tensor:
        """ADD eq. 5: c(t) ‖x̂0 − sg(x̂0_teacher(α_t x̂0 + σ_t ε, t))‖², t uniform, c(t) = α_t² (ᾱ_t on VP)."""
        t = self.process.sample_timesteps(batch.size, 0, self.process.max_timestep, device=batch.device)
        with torch.no_grad():
            x_t = self.process.add_noise(x0.detach(), draws.randn_like(x0), t)
            target = self.nets.teacher(x_t, t, batch.condition, batch.unconditional, self.guidance_scale).x0
        weight = self.process.alpha(t, x0).square()
        return (weight * (x0.float() - target.float()).square()).mean()

    def critic_loss(self, batch: Batch) -> Losses:
        with torch.no_grad():
            x0, _ = self.generate(batch)
        t = self.discriminator_timesteps(batch.size, batch.device)
        real = self.discriminator_input(batch.real_latents, t, draws.randn_like(x0))
        fake = self.discriminator_input(x0, t, draws.randn_like(x0))
        losses: Losses = {"adversarial": adversarial_losses.critic_loss(self.logits(real, t, batch.condition),
                                                                        self.logits(fake, t, batch.condition),
                                                                        self.loss_kind)}
        total = losses["adversarial"]
        if self.r1_weight > 0:
            discriminate = lambda x: self.logits(x, t, batch.condition)  # noqa: E731
            losses["r1"] = (adversarial_losses.r1_penalty(discriminate, real) if self.r1_kind == "exact" else
                            adversarial_losses.approximate_r1_penalty(discriminate, real, self.r1_sigma)
                            / self.r1_sigma**2)  # on R1's scale
            total = total + self.r1_weight * losses["r1"]
        losses["loss"] = total
        return losses


def teacher_features(nets: Networks, layers: tuple[str, ...]) -> FeatureFunction:
    """LADD's extractor: the frozen teacher's feature maps of ``layers`` at (x_t̂, t̂, prompt). ADD's is
    :func:`stepdistill.models.discriminator.pixel_features`."""
    return lambda x, t, condition: nets.teacher.features(x, t, condition, layers=layers)
