"""Consistency distillation: Latent Consistency Models (LCM, Luo et al. 2023), its LoRA form
(LCM-LoRA, Luo et al. 2023b) and trajectory-segmented consistency (TSCD, Hyper-SD, Ren et al. 2024).

The teacher's solver grid (LCM §4.3, "skipping-step"): with skipping interval k and T training
timesteps, N = T / k steps; on a variance-preserving teacher g_0 = 0 and g_n = n k − 1 (k = 20: the
50-point grid that diffusers' ``LCMScheduler`` samples on, its ``original_inference_steps`` = N); on a
rectified-flow teacher σ_n = shift(n / N) (:meth:`~stepdistill.diffusion.NoiseProcess.solver_grid`),
where the DDIM step below is exactly the flow ODE's Euler step. One example:

    x0 ~ data,  n ~ U{1..N},  ε ~ N(0, I),  x_{g_n} = α x0 + σ ε                  (forward process)
    w ~ U[w_min, w_max],  (x̂0, ε̂) = CFG_w(teacher(x_{g_n}, g_n))                  (LCM eq. 12)
    x̂_{g_{n−1}} = α_{g_{n−1}} x̂0 + σ_{g_{n−1}} ε̂                                 (DDIM, η = 0)
    L = d( F_θ(x_{g_n}, g_n),  sg F_θ⁻(x̂_{g_{n−1}}, g_{n−1}) )                     (LCM eq. 13)

F is built on the consistency function f_θ(x, t) = c_skip(t) x + c_out(t) x̂0_θ(x, t) with
diffusers' ``LCMScheduler`` scalings on a variance-preserving teacher (boundary condition f(x, 0) = x);
on a flow teacher f = x̂0 = x_t − σ v̂ itself, whose boundary condition holds by construction (what
``FlowMatchLCMScheduler`` samples). ε_f = (x − α_t f) / σ_t:

* one segment (LCM): F = f, every step targets the trajectory's end;
* S segments (TSCD): the N steps split into S runs of N/S; a step in segment s targets the
  segment's lower boundary g_b, b = s N/S, through the DDIM jump F = α_{g_b} f + σ_{g_b} ε_f
  (the identity at t = g_b); the last segment (b = 0) is LCM's F = f.

A full-weight student may take w as an input (LCM §4.1; :mod:`~stepdistill.models.guidance_embedding`):
student and target then see the w the teacher step used, and one student samples at any w of the range.

Sampling (``SAMPLERS``), on timesteps τ_1 > … > τ_K:

* ``lcm`` (LCM Alg. 3, diffusers' ``LCMScheduler``): x ← α_{τ_{i+1}} f(x, τ_i) + σ_{τ_{i+1}} z with fresh
  z ~ N(0, I) at each step; the last step returns f;
* ``ddim`` (Hyper-SD's sampler for segmented students): x ← α_{τ_{i+1}} f + σ_{τ_{i+1}} ε_f, η = 0, which
  on a segment boundary τ_{i+1} = g_b is the student's trained F; sampled in S steps at the S segment
  starts it follows the teacher's ODE jump by jump.

Target θ⁻: an EMA of the student, θ⁻ ← μ θ⁻ + (1 − μ) θ after each update (LCM: μ = 0.95), or the
stop-gradient student itself, μ = 0 (LCM-LoRA; Song & Dhariwal 2023 found it better). Distance d:
pseudo-Huber √((a − b)² + c²) − c per element, c = 0.001 (iCT, Song & Dhariwal 2023; the constant
and per-element form of diffusers' LCM scripts), or squared error.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from stepdistill import draws
from stepdistill.conditioning import Condition
from stepdistill.diffusion import NoiseProcess, ddim_step
from stepdistill.methods.base import Batch, Losses
from stepdistill.models.denoiser import Denoiser, Prediction, guided

LOSS_TYPES = ("huber", "l2")
SAMPLERS = ("lcm", "ddim")  # multistep consistency sampling (fresh noise each step) or deterministic DDIM steps
LCM_TIMESTEP_SCALING = 10.0  # LCM's s in c_skip/c_out; diffusers' LCMScheduler default


class ConsistencyDenoiser(nn.Module):
    """A consistency function on a denoiser (LCM eq. 9): f(x_t, t) = c_skip(t) x_t + c_out(t) x̂0(x_t, t).

    The scalings are the process's (:meth:`~stepdistill.diffusion.NoiseProcess.consistency_scalings`):
    ``LCMScheduler``'s, so that scheduler with the same ``timestep_scaling`` samples it exactly, or
    c_skip = 0, c_out = 1 on a flow teacher (``FlowMatchLCMScheduler``). Returns
    ``Prediction(x0=f, eps=(x_t − α_t f) / σ_t)``: samplers and DDIM steps use f as any x̂0.
    """

    def __init__(self, denoiser: Denoiser, timestep_scaling: float = LCM_TIMESTEP_SCALING) -> None:
        super().__init__()
        if not timestep_scaling > 0:
            raise ValueError(f"timestep_scaling must be > 0 (got {timestep_scaling})")
        self.denoiser = denoiser
        self.timestep_scaling = timestep_scaling

    @property
    def process(self) -> NoiseProcess:
        return self.denoiser.process

    @property
    def takes_guidance_scale(self) -> bool:
        return self.denoiser.takes_guidance_scale

    def forward(
        self, x_t: torch.Tensor, t: torch.Tensor, condition: Condition, embedded_guidance: torch.Tensor | None = None
    ) -> Prediction:
        x0 = self.denoiser(x_t, t, condition, embedded_guidance=embedded_guidance).x0
        x_t = x_t.float()
        c_skip, c_out = self.process.consistency_scalings(t, self.timestep_scaling, x0)
        f = c_skip * x_t + c_out * x0
        eps = (x_t - self.process.alpha(t, f) * f) / self.process.sigma(t, f)
        return Prediction(x0=f, eps=eps)


def solver_grid(process: NoiseProcess, skipping_interval: int) -> torch.Tensor:
    """The teacher's solver grid of N = T / k steps (N + 1 float32 timesteps, cleanest first): DDIM's
    ``[0, k − 1, 2k − 1, …, T − 1]`` on a variance-preserving teacher."""
    return process.solver_grid(solver_steps(process.num_train_timesteps, skipping_interval)).float()


def solver_steps(num_train_timesteps: int, skipping_interval: int) -> int:
    """N = T / k, the number of teacher solver steps; k must divide T."""
    if skipping_interval < 1:
        raise ValueError(f"skipping_interval must be ≥ 1 (got {skipping_interval})")
    if skipping_interval > num_train_timesteps:
        raise ValueError(
            f"skipping_interval {skipping_interval} is larger than the teacher's grid of {num_train_timesteps} "
            "training timesteps"
        )
    if num_train_timesteps % skipping_interval:
        raise ValueError(
            f"skipping_interval {skipping_interval} must divide the teacher's {num_train_timesteps} training timesteps "
            "(LCMScheduler samples on t = k·n − 1 with k = T / N); e.g. 20 (LCM's) or 25"
        )
    return num_train_timesteps // skipping_interval


def segment_length(num_solver_steps: int, num_segments: int) -> int:
    """Solver steps per TSCD segment; the segments must split the N steps evenly."""
    if num_segments < 1:
        raise ValueError(f"num_segments must be ≥ 1 (got {num_segments})")
    if num_solver_steps % num_segments:
        raise ValueError(
            f"num_segments {num_segments} must divide the {num_solver_steps} solver steps of the teacher's grid "
            f"(T / skipping_interval); choose a skipping_interval that makes them divisible (25 gives 40 on T = 1000)"
        )
    return num_solver_steps // num_segments


def pseudo_huber(prediction: torch.Tensor, target: torch.Tensor, c: float) -> torch.Tensor:
    """mean(√((a − b)² + c²) − c): ≈ squared error / 2c for |a − b| ≪ c, ≈ |a − b| beyond."""
    return (((prediction.float() - target.float()) ** 2 + c**2).sqrt() - c).mean()


def squared_error(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((prediction.float() - target.float()) ** 2).mean()


@dataclass(eq=False)
class ConsistencyDistillation:
    """LCM / LCM-LoRA / TSCD consistency distillation of ``teacher`` into ``student`` (f_θ).

    ``guidance_scale_min/max``: the teacher's CFG scale w (diffusers' convention, w = 1 is
    unguided; LCM's ω is w − 1), drawn per sample. ``target_ema_decay`` μ > 0 keeps a frozen copy
    of the student as f_θ⁻, which :meth:`update_target` moves after each student update; μ = 0
    uses the stop-gradient student itself (the only choice for LoRA students).
    """

    teacher: nn.Module
    student: ConsistencyDenoiser
    process: NoiseProcess
    skipping_interval: int = 20
    num_segments: int = 1
    guidance_scale_min: float = 1.0
    guidance_scale_max: float = 1.0
    loss_type: str = "huber"
    huber_c: float = 1e-3
    target_ema_decay: float = 0.0

    def __post_init__(self) -> None:
        self.grid = solver_grid(self.process, self.skipping_interval)
        self.steps_per_segment = segment_length(len(self.grid) - 1, self.num_segments)
        if not 0 <= self.guidance_scale_min <= self.guidance_scale_max:
            raise ValueError(
                f"the guidance range needs 0 ≤ min ≤ max (got [{self.guidance_scale_min}, {self.guidance_scale_max}])"
            )
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES} (got {self.loss_type!r})")
        if not self.huber_c > 0:
            raise ValueError(f"huber_c must be > 0 (got {self.huber_c})")
        if not 0 <= self.target_ema_decay < 1:
            raise ValueError(f"target_ema_decay must be in [0, 1) (got {self.target_ema_decay})")
        # the segment boundaries' (α, σ) by grid index; index 0 is the clean end, F = f
        boundary = self.grid[1:]
        like = torch.zeros(len(boundary), dtype=torch.float64)
        self.boundary_alpha = torch.cat([torch.ones(1, dtype=torch.float64), self.process.alpha(boundary, like)])
        self.boundary_sigma = torch.cat([torch.zeros(1, dtype=torch.float64), self.process.sigma(boundary, like)])
        self.target = self.student
        if self.ema_target:
            if getattr(self.student.denoiser.network, "_hf_peft_config_loaded", False):
                raise ValueError("an EMA target needs a full-weight student; a LoRA student's target is itself")
            self.target = copy.deepcopy(self.student).requires_grad_(False).eval()

    @property
    def embeds_guidance(self) -> bool:
        """Whether the student takes the teacher's guidance scale w as an input."""
        return self.student.takes_guidance_scale

    @property
    def ema_target(self) -> bool:
        """Whether f_θ⁻ is a frozen EMA copy (to checkpoint and to update after each student step)."""
        return self.target_ema_decay > 0

    @property
    def frozen_networks(self) -> list[nn.Module]:
        """The network the method holds besides the trainer's (an EMA target's): laid out like them on
        several processes."""
        return [self.target.denoiser.network] if self.ema_target else []

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The EMA target's weights (none without one): the trainer keeps them in every checkpoint."""
        return dict(self.target.state_dict()) if self.ema_target else {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore the EMA target from a checkpoint (an empty ``state`` for a run without one)."""
        if self.ema_target:
            self.target.load_state_dict(state)
        elif state:
            raise KeyError(f"the checkpoint holds an EMA target ({len(state)} tensors) but this run has none")

    def after_generator_update(self) -> None:
        """The trainer's hook after each applied student update: move an EMA target."""
        if self.ema_target:
            self.update_target()

    @torch.no_grad()
    def update_target(self) -> None:
        """θ⁻ ← μ θ⁻ + (1 − μ) θ (LCM Alg. 1, last line); call after every student update."""
        if not self.ema_target:
            raise RuntimeError("update_target is for an EMA target (target_ema_decay > 0)")
        for target, online in zip(self.target.parameters(), self.student.parameters(), strict=True):
            target.lerp_(online.detach().to(target.dtype), 1 - self.target_ema_decay)

    def teacher_step(
        self, x_t: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor, batch: Batch, w: torch.Tensor
    ) -> torch.Tensor:
        """x̂_{t_prev}: one DDIM step (a flow teacher's Euler step) of the teacher guided at per-sample
        scales ``w`` ``(B,)`` (:func:`~stepdistill.models.denoiser.guided`)."""
        if self.guidance_scale_min == self.guidance_scale_max == 1.0:
            prediction = self.teacher(x_t, t, batch.condition)
        else:
            prediction = guided(self.teacher, x_t, t, batch.condition, batch.unconditional, w)
        return ddim_step(prediction.x0, prediction.eps, t_prev, self.process)

    def to_boundary(self, prediction: Prediction, boundary: torch.Tensor) -> torch.Tensor:
        """F = α_{g_b} f + σ_{g_b} ε_f for grid indices ``boundary`` (F = f where b = 0)."""
        shape = (-1, *([1] * (prediction.x0.ndim - 1)))
        alpha = self.boundary_alpha[boundary].to(prediction.x0).reshape(shape)
        sigma = self.boundary_sigma[boundary].to(prediction.x0).reshape(shape)
        return alpha * prediction.x0 + sigma * prediction.eps

    def distance(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.loss_type == "huber":
            return pseudo_huber(prediction, target, self.huber_c)
        return squared_error(prediction, target)

    def generator_loss(self, batch: Batch) -> Losses:
        if batch.real_latents is None:
            raise ValueError("consistency distillation noises real images: the batch needs real_latents")
        x0 = batch.real_latents
        device = x0.device
        # 1. a solver step n ~ U{1..N} on the teacher's grid, and the boundary index of its segment
        n = draws.randint(1, len(self.grid), (batch.size,))
        boundary = (n - 1) // self.steps_per_segment * self.steps_per_segment
        t, t_prev = self.grid[n].to(device), self.grid[n - 1].to(device)
        # 2. forward process: x_t = α_t x0 + σ_t ε
        x_t = self.process.add_noise(x0, draws.randn_like(x0), t)
        # 3. target: the teacher's DDIM step t → t_prev guided at w ~ U[w_min, w_max], then f_θ⁻ there (no gradient)
        w = draws.uniform(self.guidance_scale_min, self.guidance_scale_max, (batch.size,), device=device)
        embedded = w if self.embeds_guidance else None
        with torch.no_grad():
            x_prev = self.teacher_step(x_t, t, t_prev, batch, w)
            target = self.to_boundary(self.target(x_prev, t_prev, batch.condition, embedded), boundary)
        # 4. the student's consistency output at t, with gradient (and w, if it takes it)
        prediction = self.to_boundary(self.student(x_t, t, batch.condition, embedded), boundary)
        losses: Losses = {"consistency": self.distance(prediction, target)}
        losses["loss"] = losses["consistency"]
        return losses
