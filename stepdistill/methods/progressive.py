"""Progressive distillation (Salimans & Ho, "Progressive Distillation for Fast Sampling of Diffusion
Models", 2022) and guidance distillation (Meng et al., "On Distillation of Guided Diffusion Models", 2023).

**Grids.** The final N-step student samples deterministically (DDIM, η = 0; the Euler step on a flow)
on the grid its exported scheduler visits, g^N = (τ_0 > … > τ_{N−1}, τ_N), where τ_N is the clean
end: DDIM's last step to ᾱ = 1, σ = 0 on a flow, so that step returns x̂0 itself. Every earlier stage
doubles the grid by inserting midpoints (:meth:`~stepdistill.diffusion.NoiseProcess.midpoint`), so a
stage's teacher grid G = g^{2M} holds its student grid g^M at its even points, g^M_i = G_{2i}.

**A halving stage** (student M steps, teacher 2M), one example (§3, Alg. 2):

    x0 ~ data,  i ~ U{0..M−1},  t = G_{2i},  t′ = G_{2i+1},  t″ = G_{2i+2},  z_t = α_t x0 + σ_t ε
    z_t′ = α_t′ x̂0 + σ_t′ ε̂,  (x̂0, ε̂) = teacher(z_t, t)          two DDIM steps of the teacher
    z_t″ = α_t″ x̂0′ + σ_t″ ε̂′, (x̂0′, ε̂′) = teacher(z_t′, t′)
    x̃ = (z_t″ − (σ_t″/σ_t) z_t) / (α_t″ − (σ_t″/σ_t) α_t)           one DDIM step t → t″ from x̃ lands on z_t″
    L = max(α_t²/σ_t², 1) ‖x̂0_θ(z_t, t) − x̃‖²                        truncated-SNR weighting (§4)

where t″ is the clean end, x̃ = z_t″ = x̂0′. The halving stages' student learns in a parameterisation
that survives one step (:meth:`~stepdistill.diffusion.NoiseProcess.for_few_steps`: v on a
variance-preserving teacher, where ε-prediction's x̂0 = (z − σ ε̂)/α explodes as α_T → 0; the flow's
own velocity).

**Guidance distillation** (Meng et al., stage one): with w ~ U[w_min, w_max] and t drawn over all
the teacher's timesteps, the student x̂0_θ(z_t, t, w) matches the teacher's classifier-free guided
x̂0 at w, with the same weighting, in one network call, in the teacher's own parameterisation: the
student starts as the teacher's conditional branch and only learns guidance's change (reading an
ε-network's output as v from the first update would make it also relearn its output at every noise
level; on the digits that left the guidance student 1.12× the CFG teacher's FD at 32 steps and 1.31×
at 8, against 0.98× and 0.99× in ε). The first halving stage moves it to v. A UNet student takes w through its
guidance-scale embedding (diffusers' ``time_cond_proj_dim``), so one student samples at any w of the
range; a student without one (SD3, Flux) distils one fixed w. The halving stages that follow keep w
as the student's and the stage teacher's input.

**Teachers.** The first stage's teacher is the original one, guided at w by CFG (two passes); every
later stage's is the previous stage's student, frozen (:class:`~stepdistill.models.networks.StageTeacher`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from stepdistill import draws
from stepdistill.diffusion import NoiseProcess, Prediction
from stepdistill.methods.base import Batch, Losses
from stepdistill.models.denoiser import Denoiser, guided
from stepdistill.models.networks import StageTeacher

GUIDANCE_STAGE = 0
"""The student step count that names the guidance-distillation stage in :attr:`ProgressiveDistillation.stages`."""


def halving_stages(start_steps: int, end_steps: int) -> list[int]:
    """The student step counts of the halving stages, ``start_steps / 2`` down to ``end_steps``."""
    if end_steps < 1 or start_steps <= end_steps:
        raise ValueError(f"need start_steps > end_steps ≥ 1 (got {start_steps}, {end_steps})")
    ratio = start_steps // end_steps
    if start_steps % end_steps or ratio & (ratio - 1):
        raise ValueError(f"start_steps must be end_steps times a power of two, as every stage halves the steps "
                         f"(got {start_steps} and {end_steps})")
    stages = []
    while start_steps > end_steps:
        start_steps //= 2
        stages.append(start_steps)
    return stages


def refine(grid: torch.Tensor, process: NoiseProcess) -> torch.Tensor:
    """The grid of twice the steps: ``grid`` (N + 1 points, noisiest first) with midpoints between
    neighbours, so ``refine(g)[::2] == g``."""
    fine = torch.empty(2 * len(grid) - 1, dtype=torch.float64)
    fine[0::2] = grid
    fine[1::2] = process.midpoint(grid[:-1], grid[1:])
    if not (fine[1:] < fine[:-1]).all():
        raise ValueError(f"{len(fine) - 1} steps are more than the teacher's timesteps can space apart; "
                         "start from fewer")
    return fine


def grid_coefficients(grid: torch.Tensor, process: NoiseProcess) -> tuple[torch.Tensor, torch.Tensor]:
    """(α, σ) at every grid point (float64): the process's, and (1, 0) at the clean end."""
    like = torch.zeros(len(grid) - 1, dtype=torch.float64)
    alpha = torch.cat([process.alpha(grid[:-1], like).reshape(-1), torch.ones(1, dtype=torch.float64)])
    sigma = torch.cat([process.sigma(grid[:-1], like).reshape(-1), torch.zeros(1, dtype=torch.float64)])
    return alpha, sigma


