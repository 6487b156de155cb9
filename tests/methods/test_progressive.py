"""Progressive and guidance distillation's parts, on toys where the answer is known.

The Gaussian toy of test_consistency (data N(μ, s²) per coordinate, its exact affine denoiser as the
teacher) on Stable Diffusion's schedule and on a shifted rectified flow.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diffusers import DDPMScheduler

from stepdistill.diffusion import FlowProcess, Prediction, ddim_step, process_from_scheduler
from stepdistill.methods.base import Batch
from stepdistill.methods.progressive import (
    GUIDANCE_STAGE,
    ProgressiveDistillation,
    halving_stages,
    refine,
    truncated_snr_weight,
)

MU, S = 0.7, 0.4
V_PROCESS = process_from_scheduler(  # Stable Diffusion's schedule, read in v-prediction
    DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)).for_few_steps()
FLOW = FlowProcess(shift=3.0)


class Gaussian(nn.Module):
    """The exact denoiser of N(MU + offset, S²) data on ``process``; ``x0_error`` is added to its x̂0 (a
    student off by a known amount); it records the timesteps it was called at."""

    takes_guidance_scale = False

    def __init__(self, process, x0_error: float = 0.0):
        super().__init__()
        self.process, self.x0_error, self.calls = process, x0_error, []

    def forward(self, x_t, t, condition, embedded_guidance=None):
        self.calls.append(t)
        alpha, sigma = self.process.alpha(t, x_t), self.process.sigma(t, x_t)
        mu = MU + condition["prompt_embeds"].reshape(-1, *([1] * (x_t.ndim - 1)))
        x0 = mu + alpha * S**2 * (x_t - alpha * mu) / (alpha**2 * S**2 + sigma**2) + self.x0_error
        return Prediction(x0=x0, eps=(x_t - alpha * x0) / sigma)


def batch_of(size: int, seed: int = 0) -> tuple[torch.Tensor, Batch]:
    generator = torch.Generator().manual_seed(seed)
    offsets = torch.randn(size, 1, 1, generator=generator)
    x0 = MU + offsets.reshape(size, 1, 1, 1) + S * torch.randn(size, 2, 3, 3, generator=generator)
    batch = Batch(condition={"prompt_embeds": offsets}, unconditional={"prompt_embeds": torch.zeros(size, 1, 1)},
                  real_latents=x0)
    return x0, batch


def method_on(process, final_grid, start_steps, **options) -> ProgressiveDistillation:
    return ProgressiveDistillation(teacher=Gaussian(process), student=Gaussian(process), stage_teacher=None,
                                   final_grid=torch.tensor(final_grid, dtype=torch.float64), start_steps=start_steps,
                                   **options)


GRIDS = {"vp": (V_PROCESS, [999.0, 499.0, -1.0]), "flow": (FLOW, [1000.0, 600.0, 0.0])}


@pytest.mark.parametrize("name", GRIDS)
def test_one_student_step_to_the_target_lands_where_two_teacher_ddim_steps_do(name):
    process, final_grid = GRIDS[name]
    method = method_on(process, final_grid, start_steps=4)  # one stage: 4 teacher steps → 2 student steps
    teacher_grid = method.grids[4]
    x0, batch = batch_of(64)
    torch.manual_seed(0)
    z_t, t, alpha, sigma, target = method.halving_example(x0, batch, torch.ones(64))
    index = (t.double().reshape(-1, 1) == teacher_grid.reshape(1, -1)).long().argmax(1)
    assert (index % 2 == 0).all() and set(index.tolist()) == {0, 2}  # on the student's grid, both of its points
    teacher = Gaussian(process)
    for i in (0, 2):
        rows = index == i
        t_mid, t_end = (torch.full((int(rows.sum()),), float(teacher_grid[j])) for j in (i + 1, i + 2))
        first = teacher(z_t[rows], t[rows], {"prompt_embeds": batch.condition["prompt_embeds"][rows]})
        z_mid = ddim_step(first.x0, first.eps, t_mid, process)
        second = teacher(z_mid, t_mid, {"prompt_embeds": batch.condition["prompt_embeds"][rows]})
        if i + 2 == len(teacher_grid) - 1:  # the clean end: the second step's x̂0 is where it lands
            torch.testing.assert_close(target[rows], second.x0, rtol=1e-5, atol=1e-5)
            continue
        two_steps = ddim_step(second.x0, second.eps, t_end, process)
        student_eps = (z_t[rows] - alpha[rows] * target[rows]) / sigma[rows]  # the student's ε when its x̂0 = x̃
        one_step = ddim_step(target[rows], student_eps, t_end, process)
        torch.testing.assert_close(one_step, two_steps, rtol=1e-5, atol=1e-5)


def test_the_truncated_snr_weight_is_max_of_snr_and_one():
    alpha, sigma = torch.tensor([0.8, 0.6, 0.0, 1.0]), torch.tensor([0.6, 0.8, 1.0, 0.1])
    torch.testing.assert_close(truncated_snr_weight(alpha, sigma), torch.tensor([16 / 9, 1.0, 1.0, 100.0]))


def test_the_guidance_stage_loss_is_the_weighted_x0_error_against_the_guided_teacher():
    method = method_on(V_PROCESS, [999.0, 499.0, -1.0], start_steps=4, guidance_distillation=True,
                       guidance_scale_min=1.5, guidance_scale_max=1.5)
    assert method.stages == [GUIDANCE_STAGE, 2] and method.student_steps == 4
    method.student = Gaussian(V_PROCESS, x0_error=0.1)  # the unguided toy, off by 0.1 everywhere
    x0, batch = batch_of(256)
    torch.manual_seed(0)
    loss = method.generator_loss(batch)["loss"]
    torch.manual_seed(0)  # the same draws again: w (constant here), t over the whole schedule, ε
    torch.empty(256).uniform_(1.5, 1.5)
    t = V_PROCESS.sample_timesteps(256, 0, V_PROCESS.max_timestep)
    torch.testing.assert_close(t, method.student.calls[0])
    alpha, sigma = V_PROCESS.alpha(t, x0), V_PROCESS.sigma(t, x0)
    z = alpha * x0 + sigma * torch.randn_like(x0)
    conditional, unconditional = (Gaussian(V_PROCESS)(z, t, c).x0 for c in (batch.condition, batch.unconditional))
    guided = unconditional + 1.5 * (conditional - unconditional)
    error = ((conditional + 0.1 - guided) ** 2).flatten(1).mean(1)
    expected = (truncated_snr_weight(alpha, sigma).flatten() * error).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-7)


def test_halving_stages_and_refined_grids():
    assert halving_stages(32, 4) == [16, 8, 4] and halving_stages(2, 1) == [1]
    for start, end in ((24, 4), (4, 4), (6, 4)):
        with pytest.raises(ValueError):
            halving_stages(start, end)
    vp = refine(torch.tensor([999.0, 499.0, -1.0], dtype=torch.float64), V_PROCESS)
    assert vp.tolist() == [999, 749, 499, 249, -1]  # DDIM's own 4-step trailing grid
    flow = refine(torch.tensor([1000.0, 500.0], dtype=torch.float64), FLOW)
    # σ 1 and 0.5 are u 1 and 0.25 under shift 3; halfway u = 0.625 is σ = 1.875 / 2.25
    torch.testing.assert_close(flow, torch.tensor([1000.0, 1000 * 1.875 / 2.25, 500.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="more than the teacher's timesteps"):
        refine(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64), V_PROCESS)


def test_a_range_of_guidance_scales_needs_a_student_that_takes_w():
    with pytest.raises(ValueError, match="takes w as an input"):
        method_on(V_PROCESS, [999.0, -1.0], start_steps=2, guidance_scale_min=1.0, guidance_scale_max=2.0)
