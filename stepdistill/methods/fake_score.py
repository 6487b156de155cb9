"""What DMD2 and SiD share: a student sampled with backward simulation, a fake score that learns
the student's distribution online, and the optional diffusion-GAN head on the fake score.

Both methods compare two denoisers on noised student samples x_t = α_t x + σ_t ε: the frozen
teacher x̂0_real (the data's score, with classifier-free guidance) and the fake score x̂0_fake,
trained by denoising score matching on detached student samples, so that it tracks the score of
the student's current distribution (DMD2 §4.1, SiD §3). They differ only in the student's loss.

Multi-step students train on their own sampler's states (DMD2 §4.3 "backward simulation"; few-step
SiD trains on the uniform mixture of its generation steps, the same draw): pick a step k of the N,
run the student's sampler k steps without gradient, then take step k with gradient. In both papers
one fake score learns the mixture of all steps' outputs, so each step is pushed until the *mixture*
matches the data, and a blurry first step can be paid for by an over-sharp last one. A fake score
built with a step embedding (:class:`~stepdistill.models.networks.StepEmbedding`, not in the papers)
is told k and learns each step's distribution apart, so that every step is matched to the data on its own.

Diffusion-GAN (DMD2 §4.2): a classifier head (:mod:`stepdistill.models.discriminator`) on the fake
score's features tells noised real latents from noised student samples (non-saturating loss,
:mod:`~stepdistill.methods.adversarial_losses`) at noise levels up to ``gan_max_timestep``; it is
trained with the fake score and pushes the student towards "real".
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from stepdistill import draws, sharding
from stepdistill.conditioning import Condition
from stepdistill.diffusion import NoiseProcess, VPProcess, few_step_sample
from stepdistill.methods import adversarial_losses
from stepdistill.methods.base import Batch, Losses
from stepdistill.models.networks import Networks, step_embedding_size


def denoising_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Denoising score matching, the MSE between a network's prediction and its target: its minimiser is
    the score of the noised data. Fake scores use the teacher's own parameterisation (ε for ε-teachers,
    v for v and flow teachers): on rectified flow the ε error is (1 − σ) times the v error, so an
    ε-space loss would give the fake score almost no signal near σ = 1, where one-step students start."""
    return F.mse_loss(prediction.float(), target.float())


