"""The noise process and its parameterisations, read off the teacher's diffusers scheduler.

Every process here writes a noisy sample as

    x_t = α_t x0 + σ_t ε,   ε ~ N(0, I)

with time ``t`` in the teacher's own timestep units: what its scheduler calls a timestep. Methods see
only α_t, σ_t, the pair (x̂0, ε̂) and a timestep sampler; they never branch on the family.

**Variance-preserving** (DDPM, Ho et al. 2020; every DDPM-family scheduler: DDPM, DDIM, Euler, LCM, …)
on the teacher's discrete grid t ∈ {0, …, T−1}: α_t = √ᾱ_t, σ_t = √(1 − ᾱ_t). The network predicts
(diffusers' ``prediction_type``)

    epsilon:       ε̂                     x̂0 = (x_t − σ_t ε̂) / α_t
    sample:        x̂0                    ε̂  = (x_t − α_t x̂0) / σ_t
    v_prediction:  v̂ = α_t ε̂ − σ_t x̂0     x̂0 = α_t x_t − σ_t v̂,  ε̂ = σ_t x_t + α_t v̂   (Salimans & Ho 2022)

Safe where the divisor is not small: ε-prediction at t = T−1 divides by √ᾱ_{T−1} (0.069 on Stable
Diffusion's ``scaled_linear`` schedule, 5e-5 on ``squaredcos_cap_v2``: the methods refuse that case);
x0-prediction divides by σ_0 ≈ 0.03; v-prediction never divides.

**Rectified flow** (Liu et al. 2022; Esser et al. 2024, SD3; Flux; ``FlowMatchEulerDiscreteScheduler``):
with σ ∈ [0, 1] and t = T σ (T = 1000),

    x_t = (1 − σ) x0 + σ ε,   the network predicts v = ε − x0,   x̂0 = x_t − σ v̂,   ε̂ = x_t + (1 − σ) v̂

which never divides, so it is safe on all of [0, 1], including pure noise at σ = 1 (α = 0); only
turning an (x̂0, ε̂) pair back into x̂0 from ε̂ alone would divide by 1 − σ, and nothing here does.
Training σ's are *shifted*, σ = s u / (1 + (s − 1) u) for u ∈ [0, 1] (SD3 §5.3.2: s = 3 at 1024 px;
Flux: s = e^μ with μ growing with the image's token count, the scheduler's "dynamic" shift), so
that larger images spend more time at high noise.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

from stepdistill import draws

VP_PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
TIMESTEP_SAMPLINGS = ("uniform", "logit_normal")
LCM_SIGMA_DATA = 0.5  # σ_d of diffusers' LCMScheduler boundary scalings


@dataclass
class Prediction:
    """A denoiser's output: clean sample and noise estimates (x̂0, ε̂)."""

    x0: torch.Tensor
    eps: torch.Tensor


