"""Every backbone's exported student samples in plain diffusers exactly as the trainer's own sampler does.

SDXL (UNet with added conditioning, LCMScheduler), SD3 (MMDiT, FlowMatchLCMScheduler at its static
shift) and Flux (packed latents, dynamic shift made static, guidance input), full weights and LoRA,
on the tiny random-weight pipelines of ``stepdistill.models.tiny_pipelines`` and on the shipped SD3
digits teacher; fp32 on the CPU. Full exports load with diffusers' own ``from_pretrained`` (its own
attention), while the trainer's SD3 student computes the zero-T5 tokens once.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline

from stepdistill import export
from stepdistill.assets import DIGITS_TEACHER_SD3
from stepdistill.diffusion import few_step_sample
from stepdistill.models import networks
from stepdistill.models.loading import load_pipeline
from stepdistill.models.teacher import load_teacher

PROMPTS = ["a handwritten digit three", "a handwritten digit eight"]


def perturbed(folder, use_lora: bool):
    teacher = load_teacher(str(folder), resolution=32)
    nets = networks.build_networks(teacher.network, teacher.process, use_lora=use_lora, lora_rank=4)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in nets.generator_parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return teacher, nets


def absent_parts(folder) -> dict:
    """The parts a pipeline folder records as absent (SD3's T5), which ``from_pretrained`` must be told of."""
    index = json.loads((folder / "model_index.json").read_text())
    return {name: None for name, entry in index.items() if isinstance(entry, list) and entry[0] is None}


def noise_for(teacher) -> torch.Tensor:
    return torch.randn((len(PROMPTS), *teacher.latent_shape), generator=torch.Generator().manual_seed(1))


def trainer_latents(teacher, student, scheduler, num_steps: int) -> torch.Tensor:
    condition = teacher.encode_prompts(PROMPTS)
    timesteps = export.student_timesteps(scheduler, num_steps, teacher.backbone)
    with torch.no_grad():
        return few_step_sample(lambda x, t: student(x, t, condition).x0, noise_for(teacher), timesteps,
                               teacher.process, generator=torch.Generator().manual_seed(2),
                               draw_noise=teacher.backbone.draw_noise)


def diffusers_latents(pipe, teacher, num_steps: int) -> torch.Tensor:
    torch.manual_seed(2)  # SD3's and Flux's pipelines re-noise from torch's global generator, not ``generator``
    latents = pipe(prompt=PROMPTS, num_inference_steps=num_steps, guidance_scale=1.0,
                   latents=teacher.backbone.to_pipeline_latents(noise_for(teacher)), height=teacher.resolution,
                   width=teacher.resolution, generator=torch.Generator().manual_seed(2), output_type="latent").images
    return teacher.backbone.from_pipeline_latents(latents, teacher.latent_shape)


@pytest.mark.parametrize("use_lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("backbone", ["sdxl", "sd3", "flux", "sd_v", "digits-sd3"])
def test_export_samples_like_the_trainer(backbone_dirs, tmp_path, backbone, use_lora):
    backbone_dirs = {**backbone_dirs, "digits-sd3": DIGITS_TEACHER_SD3}  # and the shipped flow teacher
    teacher, nets = perturbed(backbone_dirs[backbone], use_lora)
    scheduler = export.student_scheduler(teacher.pipeline.scheduler, teacher.process)
    for num_steps in (1, 2):
        expected = trainer_latents(teacher, nets.student, scheduler, num_steps)
        folder = tmp_path / f"{num_steps}"
        if use_lora:
            export.export_lora(teacher.pipeline, nets.student.network, networks.STUDENT, folder, num_steps, scheduler)
            pipe = export.load_lora_student(backbone_dirs[backbone], folder)
        else:
            export.export_full(teacher.pipeline, nets.student.network, folder, num_steps, scheduler)
            pipe = DiffusionPipeline.from_pretrained(folder, **absent_parts(folder))  # diffusers' own attention
        pipe.set_progress_bar_config(disable=True)
        assert type(pipe).__name__ == type(teacher.pipeline).__name__
        torch.testing.assert_close(diffusers_latents(pipe, teacher, num_steps), expected, rtol=1e-5, atol=1e-5)
    # and it is the student, not the teacher
    teacher_pipe = load_pipeline(backbone_dirs[backbone])
    teacher_pipe.scheduler = scheduler
    teacher_pipe.set_progress_bar_config(disable=True)
    assert not torch.allclose(diffusers_latents(teacher_pipe, teacher, 2), expected, atol=1e-3)


# -- the flow student's grid, as diffusers reads it back (the double-shift trap) ------------------

def test_sd3_student_grid_is_the_shifted_one_diffusers_samples(backbone_dirs):
    teacher = load_teacher(str(backbone_dirs["sd3"]))
    assert teacher.process.shift == 3.0
    scheduler = export.student_scheduler(teacher.pipeline.scheduler, teacher.process)
    assert not scheduler.config.use_dynamic_shifting and scheduler.config.shift == 3.0
    assert export.student_timesteps(scheduler, 1, teacher.backbone) == (1000.0,)
    export.student_timesteps(scheduler, 4, teacher.backbone)
    # SD3's pipeline passes no sigmas: linspace(1, shift(1/1000), 4), then shifted again by the scheduler
    # u = linspace(1000, 1000·shift(1/1000), 4) / 1000 = (1, 0.66799, 0.33599, 0.0029940); σ = 3u / (1 + 2u)
    np.testing.assert_allclose(scheduler.sigmas.numpy(), [1.0, 0.857692, 0.602151, 0.0089286, 0.0], atol=2e-6)


def test_flux_student_grid_takes_the_dynamic_shift_at_the_training_resolution(backbone_dirs):
    teacher = load_teacher(str(backbone_dirs["flux"]), resolution=32)
    # 32 px → 16×16 latents → 64 packed tokens: μ = 0.5 + (64 − 256)·0.65/3840, shift e^μ
    assert teacher.process.shift == pytest.approx(np.exp(0.5 + (64 - 256) * 0.65 / 3840), rel=1e-9)
    scheduler = export.student_scheduler(teacher.pipeline.scheduler, teacher.process)
    assert export.student_timesteps(scheduler, 1, teacher.backbone) == (1000.0,)
    export.student_timesteps(scheduler, 4, teacher.backbone)
    s = teacher.process.shift
    expected = [s * u / (1 + (s - 1) * u) for u in (1.0, 0.75, 0.5, 0.25)]  # Flux passes linspace(1, 1/N, N)
    np.testing.assert_allclose(scheduler.sigmas[:-1].numpy(), expected, rtol=1e-6)
