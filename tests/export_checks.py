"""Shared by the export tests: a perturbed student, and its samples by the trainer's sampler and by plain diffusers."""

from __future__ import annotations

import torch

from stepdistill import export
from stepdistill.diffusion import few_step_sample
from stepdistill.models import networks
from stepdistill.models.loading import load_pipeline
from stepdistill.models.teacher import load_teacher

PROMPTS = ["a handwritten digit three", "a handwritten digit eight"]


def perturbed_networks(folder, use_lora: bool, **build_options) -> tuple:
    """Teacher and networks whose student differs from the teacher (as after training)."""
    teacher = load_teacher(str(folder))
    nets = networks.build_networks(teacher.network, teacher.process, use_lora=use_lora, lora_rank=4, **build_options)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in nets.generator_parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return teacher, nets


def trainer_samples(teacher, student, scheduler, num_steps: int) -> torch.Tensor:
    """Latents from the trainer's own few-step sampler on the timesteps ``scheduler`` visits."""
    condition = teacher.encode_prompts(PROMPTS)
    timesteps = export.student_timesteps(scheduler, num_steps, teacher.backbone)
    noise = torch.randn((len(PROMPTS), *teacher.latent_shape), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return few_step_sample(
            lambda x, t: student(x, t, condition).x0, noise, timesteps, teacher.process,
            generator=torch.Generator().manual_seed(2),
        )


def diffusers_samples(pipe, teacher, num_steps: int, guidance_scale: float = 1.0) -> torch.Tensor:
    """Latents from a plain diffusers pipeline on the same noise."""
    noise = torch.randn((len(PROMPTS), *teacher.latent_shape), generator=torch.Generator().manual_seed(1))
    return pipe(
        prompt=PROMPTS, num_inference_steps=num_steps, guidance_scale=guidance_scale, latents=noise,
        generator=torch.Generator().manual_seed(2), output_type="latent",
    ).images


def export_and_load(teacher, base, network, folder, num_steps: int, scheduler, use_lora: bool):
    """Export ``network``'s student (LoRA adapter or full weights) and load it back as plain diffusers does."""
    if use_lora:
        export.export_lora(teacher.pipeline, network, networks.STUDENT, folder, num_steps, scheduler)
        pipe = export.load_lora_student(base, folder)
    else:
        export.export_full(teacher.pipeline, network, folder, num_steps, scheduler)
        pipe = load_pipeline(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe
