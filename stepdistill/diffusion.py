"""The noise process and its parameterisations, read off the teacher's diffusers scheduler.

Variance-preserving (DDPM, Ho et al. 2020) forward process on the teacher's discrete grid
t ∈ {0, …, T−1}:

    x_t = α_t x0 + σ_t ε,   α_t = √ᾱ_t,   σ_t = √(1 − ᾱ_t),   ε ~ N(0, I)

A network predicts one of (diffusers' ``prediction_type``)

    epsilon:       ε̂
    sample:        x̂0
    v_prediction:  v̂ = α_t ε̂ − σ_t x̂0            (Salimans & Ho 2022)

and :meth:`NoiseProcess.to_x0_eps` turns any of them into the pair (x̂0, ε̂), so methods never
branch on the prediction type. Flow-matching teachers (SD3, Flux) need a different α/σ family;
``from_scheduler`` refuses them with a clear message until that process lands.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from diffusers.utils.torch_utils import randn_tensor

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


class NoiseProcess:
    """α_t, σ_t on the teacher's timestep grid and the conversions between parameterisations."""

    def __init__(self, alphas_cumprod: torch.Tensor, prediction_type: str) -> None:
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"unsupported prediction_type {prediction_type!r}; stepdistill handles {PREDICTION_TYPES} "
                "(flow-matching teachers are not supported yet)"
            )
        self.alphas_cumprod = alphas_cumprod.detach().double().cpu()
        self.prediction_type = prediction_type

    @classmethod
    def from_scheduler(cls, scheduler) -> "NoiseProcess":
        """Read ᾱ_t and the prediction type from a diffusers DDPM-family scheduler."""
        alphas_cumprod = getattr(scheduler, "alphas_cumprod", None)
        if alphas_cumprod is None:
            raise ValueError(
                f"{type(scheduler).__name__} has no alphas_cumprod: it is not a variance-preserving (DDPM-family) "
                "scheduler. Flow-matching teachers (SD3, Flux) are not supported yet."
            )
        return cls(torch.as_tensor(alphas_cumprod), scheduler.config.prediction_type)

    @property
    def num_train_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    def _coefficient(self, values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, device="cpu").long().reshape(-1)
        if t.min() < 0 or t.max() >= self.num_train_timesteps:
            raise ValueError(f"timesteps must lie in [0, {self.num_train_timesteps - 1}] (got {t.min()}..{t.max()})")
        coefficient = values[t].to(device=like.device, dtype=like.dtype)
        return coefficient.reshape(-1, *([1] * (like.ndim - 1)))

    def alpha(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """α_t = √ᾱ_t, shaped to broadcast against ``like``."""
        return self._coefficient(self.alphas_cumprod.sqrt(), t, like)

    def sigma(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """σ_t = √(1 − ᾱ_t), shaped to broadcast against ``like``."""
        return self._coefficient((1 - self.alphas_cumprod).sqrt(), t, like)

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = α_t x0 + σ_t ε."""
        return self.alpha(t, x0) * x0 + self.sigma(t, x0) * eps

    def to_x0_eps(self, prediction: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x̂0, ε̂) from a network output of this process's prediction type at (x_t, t)."""
        alpha, sigma = self.alpha(t, x_t), self.sigma(t, x_t)
        if self.prediction_type == "epsilon":
            eps = prediction
            x0 = (x_t - sigma * eps) / alpha
        elif self.prediction_type == "sample":
            x0 = prediction
            eps = (x_t - alpha * x0) / sigma
        else:  # v_prediction: x0 = α x_t − σ v, ε = σ x_t + α v
            x0 = alpha * x_t - sigma * prediction
            eps = sigma * x_t + alpha * prediction
        return x0, eps

    def prediction_from(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The network target of this prediction type for a clean sample and its noise."""
        if self.prediction_type == "epsilon":
            return eps
        if self.prediction_type == "sample":
            return x0
        return self.alpha(t, x0) * eps - self.sigma(t, x0) * x0


def classifier_free_guidance(conditional: torch.Tensor, unconditional: torch.Tensor, scale: float) -> torch.Tensor:
    """CFG (Ho & Salimans 2022): unconditional + w (conditional − unconditional); w = 1 is the conditional model."""
    return unconditional + scale * (conditional - unconditional)


def ddim_step(x0: torch.Tensor, eps: torch.Tensor, t_next: torch.Tensor, process: NoiseProcess) -> torch.Tensor:
    """One deterministic DDIM step (Song et al. 2021, eq. 12 with η = 0) to timestep ``t_next``:

        x_{t'} = α_{t'} x̂0 + σ_{t'} ε̂

    the forward process applied to the predicted pair. diffusers' ``DDIMScheduler.step`` (eta=0)
    computes the same when ``t_next`` is its previous timestep.
    """
    return process.add_noise(x0, eps, t_next)


LCM_SIGMA_DATA = 0.5  # σ_d of diffusers' LCMScheduler boundary scalings


def consistency_scalings(
    t: torch.Tensor, timestep_scaling: float, like: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The consistency boundary scalings (c_skip, c_out) as diffusers' ``LCMScheduler`` computes them.

    Latent Consistency Models (Luo et al. 2023, eq. 9, after Song et al. 2023 eq. 7), with τ = s·t
    the integer timestep scaled by ``timestep_scaling`` s (LCM: 10) and σ_d = 0.5:

        c_skip(t) = σ_d² / (τ² + σ_d²),   c_out(t) = τ / √(τ² + σ_d²)

    so c_skip(0) = 1 and c_out(0) = 0: a consistency function f = c_skip x + c_out x̂0 is the
    identity at t = 0. Both are shaped to broadcast against ``like``.
    """
    scaled = torch.as_tensor(t, device="cpu").double().reshape(-1) * timestep_scaling
    c_skip = LCM_SIGMA_DATA**2 / (scaled**2 + LCM_SIGMA_DATA**2)
    c_out = scaled / (scaled**2 + LCM_SIGMA_DATA**2).sqrt()
    shape = (-1, *([1] * (like.ndim - 1)))
    return tuple(c.to(device=like.device, dtype=like.dtype).reshape(shape) for c in (c_skip, c_out))


def uniform_timesteps(
    batch_size: int, low: int, high: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Integer timesteps drawn uniformly from [low, high] (inclusive)."""
    if not 0 <= low <= high:
        raise ValueError(f"need 0 ≤ low ≤ high (got {low}, {high})")
    return torch.randint(low, high + 1, (batch_size,), generator=generator).to(device)


def few_step_sample(
    denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    noise: torch.Tensor,
    timesteps: Sequence[int],
    process: NoiseProcess,
    generator: torch.Generator | None = None,
    stop_before: int | None = None,
) -> torch.Tensor:
    """The few-step student sampler (LCM's multistep sampling, Luo et al. 2023, Alg. 1; DMD2 §4.3).

    Start at x = noise on ``timesteps[0]``; at each step predict x̂0 = denoise(x, t) and, unless
    it was the last step, re-noise it to the next timestep with fresh noise:
    x ← α_{t'} x̂0 + σ_{t'} ε. Returns the final x̂0, or with ``stop_before=k`` the noisy input
    of step k (DMD2's backward simulation trains the student on exactly those inputs). This is
    what diffusers' ``LCMScheduler`` computes with the exported config and the same generator
    (noise drawn the same way, with ``randn_tensor``).
    """
    x = noise
    batch = noise.shape[0]
    for i, t in enumerate(timesteps):
        if i == stop_before:
            return x
        x0 = denoise(x, torch.full((batch,), int(t), dtype=torch.long, device=noise.device))
        if i == len(timesteps) - 1:
            return x0
        fresh = randn_tensor(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x = process.add_noise(x0, fresh, torch.full((batch,), int(timesteps[i + 1]), dtype=torch.long))
    raise ValueError("timesteps must not be empty")
