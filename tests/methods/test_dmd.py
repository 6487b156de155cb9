"""DMD2's losses on toys where the answer is known in closed form.

The Gaussian toy: data p = N(μ_r, s_r²) and a "generator" x = μ_f + s_f z, z ~ N(0, 1), so its
samples follow q = N(μ_f, s_f²). Diffused to time t both stay Gaussian, and the optimal denoiser
of N(μ, s²) is E[x0 | x_t] = μ + α s² (x_t − α μ) / (α² s² + σ²). KL(q_t ‖ p_t) is analytic, so
its gradient in (μ_f, s_f) can be compared with what the DMD estimator gives.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from stepdistill.diffusion import VPProcess, process_from_scheduler
from stepdistill.methods import DMD2
from stepdistill.methods.base import Batch
from stepdistill.methods.dmd import dmd_gradient, dmd_surrogate_loss
from stepdistill.methods.fake_score import denoising_loss
from stepdistill.models import networks
from stepdistill.trainer import Trainer, TrainerConfig

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


def dmd_parameter_gradient(mu_f: float, s_f: float, n: int = 4_000, dim: int = 64) -> torch.Tensor:
    """∂/∂(μ_f, s_f) of the library's DMD step pushed through x = μ_f + s_f z: the surrogate loss on the
    normalised gradient, backpropagated as ``DMD2.generator_loss`` does, i.e. E[g · ∂x/∂θ] per element.

    Samples have ``dim`` i.i.d. coordinates, like an image's pixels: DMD's normaliser is a mean over
    a sample's elements, which is only meaningful with many of them.
    """
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(n, dim, dtype=torch.float64, generator=generator)
    theta = torch.tensor([mu_f, s_f], dtype=torch.float64, requires_grad=True)
    x = theta[0] + theta[1] * z
    x_t = ALPHA * x.detach() + SIGMA * torch.randn(n, dim, dtype=torch.float64, generator=generator)
    real_x0, fake_x0 = gaussian_x0(x_t, MU_REAL, S_REAL), gaussian_x0(x_t, mu_f, s_f)
    dmd_surrogate_loss(x, dmd_gradient(x.detach(), real_x0, fake_x0)).backward()
    return theta.grad


def mean_abs_gap(mu_f: float, s_f: float) -> float:
    """E|x − x̂0_real(x_t)|, the expected DMD normaliser, in closed form: x − x̂0_real = (1 − α k)(x − μ_r) − k σ ε
    with k = α s_r² / (α² s_r² + σ²) is N(m, v), whose folded mean is √v √(2/π) e^(−m²/2v) + m erf(m / √(2v))."""
    k = ALPHA * S_REAL**2 / (ALPHA**2 * S_REAL**2 + SIGMA**2)
    m = (1 - ALPHA * k) * (mu_f - MU_REAL)
    sd = math.sqrt((1 - ALPHA * k) ** 2 * s_f**2 + (k * SIGMA) ** 2)
    return sd * math.sqrt(2 / math.pi) * math.exp(-(m**2) / (2 * sd**2)) + m * math.erf(m / (sd * math.sqrt(2)))


@pytest.mark.parametrize("mu_f, s_f", [(0.0, 1.0), (2.0, 0.3), (1.0, 1.5)])
def test_dmd_gradient_is_the_kl_gradient_over_its_normaliser(mu_f, s_f):
    # x̂0_fake − x̂0_real = (σ²/α)(∇log q_t − ∇log p_t) and ∂KL/∂θ = E[α (∇log q_t − ∇log p_t) ∂x/∂θ]. With many
    # elements per sample the normaliser mean|x − x̂0_real| concentrates at its expectation, so the library's
    # estimate times (α²/σ²) E|x − x̂0_real| must equal the analytic gradient.
    estimate = (ALPHA**2 / SIGMA**2) * mean_abs_gap(mu_f, s_f) * dmd_parameter_gradient(mu_f, s_f, n=256, dim=1024)
    torch.testing.assert_close(estimate, kl_gradient(mu_f, s_f), rtol=0.03, atol=3e-3)


@pytest.mark.parametrize("mu_f, s_f", [(0.0, 1.0), (2.0, 0.3), (1.0, 1.5)])
def test_normalised_dmd_gradient_points_down_the_kl(mu_f, s_f):
    # The per-sample normaliser 1/mean|x − x̂0_real| is positive, so the step still descends the KL.
    estimate = dmd_parameter_gradient(mu_f, s_f)
    analytic = kl_gradient(mu_f, s_f)
    cosine = torch.dot(estimate, analytic) / (estimate.norm() * analytic.norm())
    assert cosine > 0.9


def test_dmd_steps_move_the_generator_to_the_data():
    mu_f, s_f, lr = -1.0, 1.5, 0.5
    for _ in range(60):
        g = dmd_parameter_gradient(mu_f, s_f, n=500)
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


def test_noise_process_is_what_dmd_assumes():
    # DMD diffuses with x_t = α_t x + σ_t ε, α² + σ² = 1 on the teacher's schedule.
    process = VPProcess(torch.linspace(0.999, 0.01, 1000), "epsilon")
    t = torch.tensor([0, 500, 999])
    x = torch.ones(3, 1)
    total = process.alpha(t, x) ** 2 + process.sigma(t, x) ** 2
    torch.testing.assert_close(total, torch.ones(3, 1))


# -- DMD2 on a tiny UNet: which networks each loss reaches, and the regression term ------------------

def tiny_dmd2(tiny_pipeline, use_lora: bool = False, **options):
    """Networks (with a discriminator) cloned from the tiny pipeline's UNet, and DMD2 on them."""
    process = process_from_scheduler(tiny_pipeline.scheduler)
    nets = networks.build_networks(copy.deepcopy(tiny_pipeline.unet), process, use_lora=use_lora, lora_rank=4,
                                   with_discriminator=True)
    size = tiny_pipeline.unet.config.sample_size
    method = DMD2(nets=nets, process=process, student_timesteps=(999,), latent_shape=(4, size, size),
                  guidance_scale=1.5, **options)
    return nets, method


