"""The noise process against diffusers' schedulers, and its conversions both ways."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler, EDMEulerScheduler, EulerDiscreteScheduler, LCMScheduler

from stepdistill.diffusion import VPProcess, classifier_free_guidance, few_step_sample, process_from_scheduler
from stepdistill.export import student_scheduler, student_timesteps
from stepdistill.models.tiny_sd import scheduler_config

SD_SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_conversions_round_trip(prediction_type):
    process = process_from_scheduler(DDPMScheduler(**SD_SCHEDULE, prediction_type=prediction_type))
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 4, 8, 8, generator=generator, dtype=torch.float64)
    eps = torch.randn(6, 4, 8, 8, generator=generator, dtype=torch.float64)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    x_t = process.add_noise(x0, eps, t)
    prediction = process.prediction_from(x0, eps, t)
    x0_back, eps_back = process.to_x0_eps(prediction, x_t, t)
    torch.testing.assert_close(x0_back, x0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(eps_back, eps, rtol=1e-6, atol=1e-6)


def test_add_noise_matches_diffusers():
    scheduler = DDPMScheduler(**SD_SCHEDULE)
    process = process_from_scheduler(scheduler)
    x0, eps = torch.randn(5, 4, 8, 8), torch.randn(5, 4, 8, 8)
    t = torch.tensor([0, 10, 300, 700, 999])
    torch.testing.assert_close(process.add_noise(x0, eps, t), scheduler.add_noise(x0, eps, t), rtol=1e-5, atol=1e-6)


def test_v_prediction_matches_diffusers_velocity():
    scheduler = DDPMScheduler(**SD_SCHEDULE, prediction_type="v_prediction")
    process = process_from_scheduler(scheduler)
    x0, eps, t = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.tensor([5, 500, 990])
    torch.testing.assert_close(process.prediction_from(x0, eps, t), scheduler.get_velocity(x0, eps, t), rtol=1e-5, atol=1e-6)


def test_unsupported_teachers_are_refused_with_a_reason():
    with pytest.raises(ValueError, match="neither a DDPM-family nor a flow-matching"):
        process_from_scheduler(EDMEulerScheduler())
    with pytest.raises(ValueError, match="unsupported prediction_type"):
        VPProcess(torch.linspace(0.99, 0.01, 10), "flow")
    process = process_from_scheduler(EulerDiscreteScheduler(**SD_SCHEDULE))
    with pytest.raises(ValueError, match="timesteps must lie"):
        process.alpha(torch.tensor([1000]), torch.zeros(1))


def test_terminal_timestep_is_recoverable_on_the_teacher_schedule():
    # SD's scaled_linear schedule keeps √ᾱ_999 ≈ 0.068, so ε → x0 at t = T does not explode.
    process = process_from_scheduler(DDPMScheduler(**{k: v for k, v in scheduler_config().items() if k != "set_alpha_to_one"}))
    assert 0.004 < process.alphas_cumprod[-1] < 0.006


def test_classifier_free_guidance():
    conditional, unconditional = torch.tensor([2.0]), torch.tensor([1.0])
    assert classifier_free_guidance(conditional, unconditional, 1.0) == conditional
    assert classifier_free_guidance(conditional, unconditional, 0.0) == unconditional
    assert classifier_free_guidance(conditional, unconditional, 3.0) == torch.tensor([4.0])


def test_uniform_timesteps_cover_the_range():
    process = process_from_scheduler(DDPMScheduler(**SD_SCHEDULE))
    torch.manual_seed(0)
    t = process.sample_timesteps(10_000, 20, 979)
    assert t.min() == 20 and t.max() == 979
    with pytest.raises(ValueError):
        process.sample_timesteps(1, 10, 5)


@pytest.mark.parametrize("num_steps", [1, 2, 4])
def test_few_step_sampler_equals_lcm_scheduler(num_steps):
    """Our student sampler and diffusers' LCMScheduler (exported config) agree on the same noise."""
    teacher_scheduler = DDPMScheduler(**SD_SCHEDULE)
    process = process_from_scheduler(teacher_scheduler)
    scheduler = student_scheduler(teacher_scheduler, process)
    timesteps = student_timesteps(scheduler, num_steps)

    def eps_model(x_t, t):  # any deterministic ε-predictor will do
        return torch.tanh(x_t) * (t.float().reshape(-1, 1, 1, 1) / 1000)

    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    ours = few_step_sample(
        lambda x, t: process.to_x0_eps(eps_model(x, t), x, t)[0], noise, timesteps, process,
        generator=torch.Generator().manual_seed(7),
    )
    scheduler.set_timesteps(num_steps)
    x, generator = noise.clone(), torch.Generator().manual_seed(7)
    for t in scheduler.timesteps:
        x = scheduler.step(eps_model(x, t.expand(2)), t, x, generator=generator).prev_sample
    torch.testing.assert_close(ours, x, rtol=1e-5, atol=1e-5)
    assert isinstance(scheduler, LCMScheduler) and timesteps[0] == 999