def two_step_target(
    z_t: torch.Tensor, z_end: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor, alpha_end: torch.Tensor,
    sigma_end: torch.Tensor,
) -> torch.Tensor:
    """x̃ = (z_t″ − (σ_t″/σ_t) z_t) / (α_t″ − (σ_t″/σ_t) α_t) (Salimans & Ho eq. 8): the clean sample
    from which one DDIM step t → t″ starting at z_t lands on ``z_end`` = z_t″. Coefficients broadcast."""
    ratio = sigma_end / sigma
    return (z_end - ratio * z_t) / (alpha_end - ratio * alpha)


def truncated_snr_weight(alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """max(SNR, 1) with SNR = α²/σ² (Salimans & Ho §4, "truncated SNR"): x0-space error weighted like
    ε-prediction's where the signal dominates, and at least 1 where noise does (SNR → 0 at pure noise)."""
    return torch.clamp(alpha**2 / sigma**2, min=1.0)


def weighted_squared_error(prediction: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """mean over the batch of weight_b · mean((prediction_b − target_b)²)."""
    per_sample = ((prediction.float() - target.float()) ** 2).flatten(1).mean(1)
    return (weight.to(per_sample) * per_sample).mean()


@dataclass(eq=False)
class ProgressiveDistillation:
    """Progressive distillation of ``teacher`` down to ``final_grid`` (the exported N-step grid, N + 1
    points, :func:`~stepdistill.export.sampling_grid`) from ``start_steps``, optionally after a
    guidance-distillation stage.

    ``stages`` lists each stage's student step count (:data:`GUIDANCE_STAGE` for the guidance
    stage); the trainer moves from one to the next through :meth:`begin_stage`. ``student`` (built in
    the teacher's parameterisation) works in :meth:`process_of` its stage, which the method sets;
    ``stage_teacher`` is the frozen copy the hand-over refreshes.
    ``guidance_scale_min/max``: the teacher's CFG w (w = 1 unguided), drawn per sample; a range needs
    a student that takes w as an input.
    """

    teacher: Denoiser
    student: Denoiser
    stage_teacher: StageTeacher
    final_grid: torch.Tensor
    start_steps: int
    guidance_distillation: bool = False
    guidance_scale_min: float = 1.0
    guidance_scale_max: float = 1.0

    critic_steps_per_generator_step = 1

    def __post_init__(self) -> None:
        if not 0 <= self.guidance_scale_min <= self.guidance_scale_max:
            raise ValueError(f"the guidance range needs 0 ≤ min ≤ max (got [{self.guidance_scale_min}, "
                             f"{self.guidance_scale_max}])")
        if self.guidance_scale_min != self.guidance_scale_max and not self.embeds_guidance:
            raise ValueError("a range of guidance scales needs a student that takes w as an input (a UNet's "
                             "guidance-scale embedding); without one, distil a single w")
        steps, grid = len(self.final_grid) - 1, self.final_grid.double()
        self.stages = ([GUIDANCE_STAGE] if self.guidance_distillation else []) + halving_stages(self.start_steps, steps)
        self.stage = 0
        self._set_parameterisations()
        self.grids = {steps: grid}  # by step count, end_steps up to start_steps
        while steps < self.start_steps:
            steps, grid = 2 * steps, refine(grid, self.process)
            self.grids[steps] = grid
        self.coefficients = {steps: grid_coefficients(grid, self.process) for steps, grid in self.grids.items()}

    @property
    def process(self) -> NoiseProcess:
        """The student's process (the teacher's schedule in the student's parameterisation)."""
        return self.student.process

    def process_of(self, stage: int) -> NoiseProcess:
        """The parameterisation the student of ``stage`` predicts in: the teacher's in the guidance stage,
        ``for_few_steps()`` in the halving stages."""
        process = self.teacher.process
        return process if self.stages[stage] == GUIDANCE_STAGE else process.for_few_steps()

    def _set_parameterisations(self) -> None:
        """The current stage's student reads its output in :meth:`process_of` its stage, the stage teacher
        (the student of the stage before) in that stage's."""
        self.student.process = self.process_of(self.stage)
        if self.stage > 0:
            self.stage_teacher.denoiser.process = self.process_of(self.stage - 1)

    @property
    def embeds_guidance(self) -> bool:
        """Whether the student (and so every stage teacher) takes w as an input."""
        return self.student.takes_guidance_scale

    @property
    def student_steps(self) -> int:
        """The current stage's student step count (the guidance stage's student samples on the start grid)."""
        return self.stages[self.stage] or self.start_steps

    @property
    def student_timesteps(self) -> tuple[float, ...]:
        """The timesteps the current student samples on (its grid without the clean end)."""
        return tuple(self.grids[self.student_steps][:-1].tolist())

    def begin_stage(self, stage: int) -> None:
        """The hand-over: the student as it is becomes the frozen teacher of ``stage``."""
        if not 0 < stage < len(self.stages):
            raise ValueError(f"stage must be in 1..{len(self.stages) - 1} (got {stage})")
        self.stage_teacher.copy_student()
        self.stage = stage
        self._set_parameterisations()

    @property
    def frozen_networks(self) -> list[nn.Module]:
        """The stage teacher's own network (a full student's copy; a LoRA one lives on the student's):
        laid out like the trainer's networks on several processes."""
        return [] if self.student.adapter is not None else [self.stage_teacher.denoiser.network]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The stage and the stage teacher's weights, for checkpoints."""
        copy = {f"stage_teacher.{name}": tensor for name, tensor in self.stage_teacher.state_dict().items()}
        return {"stage": torch.tensor([self.stage]), **copy}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if "stage" not in state:
            raise KeyError("no progressive-distillation stage in the checkpoint")
        prefix = "stage_teacher."
        self.stage_teacher.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
        self.stage = int(state["stage"].item())
        self._set_parameterisations()

    def teacher_prediction(self, z: torch.Tensor, t: torch.Tensor, batch: Batch, w: torch.Tensor) -> Prediction:
        """The current stage's teacher at per-sample scales ``w``: the original teacher guided by CFG in
        the first stage, afterwards the stage teacher (given w if it takes it)."""
        if self.stage == 0:
            if self.guidance_scale_min == self.guidance_scale_max == 1.0:
                return self.teacher(z, t, batch.condition)
            return guided(self.teacher, z, t, batch.condition, batch.unconditional, w)
        return self.stage_teacher.denoiser(z, t, batch.condition, embedded_guidance=w if self.embeds_guidance else None)

    def generator_loss(self, batch: Batch) -> Losses:
        if batch.real_latents is None:
            raise ValueError("progressive distillation noises real images: the batch needs real_latents")
        x0 = batch.real_latents
        w = draws.uniform(self.guidance_scale_min, self.guidance_scale_max, (batch.size,), device=x0.device)
        if self.stages[self.stage] == GUIDANCE_STAGE:
            t, (alpha, sigma) = self._any_timesteps(batch.size, x0)
            z_t = alpha * x0 + sigma * draws.randn_like(x0)
            with torch.no_grad():
                target = self.teacher_prediction(z_t, t, batch, w).x0
        else:
            z_t, t, alpha, sigma, target = self.halving_example(x0, batch, w)
        prediction = self.student(z_t, t, batch.condition, embedded_guidance=w if self.embeds_guidance else None).x0
        return {"loss": weighted_squared_error(prediction, target, truncated_snr_weight(alpha, sigma).flatten())}

    def _any_timesteps(self, size: int, like: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Timesteps over the teacher's whole range (the guidance stage) and their (α, σ)."""
        t = self.process.sample_timesteps(size, 0, self.process.max_timestep, like.device)
        return t, (self.process.alpha(t, like).float(), self.process.sigma(t, like).float())

    def halving_example(
        self, x0: torch.Tensor, batch: Batch, w: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(z_t, t, α_t, σ_t, x̃): a noised sample at a random point of the student's grid and its target
        made from two teacher DDIM steps (module docstring); the current stage must be a halving one."""
        steps = self.stages[self.stage]
        grid, (alphas, sigmas) = self.grids[2 * steps], self.coefficients[2 * steps]
        i = 2 * draws.randint(0, steps, (batch.size,))
        shape = (-1, *([1] * (x0.ndim - 1)))
        t, t_mid = (grid[j].float().to(x0.device) for j in (i, i + 1))
        alpha, sigma, alpha_mid, sigma_mid, alpha_end, sigma_end = (
            c[j].to(x0).reshape(shape) for j in (i, i + 1, i + 2) for c in (alphas, sigmas))
        z_t = alpha * x0 + sigma * draws.randn_like(x0)
        with torch.no_grad():
            first = self.teacher_prediction(z_t, t, batch, w)
            z_mid = alpha_mid * first.x0 + sigma_mid * first.eps
            second = self.teacher_prediction(z_mid, t_mid, batch, w)
            z_end = alpha_end * second.x0 + sigma_end * second.eps
            target = two_step_target(z_t, z_end, alpha, sigma, alpha_end, sigma_end)
        return z_t, t, alpha, sigma, target
