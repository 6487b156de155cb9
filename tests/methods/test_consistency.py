"""Consistency distillation's parts on toys where the answer is known.

The Gaussian toy: data x0 ~ N(μ, s²) per coordinate, whose exact denoiser is affine,
E[x0 | x_t] = μ + α s² (x_t − α μ) / (α² s² + σ²). With it as the teacher, the exact consistency
function of the teacher's DDIM chain is known (run the chain to the segment's boundary), and at that
fixed point the consistency loss must vanish.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, LCMScheduler
from torch import nn

from stepdistill import conditioning
from stepdistill.diffusion import ddim_step, process_from_scheduler
from stepdistill.methods.base import Batch
from stepdistill.methods.consistency import (
    ConsistencyDenoiser,
    ConsistencyDistillation,
    pseudo_huber,
    segment_length,
    solver_grid,
    squared_error,
)
from stepdistill.models.denoiser import Prediction

MU, S = 0.7, 0.4


def sd_scheduler(cls=DDPMScheduler, **kwargs):
    return cls(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, **kwargs)


PROCESS = process_from_scheduler(sd_scheduler())


def grid_index(t: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    return (t.reshape(-1, 1).cpu() == grid.reshape(1, -1)).long().argmax(dim=1)


class GaussianTeacher(nn.Module):
    """The exact denoiser of N(MU, S²) data; the condition's ``prompt_embeds`` shifts the mean so
    conditional ≠ unconditional."""

    process = PROCESS
    takes_guidance_scale = False

    def forward(self, x_t, t, condition, embedded_guidance=None):
        alpha, sigma = PROCESS.alpha(t, x_t), PROCESS.sigma(t, x_t)
        mu = MU + condition["prompt_embeds"].reshape(-1, *([1] * (x_t.ndim - 1)))
        x0 = mu + alpha * S**2 * (x_t - alpha * mu) / (alpha**2 * S**2 + sigma**2)
        return Prediction(x0=x0, eps=(x_t - alpha * x0) / sigma)


class ExactConsistencyStudent(nn.Module):
    """The teacher chain's consistency function F(x, g_n) = chain(x, g_n → g_b), written as (f, ε_f)."""

    process = PROCESS
    takes_guidance_scale = False

    def __init__(self, teacher: nn.Module, grid: torch.Tensor, steps_per_segment: int) -> None:
        super().__init__()
        self.teacher, self.grid, self.steps_per_segment = teacher, grid, steps_per_segment

    def forward(self, x, t, condition, embedded_guidance=None):
        outputs = []
        for x_i, n, condition_i in zip(x.split(1), grid_index(t, self.grid).tolist(), conditioning.split(condition, 1)):
            b = max(n - 1, 0) // self.steps_per_segment * self.steps_per_segment
            x_b = x_i
            for m in range(n, b, -1):  # the teacher's DDIM chain g_n → g_b
                step = self.teacher(x_b, self.grid[m : m + 1], condition_i)
                x_b = ddim_step(step.x0, step.eps, self.grid[m - 1 : m], PROCESS)
            t_n = self.grid[n : n + 1]
            alpha_n, sigma_n = PROCESS.alpha(t_n, x_i), PROCESS.sigma(t_n, x_i)
            if b == 0:
                f = x_b  # LCM: F = f, the chain's end
            else:  # solve α_b f + σ_b ε_f = x_b with ε_f = (x − α_n f) / σ_n
                alpha_b, sigma_b = PROCESS.alpha(self.grid[b : b + 1], x_i), PROCESS.sigma(self.grid[b : b + 1], x_i)
                f = (x_b - sigma_b / sigma_n * x_i) / (alpha_b - sigma_b * alpha_n / sigma_n)
            outputs.append(f)
        f = torch.cat(outputs)
        alpha, sigma = PROCESS.alpha(t, f), PROCESS.sigma(t, f)
        return Prediction(x0=f, eps=(x - alpha * f) / sigma)


def gaussian_batch(size: int = 64, dim: int = 8, text: float = 0.0) -> Batch:
    generator = torch.Generator().manual_seed(0)
    x0 = MU + text + S * torch.randn(size, dim, dtype=torch.float64, generator=generator)
    return Batch(condition={"prompt_embeds": torch.full((size, 1, 1), text, dtype=torch.float64)},
                 unconditional={"prompt_embeds": torch.zeros(size, 1, 1, dtype=torch.float64)}, real_latents=x0)


def method_on(student, **kwargs) -> ConsistencyDistillation:
    return ConsistencyDistillation(teacher=GaussianTeacher(), student=student, process=PROCESS, **kwargs)


# -- the solver step and the grid -----------------------------------------------------------------

