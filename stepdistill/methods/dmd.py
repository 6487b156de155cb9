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

DMD2 adds a GAN term (§4.2): a classifier head on the fake score's mid-block features tells
noised real images from noised student samples (non-saturating loss; noise levels up to
``gan_max_timestep``, DMD2's diffusion-GAN range: low values let it see fine detail), and multi-step students
trained on their own sampler's intermediate states, "backward simulation" (§4.3). DMD's
regression loss (DMD eq. 9) is optional; here it is an MSE in latent space against teacher
ODE outputs for fixed noises (the paper uses LPIPS, whose weights cannot be fetched offline).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from stepdistill.diffusion import NoiseProcess, few_step_sample, uniform_timesteps
from stepdistill.methods.base import Batch, Losses
from stepdistill.models.networks import Networks


def dmd_gradient(x: torch.Tensor, real_x0: torch.Tensor, fake_x0: torch.Tensor) -> torch.Tensor:
    """The normalised distribution-matching gradient (x̂0_fake − x̂0_real) / mean|x − x̂0_real| per sample."""
    reduce = tuple(range(1, x.ndim))
    normaliser = (x - real_x0).abs().mean(dim=reduce, keepdim=True).clamp(min=1e-8)
    return torch.nan_to_num((fake_x0 - real_x0) / normaliser)


def dmd_surrogate_loss(x: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """½ mean‖x − sg(x − g)‖²: a scalar whose gradient with respect to x is g / x.numel()."""
    return 0.5 * F.mse_loss(x.float(), (x - gradient).detach().float())


def denoising_loss(eps_prediction: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Denoising score matching in ε-space: its minimiser is the score of the noised data."""
    return F.mse_loss(eps_prediction.float(), eps.float())


def gan_critic_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating GAN loss for the discriminator: softplus(−D(real)) + softplus(D(fake))."""
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def gan_generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating GAN loss for the generator: softplus(−D(fake))."""
    return F.softplus(-fake_logits).mean()


@dataclass
class DMD2:
    """DMD2 with TTUR, optional GAN term, backward simulation and optional regression loss.

    Defaults follow the paper's SD1.5 setting where it applies: t ∈ [0.02 T, 0.98 T] for the
    distribution-matching loss, fake-score guidance 1, GAN weights 3e-3 (generator) and 1e-2
    (critic) when real images are given.
    """

    nets: Networks
    process: NoiseProcess
    student_timesteps: tuple[int, ...]
    latent_shape: tuple[int, int, int]
    guidance_scale: float = 1.0
    critic_steps_per_generator_step: int = 5
    min_timestep_fraction: float = 0.02
    max_timestep_fraction: float = 0.98
    gan_generator_weight: float = 0.0
    gan_critic_weight: float = 0.0
    gan_max_timestep: int = 999
    regression_weight: float = 0.0
    regression_pairs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def __post_init__(self) -> None:
        if not self.student_timesteps:
            raise ValueError("student_timesteps must hold at least one timestep")
        if self.critic_steps_per_generator_step < 1:
            raise ValueError(f"critic_steps_per_generator_step must be ≥ 1 (got {self.critic_steps_per_generator_step})")
        if not 0 <= self.gan_max_timestep < self.process.num_train_timesteps:
            raise ValueError(f"gan_max_timestep must be in [0, {self.process.num_train_timesteps - 1}] (got {self.gan_max_timestep})")
        if (self.gan_generator_weight > 0 or self.gan_critic_weight > 0) and self.nets.discriminator is None:
            raise ValueError("a GAN weight > 0 needs networks built with a discriminator")
        if self.regression_weight > 0 and self.regression_pairs is None:
            raise ValueError("regression_weight > 0 needs regression_pairs (noise, text, teacher output)")
        first = self.student_timesteps[0]
        if self.process.prediction_type == "epsilon" and self.process.alphas_cumprod[first] < 1e-4:
            raise ValueError(
                f"an ε-prediction teacher with ᾱ_{first} = {float(self.process.alphas_cumprod[first]):.1e} cannot give a "
                "one-step x0 at its first timestep (x0 = (x_t − σ ε) / α explodes); use a teacher with Stable "
                "Diffusion's scaled_linear schedule or a v-prediction teacher"
            )

    def noise(self, batch: Batch) -> torch.Tensor:
        return torch.randn((batch.size, *self.latent_shape), device=batch.text.device)

    def _student_x0(self, x_t: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return self.nets.student(x_t, t, text).x0

    def generate(self, batch: Batch) -> torch.Tensor:
        """Student samples x = G(x_{t_k}, t_k) with gradient; for N-step students t_k is drawn
        uniformly from the student's timesteps and x_{t_k} comes from running the student's own
        sampler for k steps without gradient (backward simulation, DMD2 §4.3)."""
        noise = self.noise(batch)
        steps = self.student_timesteps
        k = int(torch.randint(len(steps), ())) if len(steps) > 1 else 0
        if k > 0:
            with torch.no_grad():
                noise = few_step_sample(
                    lambda x, t: self._student_x0(x, t, batch.text), noise, steps, self.process, stop_before=k
                )
        t = torch.full((batch.size,), steps[k], dtype=torch.long, device=noise.device)
        return self._student_x0(noise, t, batch.text)

    def _noised(self, x: torch.Tensor, low: int, high: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        t = uniform_timesteps(x.shape[0], low, high, device=x.device)
        eps = torch.randn_like(x)
        return self.process.add_noise(x, eps, t), t, eps

    def _dm_range(self) -> tuple[int, int]:
        last = self.process.num_train_timesteps - 1
        return int(self.min_timestep_fraction * last), int(self.max_timestep_fraction * last)

    def generator_loss(self, batch: Batch) -> Losses:
        # 1. generate with the student (backward simulation for multi-step students)
        x = self.generate(batch)
        # 2. distribution matching: diffuse x, compare teacher (CFG) and fake score denoisers
        x_t, t, _ = self._noised(x.detach(), *self._dm_range())
        with torch.no_grad():
            real_x0 = self.nets.teacher(x_t, t, batch.text, batch.uncond, self.guidance_scale).x0
            fake_x0 = self.nets.fake_score(x_t, t, batch.text).x0
        losses: Losses = {"dmd": dmd_surrogate_loss(x, dmd_gradient(x.detach(), real_x0, fake_x0))}
        total = losses["dmd"]
        # 3. GAN generator term: the discriminator should call noised student samples real
        if self.gan_generator_weight > 0:
            x_gan, gan_t, _ = self._noised(x, 0, self.gan_max_timestep)
            features = self.nets.fake_score.features(x_gan, gan_t, batch.text)
            losses["gan_generator"] = gan_generator_loss(self.nets.discriminator(features))
            total = total + self.gan_generator_weight * losses["gan_generator"]
        # 4. optional regression onto teacher ODE outputs (DMD eq. 9)
        if self.regression_weight > 0:
            losses["regression"] = self._regression_loss(batch.size, x.device)
            total = total + self.regression_weight * losses["regression"]
        losses["loss"] = total
        return losses

    def _regression_loss(self, batch_size: int, device: torch.device) -> torch.Tensor:
        noise, text, target = self.regression_pairs
        pick = torch.randint(len(noise), (batch_size,))
        t = torch.full((batch_size,), self.student_timesteps[0], dtype=torch.long, device=device)
        return F.mse_loss(self._student_x0(noise[pick].to(device), t, text[pick].to(device)), target[pick].to(device))

    def critic_loss(self, batch: Batch) -> Losses:
        # 5. fake-score update: denoising score matching on detached student samples
        with torch.no_grad():
            x = self.generate(batch)
        last = self.process.num_train_timesteps - 1
        x_t, t, eps = self._noised(x, 0, last)
        prediction = self.nets.fake_score(x_t, t, batch.text)
        losses: Losses = {"fake_score": denoising_loss(prediction.eps, eps)}
        total = losses["fake_score"]
        # 6. discriminator update: noised real latents vs noised student samples at the same t ≤ gan_max_timestep
        if self.gan_critic_weight > 0:
            if batch.real_latents is None:
                raise ValueError("the GAN term needs real images in the batch (real_latents)")
            fake_gan, gan_t, _ = self._noised(x, 0, self.gan_max_timestep)
            real_gan = self.process.add_noise(batch.real_latents, torch.randn_like(batch.real_latents), gan_t)
            losses["gan_critic"] = gan_critic_loss(
                self.nets.discriminator(self.nets.fake_score.features(real_gan, gan_t, batch.text)),
                self.nets.discriminator(self.nets.fake_score.features(fake_gan, gan_t, batch.text)),
            )
            total = total + self.gan_critic_weight * losses["gan_critic"]
        losses["loss"] = total
        return losses
