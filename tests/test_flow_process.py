"""The rectified-flow process and the process read off each scheduler family."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

from stepdistill.diffusion import FlowProcess, VPProcess, dynamic_shift, process_from_scheduler, shift_sigmas


def test_flow_conversions_round_trip_and_recover_the_sampled_pair():
    process = FlowProcess(shift=3.0)
    generator = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(6, 4, 8, 8, generator=generator), torch.randn(6, 4, 8, 8, generator=generator)
    t = torch.tensor([0.0, 1.0, 250.0, 500.0, 999.0, 1000.0])  # σ = 0 and σ = 1 included: nothing divides
    x_t = process.add_noise(x0.double(), eps.double(), t)
    sigma = (t / 1000).reshape(-1, 1, 1, 1).double()
    torch.testing.assert_close(x_t, (1 - sigma) * x0.double() + sigma * eps.double())
    v = process.prediction_from(x0.double(), eps.double(), t)
    torch.testing.assert_close(v, eps.double() - x0.double())
    x0_hat, eps_hat = process.to_x0_eps(v, x_t, t)
    torch.testing.assert_close(x0_hat, x0.double())
    torch.testing.assert_close(eps_hat, eps.double())


def test_euler_step_of_the_flow_ode_is_the_ddim_step_of_the_predicted_pair():
    process = FlowProcess()
    x_t, v = torch.randn(3, 5), torch.randn(3, 5)
    t, t_next = torch.full((3,), 800.0), torch.full((3,), 300.0)
    x0, eps = process.to_x0_eps(v, x_t, t)
    euler = x_t + (0.3 - 0.8) * v
    torch.testing.assert_close(process.add_noise(x0, eps, t_next), euler)


@pytest.mark.parametrize("sampling", ["uniform", "logit_normal"])
def test_timestep_samples_stay_in_range_and_follow_the_shifted_law(sampling):
    process = FlowProcess(shift=3.0, timestep_sampling=sampling)
    torch.manual_seed(0)
    t = process.sample_timesteps(20000, 200.0, 900.0)
    assert t.dtype == torch.float32 and t.min() >= 200.0 - 1e-3 and t.max() <= 900.0 + 1e-3
    # the unshifted u = σ / (s − (s − 1) σ) follows the sampling law truncated to the range's u's
    sigma = t.double() / 1000
    u = sigma / (3 - 2 * sigma)
    low, high = 0.2 / (3 - 0.4), 0.9 / (3 - 1.8)
    if sampling == "uniform":
        assert u.mean().item() == pytest.approx((low + high) / 2, abs=0.005)
    else:
        z = torch.logit(u)
        inside = torch.distributions.Normal(0.0, 1.0)
        a, b = math.log(low / (1 - low)), math.log(high / (1 - high))
        expected = (inside.log_prob(torch.tensor(a)).exp() - inside.log_prob(torch.tensor(b)).exp()) / (
            inside.cdf(torch.tensor(b)) - inside.cdf(torch.tensor(a)))  # truncated normal's mean
        assert z.mean().item() == pytest.approx(expected.item(), abs=0.02)


def test_process_is_read_off_the_scheduler_family():
    vp = process_from_scheduler(DDPMScheduler(prediction_type="v_prediction"))
    assert isinstance(vp, VPProcess) and vp.prediction_type == "v_prediction"
    static = process_from_scheduler(FlowMatchEulerDiscreteScheduler(shift=3.0))
    assert isinstance(static, FlowProcess) and static.shift == 3.0
    flux = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                           base_image_seq_len=256, max_image_seq_len=4096)
    assert process_from_scheduler(flux, image_seq_len=4096).shift == pytest.approx(math.exp(1.15))
    assert process_from_scheduler(flux, image_seq_len=256).shift == pytest.approx(math.exp(0.5))
    assert dynamic_shift(1024, flux.config) == pytest.approx(math.exp(0.5 + 768 * 0.65 / 3840))
    with pytest.raises(ValueError, match="token count"):
        process_from_scheduler(flux)
    with pytest.raises(ValueError, match="flow-matching teachers"):
        process_from_scheduler(DDPMScheduler(), timestep_sampling="logit_normal")


def test_diffusers_shift_is_ours():
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    u = torch.linspace(0.001, 1, 1000).flip(0)
    torch.testing.assert_close(scheduler.sigmas.double(), shift_sigmas(u.double(), 3.0), atol=1e-6, rtol=0)


def test_flow_solver_grid_and_consistency_boundary():
    process = FlowProcess(shift=3.0)
    grid = process.solver_grid(4)
    torch.testing.assert_close(grid[1:] / 1000, shift_sigmas(torch.tensor([0.25, 0.5, 0.75, 1.0], dtype=torch.float64), 3.0))
    assert grid[0] == pytest.approx(1000 * shift_sigmas(torch.tensor(0.001, dtype=torch.float64), 3.0).item())
    c_skip, c_out = process.consistency_scalings(grid, 10.0, torch.zeros(5, 1))
    assert torch.equal(c_skip, torch.zeros(5, 1)) and torch.equal(c_out, torch.ones(5, 1))