def test_grid_is_lcm_schedulers_and_ddims():
    grid = solver_grid(PROCESS, 20)
    assert grid[:3].tolist() == [0, 19, 39] and grid[-1] == 999 and len(grid) == 51
    lcm = sd_scheduler(LCMScheduler)
    lcm.set_timesteps(50)
    ddim = sd_scheduler(DDIMScheduler, timestep_spacing="trailing")
    ddim.set_timesteps(50)
    assert lcm.timesteps.tolist() == ddim.timesteps.tolist() == grid[1:].flip(0).tolist()


@pytest.mark.parametrize("guidance_scale", [1.0, 2.5])
def test_teacher_step_is_diffusers_ddim_step(guidance_scale):
    """One guided DDIM step g_n → g_{n−1} for every n equals DDIMScheduler.step (η = 0) on the guided ε."""
    scheduler = sd_scheduler(DDIMScheduler, timestep_spacing="trailing", set_alpha_to_one=False, clip_sample=False)
    scheduler.set_timesteps(50)
    method = method_on(ConsistencyDenoiser(GaussianTeacher()), guidance_scale_min=guidance_scale,
                       guidance_scale_max=guidance_scale)
    n = torch.arange(1, 51)
    x_t = torch.randn(50, 4, 3, 3, generator=torch.Generator().manual_seed(1))
    batch = Batch(condition={"prompt_embeds": torch.full((50, 1, 1), 0.3)},
                  unconditional={"prompt_embeds": torch.zeros(50, 1, 1)})
    ours = method.teacher_step(x_t, method.grid[n], method.grid[n - 1], batch, torch.full((50,), guidance_scale))

    teacher = GaussianTeacher()
    for i, t in enumerate(method.grid[n].tolist()):
        x = x_t[i : i + 1]
        conditional = teacher(x, torch.tensor([t]), conditioning.select(batch.condition, slice(i, i + 1))).eps
        unconditional = teacher(x, torch.tensor([t]), conditioning.select(batch.unconditional, slice(i, i + 1))).eps
        eps = unconditional + guidance_scale * (conditional - unconditional)
        expected = scheduler.step(eps, int(t), x, eta=0.0).prev_sample
        torch.testing.assert_close(ours[i : i + 1], expected, rtol=1e-5, atol=1e-5)


# -- the boundary condition --------------------------------------------------------------------

class ToyDenoiser(nn.Module):
    """A small trainable ε-network behind the denoiser contract (``network`` like the real one)."""

    process = PROCESS
    takes_guidance_scale = False

    def __init__(self) -> None:
        super().__init__()
        self.network = nn.Linear(8, 8)

    def forward(self, x_t, t, condition, embedded_guidance=None):
        eps = self.network(x_t) + 0.001 * t.reshape(-1, 1).float()
        x0, eps = PROCESS.to_x0_eps(eps, x_t, t)
        return Prediction(x0=x0, eps=eps)


def test_boundary_condition_is_the_identity_at_zero():
    student = ConsistencyDenoiser(ToyDenoiser())
    x = torch.randn(16, 8)
    f = student(x, torch.zeros(16, dtype=torch.long), {"prompt_embeds": torch.zeros(16, 1, 1)}).x0
    assert torch.equal(f, x)


def test_scalings_and_output_are_lcm_schedulers():
    lcm = sd_scheduler(LCMScheduler, timestep_scaling=10.0)
    for t in (0, 1, 19, 259, 999):
        c_skip, c_out = PROCESS.consistency_scalings(torch.tensor([t]), 10.0, torch.zeros(1))
        expected_skip, expected_out = lcm.get_scalings_for_boundary_condition_discrete(t)
        assert c_skip.item() == pytest.approx(float(expected_skip), rel=1e-6)
        assert c_out.item() == pytest.approx(float(expected_out), rel=1e-6, abs=1e-12)
    # the student's f is the scheduler's "denoised" for the same network output
    lcm.set_timesteps(4)
    toy = ToyDenoiser()
    student = ConsistencyDenoiser(toy)
    x = torch.randn(1, 8)
    for t in lcm.timesteps.tolist():
        eps = toy.network(x) + 0.001 * t
        denoised = lcm.step(eps, t, x, generator=torch.Generator().manual_seed(0)).denoised
        torch.testing.assert_close(student(x, torch.tensor([t]), {"prompt_embeds": torch.zeros(1, 1, 1)}).x0, denoised)


# -- the loss at the fixed point -----------------------------------------------------------------