class NoiseProcess:
    """α_t, σ_t in the teacher's timestep units and the conversions between parameterisations.

    Subclasses give α, σ and the two conversions; the forward process and its inverse live here once.
    """

    prediction_type: str
    num_train_timesteps: int

    @property
    def max_timestep(self) -> float:
        """The noisiest timestep the teacher was trained on."""
        raise NotImplementedError

    def alpha(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """α_t, shaped to broadcast against ``like``."""
        raise NotImplementedError

    def sigma(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """σ_t, shaped to broadcast against ``like``."""
        raise NotImplementedError

    def to_x0_eps(self, prediction: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x̂0, ε̂) from a network output of this process's prediction type at (x_t, t)."""
        raise NotImplementedError

    def prediction_from(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The network target of this prediction type for a clean sample and its noise."""
        raise NotImplementedError

    def timestep_at(self, fraction: float) -> float:
        """The timestep a fraction ``fraction`` ∈ [0, 1] of the way to :attr:`max_timestep`."""
        raise NotImplementedError

    def sample_timesteps(self, batch_size: int, low: float, high: float, device: torch.device | str = "cpu") -> torch.Tensor:
        """Training timesteps ``(B,)`` (float32) in [low, high], drawn from torch's global generator."""
        raise NotImplementedError

    def solver_grid(self, num_steps: int) -> torch.Tensor:
        """The teacher's ODE-solver grid of ``num_steps`` + 1 timesteps, cleanest first (float64)."""
        raise NotImplementedError

    def consistency_scalings(
        self, t: torch.Tensor, timestep_scaling: float, like: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(c_skip, c_out) of a consistency function f = c_skip x_t + c_out x̂0 with f(x, 0) = x."""
        raise NotImplementedError

    def for_few_steps(self) -> NoiseProcess:
        """This process with a parameterisation that a 1–2 step student can use at the noisiest
        timestep, where x̂0 from ε̂ divides by α_T ≈ 0."""
        raise NotImplementedError

    def midpoint(self, t_a: torch.Tensor, t_b: torch.Tensor) -> torch.Tensor:
        """The timesteps halfway between grid points ``t_a`` and ``t_b`` (progressive distillation's t′)."""
        raise NotImplementedError

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = α_t x0 + σ_t ε."""
        return self.alpha(t, x0) * x0 + self.sigma(t, x0) * eps


def _broadcast(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.to(device=like.device, dtype=like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


class VPProcess(NoiseProcess):
    """The variance-preserving process on the teacher's discrete ᾱ table (integer-valued timesteps)."""

    def __init__(self, alphas_cumprod: torch.Tensor, prediction_type: str) -> None:
        if prediction_type not in VP_PREDICTION_TYPES:
            raise ValueError(f"unsupported prediction_type {prediction_type!r} for a DDPM-family scheduler; "
                             f"stepdistill handles {', '.join(VP_PREDICTION_TYPES)}")
        self.alphas_cumprod = alphas_cumprod.detach().double().cpu()
        self.prediction_type = prediction_type

    @property
    def num_train_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    @property
    def max_timestep(self) -> int:
        return self.num_train_timesteps - 1

    def _coefficient(self, values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, device="cpu").reshape(-1)
        index = t.long()
        if (index != t).any():
            raise ValueError(f"a DDPM-family teacher is defined on integer timesteps (got {t[index != t][:3].tolist()})")
        if index.min() < 0 or index.max() >= self.num_train_timesteps:
            raise ValueError(f"timesteps must lie in [0, {self.max_timestep}] (got {index.min()}..{index.max()})")
        return _broadcast(values[index], like)

    def alpha(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """α_t = √ᾱ_t."""
        return self._coefficient(self.alphas_cumprod.sqrt(), t, like)

    def sigma(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """σ_t = √(1 − ᾱ_t)."""
        return self._coefficient((1 - self.alphas_cumprod).sqrt(), t, like)

    def to_x0_eps(self, prediction: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        alpha, sigma = self.alpha(t, x_t), self.sigma(t, x_t)
        if self.prediction_type == "epsilon":
            eps = prediction
            x0 = (x_t - sigma * eps) / alpha
        elif self.prediction_type == "sample":
            x0 = prediction
            eps = (x_t - alpha * x0) / sigma
        else:  # v_prediction
            x0 = alpha * x_t - sigma * prediction
            eps = sigma * x_t + alpha * prediction
        return x0, eps

    def prediction_from(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == "epsilon":
            return eps
        if self.prediction_type == "sample":
            return x0
        return self.alpha(t, x0) * eps - self.sigma(t, x0) * x0

    def timestep_at(self, fraction: float) -> int:
        return int(fraction * self.max_timestep)

    def sample_timesteps(self, batch_size: int, low: float, high: float, device: torch.device | str = "cpu") -> torch.Tensor:
        """Integer timesteps drawn uniformly from {low, …, high}."""
        low, high = int(low), int(high)
        if not 0 <= low <= high <= self.max_timestep:
            raise ValueError(f"need 0 ≤ low ≤ high ≤ {self.max_timestep} (got {low}, {high})")
        return draws.randint(low, high + 1, (batch_size,)).float().to(device)

    def solver_grid(self, num_steps: int) -> torch.Tensor:
        """LCM's skipping-step grid (LCM §4.3): g_0 = 0, g_n = n k − 1 with k = T / N."""
        if not 1 <= num_steps <= self.num_train_timesteps or self.num_train_timesteps % num_steps:
            raise ValueError(f"the number of solver steps must divide the teacher's {self.num_train_timesteps} "
                             f"training timesteps (got {num_steps})")
        skipping_interval = self.num_train_timesteps // num_steps
        steps = torch.arange(1, num_steps + 1, dtype=torch.float64) * skipping_interval - 1
        return torch.cat([torch.zeros(1, dtype=torch.float64), steps])

    def for_few_steps(self) -> VPProcess:
        """v-prediction on the same schedule (Salimans & Ho 2022, §4: x̂0 = α_t x_t − σ_t v̂ never divides,
        and at α_T ≈ 0 it reads x̂0 ≈ −v̂ straight off the network)."""
        return VPProcess(self.alphas_cumprod, "v_prediction")

    def midpoint(self, t_a: torch.Tensor, t_b: torch.Tensor) -> torch.Tensor:
        """(t_a + t_b) / 2 rounded to the integer grid (half to even); −1, DDIM's clean end below
        t = 0, may be an end point."""
        return torch.round((torch.as_tensor(t_a).double() + torch.as_tensor(t_b).double()) / 2)

    def consistency_scalings(
        self, t: torch.Tensor, timestep_scaling: float, like: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """diffusers' ``LCMScheduler`` boundary scalings (LCM eq. 9, after Song et al. 2023 eq. 7): with
        τ = s·t (LCM: s = 10) and σ_d = 0.5, c_skip = σ_d² / (τ² + σ_d²) and c_out = τ / √(τ² + σ_d²),
        so c_skip(0) = 1, c_out(0) = 0."""
        scaled = torch.as_tensor(t, device="cpu").double().reshape(-1) * timestep_scaling
        c_skip = LCM_SIGMA_DATA**2 / (scaled**2 + LCM_SIGMA_DATA**2)
        c_out = scaled / (scaled**2 + LCM_SIGMA_DATA**2).sqrt()
        return _broadcast(c_skip, like), _broadcast(c_out, like)


def shift_sigmas(u: torch.Tensor, shift: float) -> torch.Tensor:
    """σ = s u / (1 + (s − 1) u): the timestep shift of SD3 (§5.3.2) and of diffusers' flow schedulers."""
    return shift * u / (1 + (shift - 1) * u)


def unshift_sigmas(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """The inverse of :func:`shift_sigmas`: u = σ / (s − (s − 1) σ)."""
    return sigma / (shift - (shift - 1) * sigma)


class FlowProcess(NoiseProcess):
    """Rectified flow, x_t = (1 − σ) x0 + σ ε with t = T σ, and a network that predicts v = ε − x0.

    ``shift`` s is the scheduler's (static, or Flux's dynamic e^μ at the training resolution);
    training timesteps are σ = shift(u) with u uniform or logit-normal (SD3 §3.1: u = sigmoid(z),
    z ~ N(m, s_z²)), truncated to the requested range by inverse-CDF sampling.
    """

    prediction_type = "flow"

    def __init__(
        self, num_train_timesteps: int = 1000, shift: float = 1.0, timestep_sampling: str = "uniform",
        logit_mean: float = 0.0, logit_std: float = 1.0,
    ) -> None:
        if not shift > 0:
            raise ValueError(f"the timestep shift must be > 0 (got {shift})")
        if timestep_sampling not in TIMESTEP_SAMPLINGS:
            raise ValueError(f"timestep_sampling must be one of {', '.join(TIMESTEP_SAMPLINGS)} (got {timestep_sampling!r})")
        if not logit_std > 0:
            raise ValueError(f"logit_std must be > 0 (got {logit_std})")
        self.num_train_timesteps = num_train_timesteps
        self.shift, self.timestep_sampling = shift, timestep_sampling
        self.logit_mean, self.logit_std = logit_mean, logit_std

    @property
    def max_timestep(self) -> float:
        return float(self.num_train_timesteps)

    def sigmas(self, t: torch.Tensor) -> torch.Tensor:
        """σ = t / T, in float64 on the CPU."""
        sigma = torch.as_tensor(t, device="cpu").double().reshape(-1) / self.num_train_timesteps
        if sigma.min() < 0 or sigma.max() > 1:
            raise ValueError(f"timesteps must lie in [0, {self.num_train_timesteps}] (got {t.min()}..{t.max()})")
        return sigma

    def alpha(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """α = 1 − σ."""
        return _broadcast(1 - self.sigmas(t), like)

    def sigma(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """σ = t / T."""
        return _broadcast(self.sigmas(t), like)

    def to_x0_eps(self, prediction: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x̂0 = x_t − σ v̂ and ε̂ = x_t + (1 − σ) v̂ (no division: safe at σ = 0 and σ = 1)."""
        sigma = self.sigma(t, x_t)
        return x_t - sigma * prediction, x_t + (1 - sigma) * prediction

    def prediction_from(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """v = ε − x0."""
        return eps - x0

    def timestep_at(self, fraction: float) -> float:
        return fraction * self.max_timestep

    def sample_timesteps(self, batch_size: int, low: float, high: float, device: torch.device | str = "cpu") -> torch.Tensor:
        """σ = shift(u), u from the sampling law truncated to the u's of [low, high]; returns t = T σ."""
        if not 0 <= low <= high <= self.max_timestep:
            raise ValueError(f"need 0 ≤ low ≤ high ≤ {self.max_timestep} (got {low}, {high})")
        bounds = unshift_sigmas(torch.tensor([low, high], dtype=torch.float64) / self.num_train_timesteps, self.shift)
        p = draws.rand((batch_size,), dtype=torch.float64)
        if self.timestep_sampling == "uniform":
            u = bounds[0] + (bounds[1] - bounds[0]) * p
        else:  # logit-normal: z = m + s Φ⁻¹(p) with p uniform between the bounds' CDF values
            z_bounds = (torch.logit(bounds) - self.logit_mean) / self.logit_std
            cdf = torch.special.ndtr(z_bounds)
            z = torch.special.ndtri(cdf[0] + (cdf[1] - cdf[0]) * p)
            u = torch.sigmoid(self.logit_mean + self.logit_std * z).clamp(bounds[0], bounds[1])
        return (shift_sigmas(u, self.shift) * self.num_train_timesteps).float().to(device)

    def solver_grid(self, num_steps: int) -> torch.Tensor:
        """σ_n = shift(n / N) for n = 1..N, and σ_0 = shift(1 / T), the teacher's cleanest training
        sigma (at σ = 0 a consistency target's ε̂ would be 0 · ∞)."""
        if num_steps < 1:
            raise ValueError(f"the number of solver steps must be ≥ 1 (got {num_steps})")
        u = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
        u[0] = 1 / self.num_train_timesteps
        return shift_sigmas(u, self.shift) * self.num_train_timesteps

    def for_few_steps(self) -> FlowProcess:
        """The process itself: x̂0 = x_t − σ v̂ never divides, at σ = 1 included."""
        return self

    def midpoint(self, t_a: torch.Tensor, t_b: torch.Tensor) -> torch.Tensor:
        """Halfway in the unshifted coordinate u (σ = shift(u)), so that a refined grid keeps the shift."""
        u_a, u_b = (unshift_sigmas(self.sigmas(t), self.shift) for t in (t_a, t_b))
        return shift_sigmas((u_a + u_b) / 2, self.shift) * self.num_train_timesteps

    def consistency_scalings(
        self, t: torch.Tensor, timestep_scaling: float, like: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """f = x̂0 = x_t − σ v̂: the boundary condition f(x, 0) = x holds by the parameterisation itself,
        so c_skip = 0 and c_out = 1 (what ``FlowMatchLCMScheduler`` samples); ``timestep_scaling`` is unused."""
        ones = torch.ones(torch.as_tensor(t).reshape(-1).shape, dtype=torch.float64)
        return _broadcast(0 * ones, like), _broadcast(ones, like)


def dynamic_shift(image_seq_len: int, config) -> float:
    """Flux's resolution-dependent shift e^μ, μ linear in the image's token count between
    (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift), as its pipeline computes it."""
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    slope = (max_shift - base_shift) / (max_len - base_len)
    return math.exp(image_seq_len * slope + base_shift - slope * base_len)


def process_from_scheduler(
    scheduler, image_seq_len: int | None = None, timestep_sampling: str = "uniform", logit_mean: float = 0.0,
    logit_std: float = 1.0, shift: float | None = None,
) -> NoiseProcess:
    """The teacher's process: variance-preserving for DDPM-family schedulers (they have ``alphas_cumprod``),
    rectified flow for flow-matching ones. ``image_seq_len`` (the image's token count) sets a dynamic
    shift; ``shift`` overrides the scheduler's. Sampling laws other than uniform need a flow teacher."""
    config = scheduler.config
    alphas_cumprod = getattr(scheduler, "alphas_cumprod", None)
    if alphas_cumprod is not None:
        if timestep_sampling != "uniform" or shift is not None:
            raise ValueError(f"{type(scheduler).__name__} is a DDPM-family scheduler: timestep shift and logit-normal "
                             "sampling are for flow-matching teachers; use the uniform sampling")
        return VPProcess(torch.as_tensor(alphas_cumprod), config.prediction_type)
    if "FlowMatch" not in type(scheduler).__name__:
        raise ValueError(f"{type(scheduler).__name__} is neither a DDPM-family nor a flow-matching scheduler; "
                         "stepdistill reads the noise process off DDPM/DDIM/Euler/LCM or FlowMatch* schedulers")
    for unsupported in ("shift_terminal", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas"):
        if config.get(unsupported):
            raise ValueError(f"{type(scheduler).__name__} with {unsupported} set is not a plain rectified-flow schedule; "
                             "stepdistill supports static and dynamic (exponential) shifts")
    if shift is None:
        if config.get("use_dynamic_shifting"):
            if config.get("time_shift_type", "exponential") != "exponential":
                raise ValueError("only the exponential dynamic shift (Flux's) is supported")
            if image_seq_len is None:
                raise ValueError("a dynamically shifted flow scheduler needs the image's token count")
            shift = dynamic_shift(image_seq_len, config)
        else:
            shift = config.get("shift", 1.0)
    return FlowProcess(config.num_train_timesteps, shift, timestep_sampling, logit_mean, logit_std)


def classifier_free_guidance(conditional: torch.Tensor, unconditional: torch.Tensor, scale: float) -> torch.Tensor:
    """CFG (Ho & Salimans 2022): unconditional + w (conditional − unconditional); w = 1 is the conditional model."""
    return unconditional + scale * (conditional - unconditional)


def guidance_scale_embedding(guidance_scale: torch.Tensor, dim: int) -> torch.Tensor:
    """The sinusoidal embedding of guidance scales ``(B,)`` → ``(B, dim)`` that w-conditioned students take
    (LCM §4.1), as diffusers' pipelines compute it (w = 1 is unguided):

        e(w)_i = sin((w − 1)·1000·f_i),  e(w)_{d/2+i} = cos((w − 1)·1000·f_i),  f_i = 10000^(−i / (d/2 − 1))
    """
    if guidance_scale.ndim != 1:
        raise ValueError(f"guidance_scale must have shape (B,) (got {tuple(guidance_scale.shape)})")
    half = dim // 2
    frequencies = torch.exp(-math.log(10000.0) / (half - 1) * torch.arange(half, dtype=torch.float32))
    angles = ((guidance_scale.float() - 1) * 1000.0)[:, None] * frequencies.to(guidance_scale.device)[None, :]
    embedding = torch.cat([angles.sin(), angles.cos()], dim=1)
    return nn.functional.pad(embedding, (0, dim % 2))


def ddim_step(x0: torch.Tensor, eps: torch.Tensor, t_next: torch.Tensor, process: NoiseProcess) -> torch.Tensor:
    """One deterministic ODE step to timestep ``t_next``: the forward process applied to the predicted pair,

        x_{t'} = α_{t'} x̂0 + σ_{t'} ε̂

    DDIM (Song et al. 2021, eq. 12, η = 0) on a variance-preserving process; on rectified flow it is
    exactly the Euler step x_{t'} = x_t + (σ' − σ) v̂ of the flow ODE, since x_t = (1 − σ) x̂0 + σ ε̂.
    """
    return process.add_noise(x0, eps, t_next)


def few_step_sample(
    denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    noise: torch.Tensor,
    timesteps: Sequence[float],
    process: NoiseProcess,
    generator: torch.Generator | None = None,
    stop_before: int | None = None,
    draw_noise: Callable[..., torch.Tensor] = randn_tensor,
) -> torch.Tensor:
    """The few-step student sampler (LCM's multistep sampling, Luo et al. 2023, Alg. 1; DMD2 §4.3).

    Start at x = noise on ``timesteps[0]``; at each step predict x̂0 = denoise(x, t) and, unless
    it was the last step, re-noise it to the next timestep with fresh noise:
    x ← α_{t'} x̂0 + σ_{t'} ε. Returns the final x̂0, or with ``stop_before=k`` the noisy input
    of step k (DMD2's backward simulation trains the student on exactly those inputs). This is
    what diffusers' ``LCMScheduler`` computes with the exported config and the same generator, and what
    ``FlowMatchLCMScheduler`` computes on a flow teacher for one batch when torch's global generator is
    seeded like ``generator`` (SD3's and Flux's pipelines do not pass theirs to the scheduler, and that
    scheduler also draws at its last step, so later batches' draws differ), with
    ``draw_noise(shape, generator=, device=, dtype=)`` drawing as the pipeline does (``randn_tensor``;
    Flux's in its packed layout, :meth:`~stepdistill.models.backbones.Backbone.draw_noise`).
    """
    x = noise
    batch = noise.shape[0]
    for i, t in enumerate(timesteps):
        if i == stop_before:
            return x
        x0 = denoise(x, torch.full((batch,), float(t), device=noise.device))
        if i == len(timesteps) - 1:
            return x0
        fresh = draw_noise(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x = process.add_noise(x0, fresh, torch.full((batch,), float(timesteps[i + 1])))
    raise ValueError("timesteps must not be empty")


def ddim_sample(
    denoise: Callable[[torch.Tensor, torch.Tensor], Prediction], noise: torch.Tensor, timesteps: Sequence[float],
    process: NoiseProcess,
) -> torch.Tensor:
    """Deterministic DDIM sampling (Song et al. 2021, η = 0) on ``timesteps``, noisiest first: at each
    step predict (x̂0, ε̂) = denoise(x, t) and move to the next timestep, x ← α_{t'} x̂0 + σ_{t'} ε̂
    (:func:`ddim_step`; the Euler step on a flow); the last step returns x̂0. This is diffusers'
    ``DDIMScheduler`` with ``set_alpha_to_one=True`` when ``timesteps`` are its own (N dividing T, so
    that its step t → t − T // N lands on the next one), and its flow-matching Euler scheduler on a flow.
    """
    x = noise
    for i, t in enumerate(timesteps):
        prediction = denoise(x, torch.full((noise.shape[0],), float(t), device=noise.device))
        if i == len(timesteps) - 1:
            return prediction.x0
        x = ddim_step(prediction.x0, prediction.eps, torch.full((noise.shape[0],), float(timesteps[i + 1])), process)
    raise ValueError("timesteps must not be empty")