def text_batch(tiny_pipeline, size: int = 2, with_images: bool = False) -> Batch:
    generator = torch.Generator().manual_seed(0)
    text = torch.randn(size, 16, tiny_pipeline.text_encoder.config.hidden_size, generator=generator)
    latent = tiny_pipeline.unet.config.sample_size
    return Batch(condition={"prompt_embeds": text}, unconditional={"prompt_embeds": torch.zeros_like(text)},
                 real_latents=torch.randn(size, 4, latent, latent, generator=generator) if with_images else None)


def teacher_weights(nets) -> list[torch.nn.Parameter]:
    """The frozen teacher's own weights (with LoRA: the shared network's, its adapters left out)."""
    trained = {id(p) for p in nets.generator_parameters() + nets.critic_parameters()}
    weights = [p for p in nets.teacher.network.parameters() if id(p) not in trained]
    assert weights
    return weights


def reached(parameters) -> bool:
    """Whether any of ``parameters`` got a non-zero gradient."""
    return any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in parameters)


@pytest.mark.parametrize("use_lora", [False, True], ids=["full", "lora"])
def test_the_generator_loss_reaches_the_student_alone(tiny_pipeline, use_lora):
    nets, method = tiny_dmd2(tiny_pipeline, use_lora)
    method.generator_loss(text_batch(tiny_pipeline))["loss"].backward()
    assert reached(nets.generator_parameters())
    assert all(p.grad is None for p in nets.critic_parameters() + teacher_weights(nets))


@pytest.mark.parametrize("use_lora", [False, True], ids=["full", "lora"])
def test_the_gan_generator_term_reaches_the_student_and_not_the_teacher(tiny_pipeline, use_lora):
    nets, method = tiny_dmd2(tiny_pipeline, use_lora, gan_generator_weight=0.1)
    method.generator_loss(text_batch(tiny_pipeline))["gan_generator"].backward()
    assert reached(nets.generator_parameters())
    assert all(p.grad is None for p in teacher_weights(nets))


