"""Plain diffusers samples an exported student exactly as the trainer's own sampler does."""

from __future__ import annotations

import json

import pytest
import torch

from stepdistill import export
from stepdistill.diffusion import process_from_scheduler
from stepdistill.models import networks
from stepdistill.models.loading import load_pipeline

from export_checks import PROMPTS, diffusers_samples, perturbed_networks, trainer_samples


@pytest.mark.parametrize("num_steps, first_timestep", [(1, None), (2, None), (1, 625), (2, 625)])
def test_full_export_samples_like_the_trainer(tiny_pipeline_dir, tmp_path, num_steps, first_timestep):
    teacher, nets = perturbed_networks(tiny_pipeline_dir, use_lora=False)
    scheduler = export.student_scheduler(teacher.pipeline.scheduler, teacher.process, first_timestep=first_timestep)
    export.export_full(teacher.pipeline, nets.student.network, tmp_path, num_steps, scheduler)
    pipe = load_pipeline(tmp_path)
    assert type(pipe.scheduler).__name__ == "LCMScheduler"
    metadata = json.loads((tmp_path / "stepdistill_student.json").read_text())
    assert metadata["num_inference_steps"] == num_steps and metadata["timesteps"][0] == (first_timestep or 999)
    expected = trainer_samples(teacher, nets.student, scheduler, num_steps)
    torch.testing.assert_close(diffusers_samples(pipe, teacher, num_steps), expected, rtol=1e-5, atol=1e-5)
    # and it really is the student, not the teacher
    assert not torch.allclose(diffusers_samples(teacher.pipeline, teacher, num_steps), expected, atol=1e-3)


@pytest.mark.parametrize("num_steps", [1, 2])
def test_lora_export_loads_with_load_lora_weights(tiny_pipeline_dir, tmp_path, num_steps):
    teacher, nets = perturbed_networks(tiny_pipeline_dir, use_lora=True)
    scheduler = export.student_scheduler(teacher.pipeline.scheduler, teacher.process)
    expected = trainer_samples(teacher, nets.student, scheduler, num_steps)
    export.export_lora(teacher.pipeline, nets.student.network, networks.STUDENT, tmp_path, num_steps, scheduler)
    assert (tmp_path / export.LORA_WEIGHTS).is_file()
    pipe = export.load_lora_student(tiny_pipeline_dir, tmp_path)
    torch.testing.assert_close(diffusers_samples(pipe, teacher, num_steps), expected, rtol=1e-5, atol=1e-5)


def test_lora_student_and_fake_score_share_one_unet(tiny_pipeline_dir):
    teacher, nets = perturbed_networks(tiny_pipeline_dir, use_lora=True)
    assert nets.student.network is nets.fake_score.network is nets.teacher.network
    x_t = torch.randn((1, *teacher.latent_shape))
    t = torch.tensor([500])
    condition = teacher.encode_prompts(PROMPTS[:1])
    with torch.no_grad():
        student, fake, base = (d(x_t, t, condition).x0 for d in (nets.student, nets.fake_score, nets.teacher))
    # the fake-score adapter is untouched (B = 0), so it equals the teacher; the student differs
    torch.testing.assert_close(fake, base)
    assert not torch.allclose(student, base, atol=1e-4)
    # trainable sets are disjoint and the base weights are frozen
    student_ids = {id(p) for p in nets.generator_parameters()}
    assert not student_ids & {id(p) for p in nets.critic_parameters()}
    frozen = [p for n, p in nets.teacher.network.named_parameters() if "lora" not in n]
    assert frozen and not any(p.requires_grad for p in frozen)


def test_student_timesteps():
    from diffusers import DDPMScheduler

    teacher = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    scheduler = export.student_scheduler(teacher, process_from_scheduler(teacher))
    assert export.student_timesteps(scheduler, 1) == (999,)
    assert export.student_timesteps(scheduler, 4) == (999, 759, 499, 259)
    with pytest.raises(ValueError, match="≥ 1"):
        export.student_timesteps(scheduler, 0)


def test_a_student_that_starts_below_the_last_timestep_keeps_the_teachers_noise_levels():
    from diffusers import DDPMScheduler

    teacher = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    process = process_from_scheduler(teacher)
    scheduler = export.student_scheduler(teacher, process, first_timestep=625)
    assert export.student_timesteps(scheduler, 1) == (625,)
    assert export.student_timesteps(scheduler, 4) == (625, 469, 312, 156)
    torch.testing.assert_close(scheduler.alphas_cumprod, teacher.alphas_cumprod[:626], rtol=0, atol=0)
    assert export.student_scheduler(teacher, process, first_timestep=999).config.num_train_timesteps == 1000
    zero_snr = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True)
    truncated = export.student_scheduler(zero_snr, process_from_scheduler(zero_snr), first_timestep=625)
    torch.testing.assert_close(truncated.alphas_cumprod, zero_snr.alphas_cumprod[:626])  # not rescaled twice
    with pytest.raises(ValueError, match="first_timestep"):
        export.student_scheduler(teacher, process, first_timestep=1000)


@pytest.mark.parametrize("teacher_class, extra", [("PNDMScheduler", {"skip_prk_steps": True}),
                                                  ("DDPMScheduler", {"variance_type": "fixed_large"})])
def test_the_student_scheduler_keeps_only_settings_it_takes(tmp_path, capfd, teacher_class, extra):
    import diffusers

    teacher = getattr(diffusers, teacher_class)(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                                **extra)
    export.student_scheduler(teacher, process_from_scheduler(teacher), first_timestep=625).save_pretrained(tmp_path)
    loaded = diffusers.LCMScheduler.from_pretrained(tmp_path)
    assert "not expected and will be ignored" not in capfd.readouterr().err
    assert not set(extra) & set(json.loads((tmp_path / "scheduler_config.json").read_text()))
    torch.testing.assert_close(loaded.alphas_cumprod, teacher.alphas_cumprod[:626], rtol=0, atol=0)


def test_lora_critic_update_trains_the_fake_score_adapter(tiny_pipeline_dir):
    """peft's adapter switches flip requires_grad; both adapters must still receive gradients."""
    teacher, nets = perturbed_networks(tiny_pipeline_dir, use_lora=True)
    x_t = torch.randn((2, *teacher.latent_shape))
    t = torch.tensor([100, 700])
    condition = teacher.encode_prompts(PROMPTS)
    student_x0 = nets.student(x_t, t, condition).x0  # student graph first, then other adapters switch
    fake_x0 = nets.fake_score(x_t, t, condition).x0
    with torch.no_grad():
        nets.teacher(x_t, t, condition)
    (student_x0.square().mean() + fake_x0.square().mean()).backward()
    assert all(p.grad is not None for p in nets.generator_parameters())
    # the fake-score adapter starts with B = 0, so only its B matrices have non-zero gradients yet
    assert all(p.grad is not None for p in nets.critic_parameters())
    assert any(p.grad.abs().sum() > 0 for p in nets.critic_parameters())
