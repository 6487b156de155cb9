"""DMD2's losses on toys where the answer is known in closed form.

The Gaussian toy: data p = N(μ_r, s_r²) and a "generator" x = μ_f + s_f z, z ~ N(0, 1), so its
samples follow q = N(μ_f, s_f²). Diffused to time t both stay Gaussian, and the optimal denoiser
of N(μ, s²) is E[x0 | x_t] = μ + α s² (x_t − α μ) / (α² s² + σ²). KL(q_t ‖ p_t) is analytic, so
its gradient in (μ_f, s_f) can be compared with what the DMD estimator gives.
"""

from __future__ import annotations

import math

import pytest
import torch

from stepdistill.diffusion import VPProcess
from stepdistill.methods.dmd import dmd_gradient, dmd_surrogate_loss
from stepdistill.methods.fake_score import denoising_loss, gan_critic_loss, gan_generator_loss

ALPHA, SIGMA = 0.8, 0.6  # one noise level, α² + σ² = 1
MU_REAL, S_REAL = 1.0, 0.5


def gaussian_x0(x_t: torch.Tensor, mu: float, s: float) -> torch.Tensor:
    """E[x0 | x_t] for x0 ~ N(mu, s²), x_t = α x0 + σ ε."""
    return mu + ALPHA * s**2 * (x_t - ALPHA * mu) / (ALPHA**2 * s**2 + SIGMA**2)


def kl_gradient(mu_f: float, s_f: float) -> torch.Tensor:
    """∂/∂(μ_f, s_f) of KL(N(α μ_f, α² s_f² + σ²) ‖ N(α μ_r, α² s_r² + σ²)), by autograd on the closed form."""
    params = torch.tensor([mu_f, s_f], dtype=torch.float64, requires_grad=True)
    m1, v1 = ALPHA * params[0], ALPHA**2 * params[1] ** 2 + SIGMA**2
    m2, v2 = ALPHA * MU_REAL, ALPHA**2 * S_REAL**2 + SIGMA**2
    kl = 0.5 * (torch.log(v2 / v1) + (v1 + (m1 - m2) ** 2) / v2 - 1)
    kl.backward()
    return params.grad


def dmd_parameter_gradient(mu_f: float, s_f: float, normalise: bool, n: int = 4_000, dim: int = 64) -> torch.Tensor:
    """The DMD estimator pushed through x = μ_f + s_f z: E[g · ∂x/∂θ] per dimension, g the DMD gradient.

    Samples have ``dim`` i.i.d. coordinates, like an image's pixels: DMD's normaliser is a mean over
    a sample's elements, which is only meaningful with many of them.
    """
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(n, dim, dtype=torch.float64, generator=generator)
    x = mu_f + s_f * z
    x_t = ALPHA * x + SIGMA * torch.randn(n, dim, dtype=torch.float64, generator=generator)
    real_x0, fake_x0 = gaussian_x0(x_t, MU_REAL, S_REAL), gaussian_x0(x_t, mu_f, s_f)
    g = dmd_gradient(x, real_x0, fake_x0) if normalise else fake_x0 - real_x0
    return torch.stack([g.mean(), (g * z).mean()])


@pytest.mark.parametrize("mu_f, s_f", [(0.0, 1.0), (2.0, 0.3), (1.0, 1.5)])
def test_unnormalised_dmd_gradient_is_the_kl_gradient(mu_f, s_f):
    # x̂0_fake − x̂0_real = (σ²/α)(∇log q_t − ∇log p_t), and ∂KL/∂θ = E[α (∇log q_t − ∇log p_t) ∂x/∂θ],
    # so (α²/σ²) E[(x̂0_fake − x̂0_real) ∂x/∂θ] must equal the analytic gradient.
    estimate = (ALPHA**2 / SIGMA**2) * dmd_parameter_gradient(mu_f, s_f, normalise=False)
    torch.testing.assert_close(estimate, kl_gradient(mu_f, s_f), rtol=0.03, atol=3e-3)


@pytest.mark.parametrize("mu_f, s_f", [(0.0, 1.0), (2.0, 0.3), (1.0, 1.5)])
def test_normalised_dmd_gradient_points_down_the_kl(mu_f, s_f):
    # The per-sample normaliser 1/mean|x − x̂0_real| is positive, so the step still descends the KL.
    estimate = dmd_parameter_gradient(mu_f, s_f, normalise=True)
    analytic = kl_gradient(mu_f, s_f)
    cosine = torch.dot(estimate, analytic) / (estimate.norm() * analytic.norm())
    assert cosine > 0.9