@pytest.mark.parametrize("use_lora", [False, True], ids=["full", "lora"])
def test_in_the_trainer_the_gan_generator_term_computes_no_critic_gradient(tiny_pipeline, use_lora, tmp_path):
    # The GAN term reads the fake score and discriminator; the trainer freezes them during the student's update,
    # so its backward computes no gradient for them (the critic update before it leaves their .grad None).
    nets, method = tiny_dmd2(tiny_pipeline, use_lora, gan_generator_weight=0.1, gan_critic_weight=0.1)
    batch = text_batch(tiny_pipeline, with_images=True)
    critic_modules = [m for m in (nets.fake_score.network, nets.discriminator) if m is not nets.student.network]
    trainer = Trainer(TrainerConfig(output_dir=str(tmp_path), max_train_steps=1, learning_rate=1e-3,
                                    critic_learning_rate=1e-3),
                      method, [nets.student.network], nets.generator_parameters(), critic_modules,
                      nets.critic_parameters(), next_batch=lambda: batch)
    student_before = [p.detach().clone() for p in nets.generator_parameters()]
    trainer.fit()
    assert any(not torch.equal(before, p) for before, p in zip(student_before, nets.generator_parameters()))
    assert all(p.grad is None for p in nets.critic_parameters())
    assert all(p.requires_grad for p in nets.generator_parameters() + nets.critic_parameters())  # flags restored


@pytest.mark.parametrize("use_lora", [False, True], ids=["full", "lora"])
def test_the_critic_loss_never_reaches_the_student(tiny_pipeline, use_lora):
    nets, method = tiny_dmd2(tiny_pipeline, use_lora, gan_critic_weight=0.1)
    losses = method.critic_loss(text_batch(tiny_pipeline, with_images=True))
    assert set(losses) == {"fake_score", "gan_critic", "loss"}
    losses["loss"].backward()
    assert all(p.grad is None for p in nets.generator_parameters() + teacher_weights(nets))
    discriminator = list(nets.discriminator.parameters())
    fake_score = [p for p in nets.critic_parameters() if all(p is not q for q in discriminator)]
    assert reached(fake_score) and all(p.grad is not None and p.grad.abs().sum() > 0 for p in discriminator)


def test_regression_loss_on_a_student_whose_output_is_known(tiny_pipeline):
    # A student whose network outputs ε̂ = 0 returns x̂0 = x_t / α_t. On the pairs' noise at the student's first
    # timestep (999 of 999, 499), targets noise / α_999 + 0.5 leave a residual of 0.5 everywhere: an MSE of 0.25
    # whichever pairs are drawn, where a mismatched (noise, target) pair or another t would give far more.
    nets, _ = tiny_dmd2(tiny_pipeline)
    student = nets.student.network
    with torch.no_grad():
        student.conv_out.weight.zero_()
        student.conv_out.bias.zero_()
    alpha = tiny_pipeline.scheduler.alphas_cumprod[999].sqrt()  # diffusers' schedule, not ours
    generator = torch.Generator().manual_seed(1)
    noise = torch.randn(3, 4, 16, 16, generator=generator)
    hidden = tiny_pipeline.text_encoder.config.hidden_size
    condition = {"prompt_embeds": torch.randn(3, 16, hidden, generator=generator)}
    target = noise / alpha + 0.5
    method = DMD2(nets=nets, process=nets.student.process, student_timesteps=(999, 499), latent_shape=(4, 16, 16),
                  regression_weight=2.0, regression_pairs=(noise, condition, target))
    calls = []
    hook = nets.student.register_forward_hook(lambda module, args, output: calls.append(args))
    try:
        losses = method.generator_loss(text_batch(tiny_pipeline, size=4))
    finally:
        hook.remove()
    assert losses["regression"].item() == pytest.approx(0.25, rel=1e-4)
    torch.testing.assert_close(losses["loss"], losses["dmd"] + 2.0 * losses["regression"])
    # the student saw each pair's noise with that pair's own condition, at its first timestep
    x_t, t, seen_condition = calls[-1]
    pairs = [next(i for i in range(3) if torch.equal(row, noise[i])) for row in x_t]
    assert torch.equal(seen_condition["prompt_embeds"], condition["prompt_embeds"][pairs]) and (t == 999).all()
    # its gradient reaches the student's weights alone
    losses["regression"].backward()
    assert student.conv_out.bias.grad.abs().sum() > 0
    assert all(p.grad is None for p in nets.critic_parameters() + teacher_weights(nets))
    with pytest.raises(ValueError, match="needs regression_pairs"):
        tiny_dmd2(tiny_pipeline, regression_weight=1.0)
