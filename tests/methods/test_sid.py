"""SiD's generator loss on a Gaussian toy where every denoiser is known in closed form.

Toy: data N(μ_r, s_r²); the "generator" x_g = θ + s z, z ~ N(0, 1); one noise level
x_t = a x_g + b ε. The optimal denoiser of N(μ, v) is f(x) = μ + k (x − a μ), k = a v / (a² v + b²),
so the teacher is f_φ = f(·; μ_r, s_r²) and an exact fake score is f_ψ = f(·; θ0, s²) with its
weights (θ0) frozen. The per-sample SiD loss is then a quadratic in (z, ε) whose θ-gradient is
affine in (z, ε), so its expectation is closed-form, and the sample mean over zero-mean noise
equals it exactly.
"""

from __future__ import annotations

import copy

import pytest
import torch

from stepdistill.diffusion import process_from_scheduler
from stepdistill.methods.base import Batch
from stepdistill.methods.sid import SiD, sid_loss
from stepdistill.models import networks

A, B = 0.8, 0.6  # α_t, σ_t of the one noise level
MU_REAL, S_REAL, S_GEN = 1.0, 0.5, 0.7


def gain(v: float) -> float:
    return A * v / (A**2 * v + B**2)


def denoiser(x: torch.Tensor, mu: float, v: float) -> torch.Tensor:
    return mu + gain(v) * (x - A * mu)