def test_dmd_steps_move_the_generator_to_the_data():
    mu_f, s_f, lr = -1.0, 1.5, 0.5
    for _ in range(60):
        g = dmd_parameter_gradient(mu_f, s_f, normalise=True, n=500)
        mu_f, s_f = mu_f - lr * g[0].item(), s_f - lr * g[1].item()
    assert abs(mu_f - MU_REAL) < 0.05 and abs(s_f - S_REAL) < 0.05


def test_zero_gradient_when_generator_matches_data():
    x = torch.randn(8, 4, 2, 2)
    real = torch.randn(8, 4, 2, 2)
    assert dmd_gradient(x, real, real.clone()).abs().max() == 0


def test_dmd_gradient_normaliser_is_per_sample_mean_abs():
    x = torch.tensor([[1.0, 3.0], [0.0, 0.0]])
    real = torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    fake = torch.tensor([[1.0, 1.0], [3.0, 1.0]])
    # sample 0: mean|x − real| = 1.5 → (1, 0)/1.5; sample 1: mean = 1 → (2, 0)
    expected = torch.tensor([[1 / 1.5, 0.0], [2.0, 0.0]])
    torch.testing.assert_close(dmd_gradient(x, real, fake), expected)


def test_surrogate_loss_gradient_is_the_dmd_gradient():
    x = torch.randn(3, 4, requires_grad=True)
    g = torch.randn(3, 4)
    dmd_surrogate_loss(x, g).backward()
    torch.testing.assert_close(x.grad, g / x.numel())


def test_fake_score_loss_is_minimised_by_the_true_denoiser():
    # Data N(μ, s²); the optimal ε-predictor is ε̂ = (x_t − α x̂0(x_t)) / σ. Any perturbation raises the loss.
    generator = torch.Generator().manual_seed(1)
    x0 = MU_REAL + S_REAL * torch.randn(200_000, generator=generator)
    eps = torch.randn(200_000, generator=generator)
    x_t = ALPHA * x0 + SIGMA * eps
    best = (x_t - ALPHA * gaussian_x0(x_t, MU_REAL, S_REAL)) / SIGMA
    optimum = denoising_loss(best, eps)
    for wrong in (1.1 * best, best + 0.1, (x_t - ALPHA * gaussian_x0(x_t, MU_REAL + 0.3, S_REAL)) / SIGMA):
        assert denoising_loss(wrong, eps) > optimum + 1e-3
    # and the optimum is the Bayes error Var[ε | x_t] = α² s² / (α² s² + σ²)
    bayes = (ALPHA**2 * S_REAL**2) / (ALPHA**2 * S_REAL**2 + SIGMA**2)
    assert math.isclose(optimum.item(), bayes, rel_tol=0.02)


def test_gan_losses_have_the_right_signs():
    real = torch.zeros(4, requires_grad=True)
    fake = torch.zeros(4, requires_grad=True)
    gan_critic_loss(real, fake).backward()
    assert (real.grad < 0).all(), "the critic must push real logits up"
    assert (fake.grad > 0).all(), "the critic must push fake logits down"
    fake_for_generator = torch.zeros(4, requires_grad=True)
    gan_generator_loss(fake_for_generator).backward()
    assert (fake_for_generator.grad < 0).all(), "the generator must push its logits up"
    # a confident, correct discriminator has a lower loss than a fooled one
    assert gan_critic_loss(torch.full((4,), 5.0), torch.full((4,), -5.0)) < gan_critic_loss(
        torch.full((4,), -5.0), torch.full((4,), 5.0)
    )
    # both losses equal 2 log 2 and log 2 at chance
    assert math.isclose(gan_critic_loss(torch.zeros(4), torch.zeros(4)).item(), 2 * math.log(2), rel_tol=1e-6)
    assert math.isclose(gan_generator_loss(torch.zeros(4)).item(), math.log(2), rel_tol=1e-6)


def test_noise_process_is_what_dmd_assumes():
    # DMD diffuses with x_t = α_t x + σ_t ε, α² + σ² = 1 on the teacher's schedule.
    process = VPProcess(torch.linspace(0.999, 0.01, 1000), "epsilon")
    t = torch.tensor([0, 500, 999])
    x = torch.ones(3, 1)
    total = process.alpha(t, x) ** 2 + process.sigma(t, x) ** 2
    torch.testing.assert_close(total, torch.ones(3, 1))
