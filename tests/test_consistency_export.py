"""Plain diffusers samples an exported consistency student exactly as the trainer's own sampler does.

The student is f = c_skip x + c_out x̂0 (LCM's boundary condition, timestep_scaling 10); the export
is diffusers' LCMScheduler at that scaling, on the student's solver grid, or (``--sampler ddim``) its
DDIMScheduler / flow-matching Euler scheduler stepping deterministically on (f, ε_f).
"""

from __future__ import annotations

import pytest
import torch

from stepdistill import export
from stepdistill.diffusion import ddim_sample, process_from_scheduler
from stepdistill.methods.consistency import ConsistencyDenoiser
from stepdistill.models.guidance_embedding import LCM_EMBEDDING_DIM, AtGuidanceScale
from stepdistill.models.loading import load_pipeline

from export_checks import PROMPTS, diffusers_samples, export_and_load, perturbed_networks, trainer_samples


def perturbed_student(folder, use_lora: bool):
    """Teacher, networks and the consistency student, whose weights differ from the teacher's."""
    teacher, nets = perturbed_networks(folder, use_lora, with_fake_score=False)
    assert nets.fake_score is None and nets.critic_parameters() == []
    return teacher, nets, ConsistencyDenoiser(nets.student, timestep_scaling=10.0)


@pytest.mark.parametrize("use_lora", [False, True])
@pytest.mark.parametrize("num_steps, solver_steps", [(1, 50), (2, 50), (4, 40)])
def test_export_samples_like_the_trainer(tiny_pipeline_dir, tmp_path, use_lora, num_steps, solver_steps):
    teacher, nets, student = perturbed_student(tiny_pipeline_dir, use_lora)
    scheduler = export.student_scheduler(teacher.pipeline.scheduler, teacher.process, timestep_scaling=10.0,
                                         original_inference_steps=solver_steps)
    expected = trainer_samples(teacher, student, scheduler, num_steps)
    pipe = export_and_load(teacher, tiny_pipeline_dir, nets.student.network, tmp_path, num_steps, scheduler, use_lora)
    assert pipe.scheduler.config.timestep_scaling == 10.0
    assert pipe.scheduler.config.original_inference_steps == solver_steps
    torch.testing.assert_close(diffusers_samples(pipe, teacher, num_steps), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("use_lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("backbone", ["sd", "sd3"])
def test_deterministic_export_samples_like_the_trainer(backbone_dirs, tiny_pipeline_dir, tmp_path, backbone, use_lora):
    folder = tiny_pipeline_dir if backbone == "sd" else backbone_dirs[backbone]
    teacher, nets, student = perturbed_student(folder, use_lora)
    scheduler = export.ddim_scheduler(teacher.pipeline.scheduler, teacher.process)
    condition = teacher.encode_prompts(PROMPTS)
    noise = torch.randn((len(PROMPTS), *teacher.latent_shape), generator=torch.Generator().manual_seed(1))
    for num_steps in (1, 4):
        timesteps = export.student_timesteps(scheduler, num_steps, teacher.backbone)
        with torch.no_grad():
            expected = ddim_sample(lambda x, t: student(x, t, condition), noise, timesteps, teacher.process)
        pipe = export_and_load(teacher, folder, nets.student.network, tmp_path / f"{num_steps}", num_steps, scheduler,
                               use_lora)
        latents = pipe(prompt=PROMPTS, num_inference_steps=num_steps, guidance_scale=1.0, height=32, width=32,
                       latents=teacher.backbone.to_pipeline_latents(noise), output_type="latent").images
        torch.testing.assert_close(teacher.backbone.from_pipeline_latents(latents, teacher.latent_shape), expected,
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("guidance_scale", [1.0, 2.5])
def test_a_guidance_embedded_student_samples_in_diffusers_at_any_scale(tiny_pipeline_dir, tmp_path, guidance_scale):
    teacher, nets = perturbed_networks(tiny_pipeline_dir, use_lora=False, with_fake_score=False,
                                       guidance_embedding_dim=LCM_EMBEDDING_DIM)
    assert nets.student.network.time_embedding.cond_proj.weight.abs().sum() > 0  # perturbed: w matters
    student = AtGuidanceScale(ConsistencyDenoiser(nets.student, timestep_scaling=10.0), guidance_scale)
    scheduler = export.student_scheduler(teacher.pipeline.scheduler, teacher.process, timestep_scaling=10.0)
    expected = trainer_samples(teacher, student, scheduler, 2)
    export.export_full(teacher.pipeline, nets.student.network, tmp_path, 2, scheduler, guidance_scale=guidance_scale)
    pipe = load_pipeline(tmp_path)
    assert pipe.unet.config.time_cond_proj_dim == LCM_EMBEDDING_DIM
    # diffusers runs no CFG for such a UNet: it passes the scale's embedding, one network call per step
    torch.testing.assert_close(diffusers_samples(pipe, teacher, 2, guidance_scale), expected, rtol=1e-5, atol=1e-5)
    other = diffusers_samples(pipe, teacher, 2, guidance_scale + 1.0)
    assert (other - expected).abs().max() > 1e-3


def test_student_timesteps_on_the_solver_grid():
    from diffusers import DDPMScheduler

    teacher_scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    scheduler = export.student_scheduler(teacher_scheduler, process_from_scheduler(teacher_scheduler), timestep_scaling=10.0,
                                         original_inference_steps=40)
    assert export.student_timesteps(scheduler, 4) == (999, 749, 499, 249)  # TSCD's 4 segment starts with k = 25
    assert export.student_timesteps(scheduler, 8) == (999, 874, 749, 624, 499, 374, 249, 124)