def centred_noise(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    z, eps = torch.randn(2, n, 1, dtype=torch.float64, generator=generator)
    return z - z.mean(), eps - eps.mean()


def sid_gradient(theta0: float, alpha: float, n: int = 4096) -> float:
    """∂/∂θ of the sample-mean SiD loss at θ = θ0, by autograd through x_t into both denoisers."""
    z, eps = centred_noise(n)
    theta = torch.tensor(theta0, dtype=torch.float64, requires_grad=True)
    x_g = theta + S_GEN * z
    x_t = A * x_g + B * eps
    real_x0 = denoiser(x_t, MU_REAL, S_REAL**2)
    fake_x0 = denoiser(x_t, theta0, S_GEN**2)  # the fake score's weights are frozen at θ0
    sid_loss(x_g, real_x0, fake_x0, alpha, normalise=False).backward()
    return theta.grad.item()


def analytic_gradient(theta: float, alpha: float) -> float:
    """E[∂ℓ/∂θ] for ℓ = D (R − α D), D = f_φ − f_ψ, R = f_φ − x_g, with E[x_t] = a θ, E[x_g] = θ."""
    k_r, k_f = gain(S_REAL**2), gain(S_GEN**2)
    mean_d = (MU_REAL - A * k_r * MU_REAL) - (theta - A * k_f * theta) + (k_r - k_f) * A * theta
    mean_r = MU_REAL + k_r * (A * theta - A * MU_REAL) - theta
    d_prime, r_prime = (k_r - k_f) * A, k_r * A - 1
    return d_prime * (mean_r - alpha * mean_d) + mean_d * (r_prime - alpha * d_prime)


@pytest.mark.parametrize("theta", [-1.0, 0.3, 2.5])
@pytest.mark.parametrize("alpha", [0.0, 1.0, 1.2])
def test_sid_gradient_is_the_analytic_gradient_of_the_sid_objective(theta, alpha):
    assert sid_gradient(theta, alpha) == pytest.approx(analytic_gradient(theta, alpha), rel=1e-6)  # fp32 loss


@pytest.mark.parametrize("theta", [-1.0, 0.3, 2.5])
def test_sid_gradient_points_towards_the_data(theta):
    # a descent step moves the generator's mean towards μ_r (the paper's default α = 1.2)
    assert (sid_gradient(theta, 1.2) < 0) == (theta < MU_REAL)


def test_gradient_descent_reaches_the_data_mean():
    theta = -1.0
    for _ in range(200):
        theta -= 0.5 * sid_gradient(theta, 1.2, n=256)
    assert theta == pytest.approx(MU_REAL, abs=1e-3)


def test_score_identity_at_alpha_zero():
    # with an exact fake score, E[(f_φ − f_ψ)(f_φ − x_g)] = E[(f_φ − f_θ)²] because E[x_g | x_t] = f_θ(x_t)
    z, eps = centred_noise(200_000)
    theta = 0.3
    x_g = theta + S_GEN * torch.randn_like(z, dtype=torch.float64)  # fresh z: the identity is in expectation
    x_t = A * x_g + B * eps
    real_x0, fake_x0 = denoiser(x_t, MU_REAL, S_REAL**2), denoiser(x_t, theta, S_GEN**2)
    fisher = ((real_x0 - fake_x0) ** 2).mean()
    assert sid_loss(x_g, real_x0, fake_x0, alpha=0.0, normalise=False) == pytest.approx(fisher.item(), rel=2e-2)


def test_alpha_one_is_the_difference_times_the_fake_residual():
    generator = torch.Generator().manual_seed(1)
    x_g, real_x0, fake_x0 = torch.randn(3, 4, 2, 3, 3, generator=generator)
    expected = ((real_x0 - fake_x0) * (fake_x0 - x_g)).mean()
    assert sid_loss(x_g, real_x0, fake_x0, alpha=1.0, normalise=False) == pytest.approx(expected.item(), rel=1e-6)


def test_normaliser_is_the_per_sample_mean_abs_gap_without_gradient():
    generator = torch.Generator().manual_seed(2)
    x_g, real_x0, fake_x0 = torch.randn(3, 4, 2, 3, 3, generator=generator)
    x_g.requires_grad_(True)
    gap = (x_g - real_x0).abs().mean(dim=(1, 2, 3), keepdim=True).detach()
    expected = ((real_x0 - fake_x0) * ((real_x0 - x_g) - 1.2 * (real_x0 - fake_x0)) / gap).mean()
    loss = sid_loss(x_g, real_x0, fake_x0, alpha=1.2)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    (grad,) = torch.autograd.grad(loss, x_g)
    torch.testing.assert_close(grad, -(real_x0 - fake_x0) / gap / x_g.numel())  # ∂/∂x_g with a constant normaliser


@pytest.mark.parametrize("use_lora", [False, True])
def test_the_student_loss_reaches_the_student_through_both_denoisers_and_not_the_teacher(tiny_pipeline, use_lora):
    unet = copy.deepcopy(tiny_pipeline.unet)
    process = process_from_scheduler(tiny_pipeline.scheduler)
    nets = networks.build_networks(unet, process, use_lora=use_lora, lora_rank=4)
    size = tiny_pipeline.unet.config.sample_size
    method = SiD(nets=nets, process=process, student_timesteps=(999,), latent_shape=(4, size, size),
                 teacher_guidance_scale=1.5)
    text = torch.randn(2, 77, tiny_pipeline.text_encoder.config.hidden_size)
    method.generator_loss(Batch(condition={"prompt_embeds": text},
                                unconditional={"prompt_embeds": torch.zeros_like(text)}))["loss"].backward()
    student = nets.generator_parameters()
    assert all(p.grad is not None for p in student) and sum(p.grad.abs().sum() for p in student) > 0
    trained = {id(p) for p in student + nets.critic_parameters()}
    frozen = [p for p in nets.teacher.network.parameters() if id(p) not in trained]
    assert frozen and all(p.grad is None for p in frozen)  # the teacher's own weights get nothing


def test_sid_refuses_bad_settings(tiny_pipeline):
    process = process_from_scheduler(tiny_pipeline.scheduler)
    nets = networks.build_networks(copy.deepcopy(tiny_pipeline.unet), process)
    with pytest.raises(ValueError, match="alpha"):
        SiD(nets=nets, process=process, student_timesteps=(999,), latent_shape=(4, 16, 16), alpha=-1)
    with pytest.raises(ValueError, match="GAN weight"):
        SiD(nets=nets, process=process, student_timesteps=(999,), latent_shape=(4, 16, 16), gan_generator_weight=0.1)
