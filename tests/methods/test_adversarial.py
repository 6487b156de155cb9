"""ADD / LADD's method on the tiny SD pipeline and on toys: gradients reach the student only, the heads see
the prompt, the discriminator's noise levels lean high, and ADD's distillation term on a teacher whose answer
is known."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from stepdistill.diffusion import Prediction, VPProcess
from stepdistill.methods.adversarial import AdversarialDistillation, teacher_features
from stepdistill.methods.base import Batch
from stepdistill.models import networks
from stepdistill.models.discriminator import Discriminator, pixel_features
from stepdistill.models.teacher import load_teacher


@pytest.fixture
def teacher(tiny_pipeline_dir):
    """A fresh teacher per test: LoRA students add their adapters to the teacher's network."""
    return load_teacher(str(tiny_pipeline_dir))


def method_for(teacher, name: str, use_lora: bool) -> AdversarialDistillation:
    torch.manual_seed(0)
    nets = networks.build_networks(teacher.network, teacher.process, use_lora=use_lora, lora_rank=4,
                                   with_fake_score=False)
    if name == "ladd":
        features = teacher_features(nets, teacher.backbone.discriminator_layers(teacher.network))
    else:
        encoder = teacher.pipeline.vae.encoder
        features = pixel_features(teacher.decode, encoder, ("down_blocks.0", "down_blocks.1"))
    unconditional = teacher.encode_unconditional()
    probe = features(torch.zeros(1, *teacher.latent_shape), torch.full((1,), 500.0), unconditional)
    discriminator = Discriminator.for_features(probe, teacher.backbone.pooled(unconditional).shape[-1])
    nets = networks.Networks(nets.teacher, nets.student, None, discriminator)
    return AdversarialDistillation(nets=nets, process=teacher.process, student_timesteps=(625.0, 250.0),
                                   features=features, pooled=teacher.backbone.pooled, variant=name,
                                   distillation_weight=2.5 if name == "add" else 0.0, r1_weight=1.0)


def batch_of(teacher, size: int = 3) -> Batch:
    condition = teacher.encode_prompts(["a handwritten digit one", "a handwritten digit two", "a handwritten digit six"][:size])
    return Batch(condition=condition, unconditional={k: v.expand(size, *v.shape[1:]) for k, v in
                                                     teacher.encode_unconditional().items()},
                 real_latents=torch.randn(size, *teacher.latent_shape))


@pytest.mark.parametrize("use_lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("name", ["ladd", "add"])
def test_gradients_reach_the_student_and_never_the_frozen_extractor(teacher, name, use_lora):
    method = method_for(teacher, name, use_lora)
    losses = method.generator_loss(batch_of(teacher))
    losses["loss"].backward()
    trained = method.nets.generator_parameters()
    assert all(p.grad is not None for p in trained)  # (LoRA's A gets zero gradient while B = 0: only "not None")
    assert sum(p.grad.abs().sum() for p in trained) > 0
    frozen = [p for n, p in method.nets.teacher.network.named_parameters() if ".lora_" not in n]
    frozen += list(teacher.pipeline.vae.parameters())
    assert all(p.grad is None for p in frozen)  # the teacher and the pixel network are read, never trained
    method.nets.student.network.zero_grad()
    critic = method.critic_loss(batch_of(teacher))
    assert set(critic) == {"adversarial", "r1", "loss"} and torch.isfinite(critic["loss"])
    critic["loss"].backward()
    assert all(p.grad is not None for p in method.nets.discriminator.parameters())
    assert all(p.grad is None for p in frozen)


def test_the_heads_see_the_prompt(teacher):
    method = method_for(teacher, "ladd", use_lora=False)
    batch = batch_of(teacher)
    t = torch.full((3,), 400.0)
    with torch.no_grad():
        same_latents = batch.real_latents[:1].expand(3, -1, -1, -1)
        logits = method.logits(method.discriminator_input(same_latents, t, torch.zeros_like(same_latents)), t,
                               batch.condition)
    assert logits.unique().numel() == 3  # one image, three prompts: three logits


def test_discriminator_noise_levels_lean_high_and_stay_on_the_schedule(teacher):
    method = method_for(teacher, "ladd", use_lora=False)
    torch.manual_seed(0)
    t = method.discriminator_timesteps(4000, torch.device("cpu"))
    assert t.min() >= 0 and t.max() <= 999 and torch.equal(t, t.round())
    assert 0.65 < t.mean().item() / 999 < 0.75  # E[sigmoid(1 + z)] ≈ 0.70 for z ~ N(0, 1)


def test_add_distillation_term_on_a_teacher_that_answers_the_clean_sample_plus_an_offset():
    """With x̂0_teacher(x_t) = x0 + δ for every t, the term is E_t[ᾱ_t] δ² per element, averaged over t."""
    process = VPProcess(torch.linspace(0.999, 0.01, 1000, dtype=torch.float64), "epsilon")
    x0 = torch.randn(64, 1, 2, 2)

    def teacher(x_t, t, condition, unconditional, guidance_scale):
        return Prediction(x0=x0 + 0.5, eps=torch.zeros_like(x0))

    nets = SimpleNamespace(teacher=teacher, discriminator=torch.nn.Identity())
    method = AdversarialDistillation(nets=nets, process=process, student_timesteps=(999.0,), features=None,
                                     pooled=None, variant="add")
    torch.manual_seed(0)
    loss = method.distillation_loss(x0, SimpleNamespace(size=64, device=torch.device("cpu"), condition=None,
                                                       unconditional=None))
    torch.manual_seed(0)
    t = process.sample_timesteps(64, 0, 999)
    expected = 0.25 * process.alphas_cumprod[t.long()].float().mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)
