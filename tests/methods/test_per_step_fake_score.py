"""A fake score told which step of a few-step student made its input (``--per_step_fake_score``)."""

from __future__ import annotations

import copy

import pytest
import torch

from stepdistill.diffusion import process_from_scheduler
from stepdistill.methods import DMD2, SiD
from stepdistill.methods.base import Batch
from stepdistill.models import networks

STEPS = (999, 499)


def build(tiny_pipeline, **options):
    process = process_from_scheduler(tiny_pipeline.scheduler)
    return networks.build_networks(copy.deepcopy(tiny_pipeline.unet), process, **options), process


def inputs(tiny_pipeline, batch_size=2):
    size = tiny_pipeline.unet.config.sample_size
    generator = torch.Generator().manual_seed(0)
    x_t = torch.randn(batch_size, 4, size, size, generator=generator)
    text = torch.randn(batch_size, 77, tiny_pipeline.text_encoder.config.hidden_size, generator=generator)
    return x_t, torch.tensor([100, 700][:batch_size]), {"prompt_embeds": text}


def test_it_starts_as_the_teacher_and_a_learned_row_changes_only_its_step(tiny_pipeline):
    nets, _ = build(tiny_pipeline, fake_score_steps=2)
    x_t, t, text = inputs(tiny_pipeline)
    uncond = {"prompt_embeds": torch.zeros_like(text["prompt_embeds"])}
    with torch.no_grad():
        teacher = nets.teacher(x_t, t, text, uncond, 1.5).x0
        for k in (0, 1):
            step = torch.full((2,), k)
            torch.testing.assert_close(nets.fake_score(x_t, t, text, uncond, 1.5, step=step).x0, teacher)
        nets.fake_score.network.class_embedding.table.weight[1].normal_()
        step_0 = nets.fake_score(x_t, t, text, step=torch.zeros(2, dtype=torch.long)).x0
        step_1 = nets.fake_score(x_t, t, text, step=torch.ones(2, dtype=torch.long)).x0
        torch.testing.assert_close(step_0, nets.teacher(x_t, t, text).x0)  # row 0 still zero
    assert (step_1 - step_0).abs().max() > 1e-3


def test_the_critic_update_reaches_only_the_drawn_steps_row(tiny_pipeline):
    nets, process = build(tiny_pipeline, fake_score_steps=2)
    size = tiny_pipeline.unet.config.sample_size
    method = SiD(nets=nets, process=process, student_timesteps=STEPS, latent_shape=(4, size, size))
    assert method.per_step_fake_score
    table = nets.fake_score.network.class_embedding.table.weight
    assert any(p is table for p in nets.critic_parameters())  # the critic's optimiser trains it
    _, _, text = inputs(tiny_pipeline)
    batch = Batch(condition=text, unconditional={"prompt_embeds": torch.zeros_like(text["prompt_embeds"])})
    for seed in (0, 1, 2, 3):
        torch.manual_seed(seed)
        with torch.no_grad():
            _, step = method.generate(batch)
        torch.manual_seed(seed)  # the critic's update draws the same k
        table.grad = None
        method.critic_loss(batch)["loss"].backward()
        rows_used = (table.grad.abs().sum(dim=1) > 0).nonzero().flatten().tolist()
        assert rows_used == [int(step[0])] and (step == step[0]).all()  # one k per batch, its row alone learns


@pytest.mark.parametrize("method_class, guidance", [
    (SiD, dict(teacher_guidance_scale=1.5, fake_guidance_scale_generator=1.5)), (DMD2, dict(guidance_scale=1.5)),
])
def test_the_student_loss_runs_with_guidance_and_the_gan_term(tiny_pipeline, method_class, guidance):
    nets, process = build(tiny_pipeline, fake_score_steps=2, with_discriminator=True)
    size = tiny_pipeline.unet.config.sample_size
    method = method_class(nets=nets, process=process, student_timesteps=STEPS, latent_shape=(4, size, size),
                          gan_generator_weight=0.1, **guidance)
    _, _, text = inputs(tiny_pipeline)
    losses = method.generator_loss(Batch(condition=text, unconditional={"prompt_embeds": torch.zeros_like(text["prompt_embeds"])}))
    losses["loss"].backward()
    assert torch.isfinite(losses["loss"]) and "gan_generator" in losses
    assert sum(p.grad.abs().sum() for p in nets.generator_parameters() if p.grad is not None) > 0


def test_bad_combinations_are_refused(tiny_pipeline):
    with pytest.raises(ValueError, match="full-weight fake score"):
        build(tiny_pipeline, use_lora=True, lora_rank=4, fake_score_steps=2)
    with pytest.raises(ValueError, match="fake_score_steps must be ≥ 1"):
        build(tiny_pipeline, fake_score_steps=0)
    nets, process = build(tiny_pipeline, fake_score_steps=3)
    with pytest.raises(ValueError, match="tells 3 steps apart, the student has 2"):
        SiD(nets=nets, process=process, student_timesteps=STEPS, latent_shape=(4, 16, 16))
    unet = copy.deepcopy(tiny_pipeline.unet)
    networks.add_step_embedding(unet, 2)
    with pytest.raises(ValueError, match="already has a class embedding"):
        networks.add_step_embedding(unet, 2)