@pytest.mark.parametrize("num_segments", [1, 2])
def test_consistency_loss_vanishes_at_the_teachers_consistency_function(num_segments):
    grid = solver_grid(PROCESS, 250)  # 4 solver steps: 0, 249, 499, 749, 999
    student = ExactConsistencyStudent(GaussianTeacher(), grid, segment_length(4, num_segments))
    method = method_on(student, skipping_interval=250, num_segments=num_segments, loss_type="l2",
                       guidance_scale_min=1.0, guidance_scale_max=1.0)
    batch = gaussian_batch()
    torch.manual_seed(0)
    assert method.generator_loss(batch)["loss"] < 1e-10
    # the same function is not a fixed point of the other segmentation
    other = method_on(student, skipping_interval=250, num_segments=3 - num_segments, loss_type="l2")
    assert other.generator_loss(batch)["loss"] > 1e-4


def test_consistency_loss_is_positive_away_from_the_fixed_point():
    grid = solver_grid(PROCESS, 250)
    exact = ExactConsistencyStudent(GaussianTeacher(), grid, 4)

    class Perturbed(nn.Module):
        process = PROCESS
        takes_guidance_scale = False

        def forward(self, x, t, condition, embedded_guidance=None):
            prediction = exact(x, t, condition)
            f = prediction.x0 + 0.05 * (t > 0).reshape(-1, 1)  # the boundary condition still holds
            return Prediction(x0=f, eps=(x - PROCESS.alpha(t, f) * f) / PROCESS.sigma(t, f))

    method = method_on(Perturbed(), skipping_interval=250, loss_type="l2")
    torch.manual_seed(0)
    assert method.generator_loss(gaussian_batch())["loss"] > 1e-4


# -- the target -----------------------------------------------------------------------------------

def grad_enabled_calls(module: nn.Module) -> list[bool]:
    calls: list[bool] = []
    module.register_forward_hook(lambda m, i, o: calls.append(torch.is_grad_enabled()))
    return calls


def toy_batch() -> Batch:
    return Batch(condition={"prompt_embeds": torch.zeros(4, 1, 1)}, unconditional={"prompt_embeds": torch.zeros(4, 1, 1)},
                 real_latents=torch.randn(4, 8))


def test_stop_gradient_target_runs_without_gradient():
    student = ConsistencyDenoiser(ToyDenoiser())
    method = ConsistencyDistillation(teacher=ToyDenoiser().requires_grad_(False), student=student, process=PROCESS,
                                     guidance_scale_min=2.0, guidance_scale_max=3.0)
    assert method.target is student
    calls = grad_enabled_calls(student.denoiser.network)
    loss = method.generator_loss(toy_batch())["loss"]
    assert calls == [False, True]  # the target at t_prev without gradient, then the student with it
    loss.backward()
    assert all(p.grad is not None for p in student.parameters())


def test_ema_target_is_frozen_and_follows_the_student():
    student = ConsistencyDenoiser(ToyDenoiser())
    method = ConsistencyDistillation(teacher=ToyDenoiser().requires_grad_(False), student=student, process=PROCESS,
                                     target_ema_decay=0.9)
    assert method.target is not student and not any(p.requires_grad for p in method.target.parameters())
    method.generator_loss(toy_batch())["loss"].backward()
    assert all(p.grad is None for p in method.target.parameters())
    before = [p.detach().clone() for p in method.target.parameters()]
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    method.update_target()
    for old, new, online in zip(before, method.target.parameters(), student.parameters()):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * online)


# -- the distances and the bad inputs -------------------------------------------------------------

def test_distances_by_hand():
    assert pseudo_huber(torch.tensor([3.0]), torch.tensor([0.0]), c=4.0).item() == pytest.approx(1.0)  # √(9+16) − 4
    assert pseudo_huber(torch.tensor([0.1]), torch.tensor([0.0]), c=1.0).item() == pytest.approx(1.01**0.5 - 1, rel=1e-5)
    assert pseudo_huber(torch.tensor([1e3]), torch.tensor([0.0]), c=1e-3).item() == pytest.approx(1e3, rel=1e-5)
    assert squared_error(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 0.0])).item() == pytest.approx(2.5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(skipping_interval=2000), "skipping_interval 2000 is larger than the teacher's grid"),
        (dict(skipping_interval=30), "must divide the teacher's 1000"),
        (dict(skipping_interval=20, num_segments=4), "num_segments 4 must divide the 50 solver steps"),
        (dict(guidance_scale_min=3.0, guidance_scale_max=2.0), "0 ≤ min ≤ max"),
        (dict(loss_type="l1"), "loss_type must be one of"),
        (dict(target_ema_decay=1.0), "target_ema_decay must be in"),
    ],
)
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        method_on(ConsistencyDenoiser(ToyDenoiser()), **kwargs)


def test_batch_without_images_is_refused():
    method = method_on(ConsistencyDenoiser(ToyDenoiser()))
    with pytest.raises(ValueError, match="needs real_latents"):
        method.generator_loss(Batch(condition={"prompt_embeds": torch.zeros(2, 1, 1)},
                                    unconditional={"prompt_embeds": torch.zeros(2, 1, 1)}))