@dataclass
class FakeScoreDistillation:
    """The parts of a fake-score method; subclasses add ``generator_loss``.

    ``fake_guidance_scale`` is the fake score's own classifier-free guidance while it is trained
    (SiD-LSG's κ; 1: conditional only, as DMD2). Student losses compare the two denoisers on
    t ∈ [``min_timestep_fraction``, ``max_timestep_fraction``] of the process's range (the teacher's
    timestep units, :meth:`NoiseProcess.timestep_at`); the fake score learns on all t. ``gan_max_timestep``
    is in those units too.
    """

    nets: Networks
    process: NoiseProcess
    student_timesteps: tuple[float, ...]
    latent_shape: tuple[int, int, int]
    critic_steps_per_generator_step: int = 1
    fake_guidance_scale: float = 1.0
    min_timestep_fraction: float = 0.02
    max_timestep_fraction: float = 0.98
    gan_generator_weight: float = 0.0
    gan_critic_weight: float = 0.0
    gan_max_timestep: float = 999

    def __post_init__(self) -> None:
        if not self.student_timesteps:
            raise ValueError("student_timesteps must hold at least one timestep")
        if self.critic_steps_per_generator_step < 1:
            raise ValueError(f"critic_steps_per_generator_step must be ≥ 1 (got {self.critic_steps_per_generator_step})")
        if self.fake_guidance_scale < 0:
            raise ValueError(f"fake_guidance_scale must be ≥ 0 (got {self.fake_guidance_scale})")
        if not 0 <= self.min_timestep_fraction <= self.max_timestep_fraction <= 1:
            raise ValueError("need 0 ≤ min_timestep_fraction ≤ max_timestep_fraction ≤ 1 (got "
                             f"{self.min_timestep_fraction}, {self.max_timestep_fraction})")
        if not 0 <= self.gan_max_timestep <= self.process.max_timestep:
            raise ValueError(f"gan_max_timestep must be in [0, {self.process.max_timestep}] (got {self.gan_max_timestep})")
        if self.uses_gan and self.nets.discriminator is None:
            raise ValueError("a GAN weight > 0 needs networks built with a discriminator")
        if step_embedding_size(self.nets.fake_score.network) not in (0, len(self.student_timesteps)):
            raise ValueError(f"the fake score tells {step_embedding_size(self.nets.fake_score.network)} steps apart, the "
                             f"student has {len(self.student_timesteps)}: build the networks with fake_score_steps=1 or "
                             f"{len(self.student_timesteps)}")
        first = int(self.student_timesteps[0])
        if (isinstance(self.process, VPProcess) and self.process.prediction_type == "epsilon"
                and self.process.alphas_cumprod[first] < 1e-4):
            raise ValueError(
                f"an ε-prediction teacher with ᾱ_{first} = {float(self.process.alphas_cumprod[first]):.1e} cannot give a "
                "one-step x0 at its first timestep (x0 = (x_t − σ ε) / α explodes); use a teacher with Stable "
                "Diffusion's scaled_linear schedule or a v-prediction teacher"
            )

    @property
    def per_step_fake_score(self) -> bool:
        """Whether the fake score is told which generation step made its input."""
        return step_embedding_size(self.nets.fake_score.network) > 0

    @property
    def uses_gan(self) -> bool:
        return self.gan_generator_weight > 0 or self.gan_critic_weight > 0

    def _student_x0(self, x_t: torch.Tensor, t: torch.Tensor, condition: Condition) -> torch.Tensor:
        return self.nets.student(x_t, t, condition).x0

    def generate(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Student samples x = G(x_{t_k}, t_k) with gradient; for N-step students t_k is drawn
        uniformly from the student's timesteps and x_{t_k} comes from running the student's own
        sampler for k steps without gradient (backward simulation). Also returns what the fake score
        is told of x's origin: k per sample for a per-step fake score, else ``None``."""
        noise = draws.randn((batch.size, *self.latent_shape), device=batch.device)
        steps = self.student_timesteps
        k = sharding.agreed(int(torch.randint(len(steps), ()))) if len(steps) > 1 else 0  # one k for all processes
        if k > 0:
            with torch.no_grad():
                noise = few_step_sample(
                    lambda x, t: self._student_x0(x, t, batch.condition), noise, steps, self.process, stop_before=k,
                    draw_noise=partial(draws.rows, self.nets.student.backbone.draw_noise),
                )
        t = torch.full((batch.size,), float(steps[k]), device=noise.device)
        step = torch.full((batch.size,), k, dtype=torch.long, device=noise.device) if self.per_step_fake_score else None
        return self._student_x0(noise, t, batch.condition), step

    def noised(self, x: torch.Tensor, low: float, high: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_t, t, ε) with t drawn by the process's sampler from [low, high] and x_t = α_t x + σ_t ε."""
        t = self.process.sample_timesteps(x.shape[0], low, high, device=x.device)
        eps = draws.randn_like(x)
        return self.process.add_noise(x, eps, t), t, eps

    def score_timestep_range(self) -> tuple[float, float]:
        """The t range of the student's loss."""
        return self.process.timestep_at(self.min_timestep_fraction), self.process.timestep_at(self.max_timestep_fraction)

    def gan_generator_term(self, x: torch.Tensor, step: torch.Tensor | None, batch: Batch) -> torch.Tensor:
        """The student's GAN loss: the discriminator should call noised student samples real."""
        x_gan, t, _ = self.noised(x, 0, self.gan_max_timestep)
        fake_logits = self.nets.discriminator(self.nets.fake_score.features(x_gan, t, batch.condition, step))
        return adversarial_losses.generator_loss(fake_logits, "non_saturating")

    def critic_loss(self, batch: Batch) -> Losses:
        # the fake score denoises detached student samples (with its own guidance, if any)
        with torch.no_grad():
            x, step = self.generate(batch)
        x_t, t, eps = self.noised(x, 0, self.process.max_timestep)
        prediction = self.nets.fake_score(x_t, t, batch.condition, batch.unconditional, self.fake_guidance_scale, step=step)
        losses: Losses = {"fake_score": denoising_loss(self.process.prediction_from(prediction.x0, prediction.eps, t),
                                                       self.process.prediction_from(x, eps, t))}
        total = losses["fake_score"]
        # the discriminator: noised real latents vs noised student samples at the same t ≤ gan_max_timestep
        # (a per-step fake score sees the real ones as step k's target)
        if self.gan_critic_weight > 0:
            if batch.real_latents is None:
                raise ValueError("the GAN term needs real images in the batch (real_latents)")
            fake_gan, gan_t, _ = self.noised(x, 0, self.gan_max_timestep)
            real_gan = self.process.add_noise(batch.real_latents, draws.randn_like(batch.real_latents), gan_t)
            losses["gan_critic"] = adversarial_losses.critic_loss(
                self.nets.discriminator(self.nets.fake_score.features(real_gan, gan_t, batch.condition, step)),
                self.nets.discriminator(self.nets.fake_score.features(fake_gan, gan_t, batch.condition, step)),
                "non_saturating",
            )
            total = total + self.gan_critic_weight * losses["gan_critic"]
        losses["loss"] = total
        return losses
