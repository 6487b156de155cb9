"""A deterministic (progressive-distillation) student exports with a DDIM / flow-Euler scheduler that
plain diffusers samples exactly as the trainer's ``ddim_sample``: on SD 1.x (ε teacher, v student),
SD3 and Flux, full weights and LoRA."""

from __future__ import annotations

import pytest
import torch

from stepdistill import export
from stepdistill.diffusion import ddim_sample
from stepdistill.models import networks
from stepdistill.models.teacher import load_teacher

from export_checks import export_and_load

PROMPTS = ["a handwritten digit three", "a handwritten digit eight"]


def perturbed_v_student(folder, use_lora: bool):
    """A teacher and a student that reads its network in the few-step parameterisation, perturbed as after training."""
    teacher = load_teacher(str(folder), resolution=32)
    nets = networks.build_networks(teacher.network, teacher.process, use_lora=use_lora, lora_rank=4,
                                   with_fake_score=False, student_process=teacher.process.for_few_steps())
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in nets.generator_parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return teacher, nets


def latents_of(pipe, teacher, noise, num_steps):
    latents = pipe(prompt=PROMPTS, num_inference_steps=num_steps, guidance_scale=1.0,
                   latents=teacher.backbone.to_pipeline_latents(noise), height=32, width=32,
                   output_type="latent").images
    return teacher.backbone.from_pipeline_latents(latents, teacher.latent_shape)


@pytest.mark.parametrize("use_lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("backbone", ["sd", "sd3", "flux"])
def test_ddim_export_samples_like_the_trainer(backbone_dirs, tiny_pipeline_dir, tmp_path, backbone, use_lora):
    folder = tiny_pipeline_dir if backbone == "sd" else backbone_dirs[backbone]
    teacher, nets = perturbed_v_student(folder, use_lora)
    scheduler = export.ddim_scheduler(teacher.pipeline.scheduler, nets.student.process)
    condition = teacher.encode_prompts(PROMPTS)
    noise = torch.randn((len(PROMPTS), *teacher.latent_shape), generator=torch.Generator().manual_seed(1))
    for num_steps in (1, 2, 4):
        grid = export.sampling_grid(scheduler, num_steps, teacher.backbone)
        with torch.no_grad():
            expected = ddim_sample(lambda x, t: nets.student(x, t, condition), noise, grid[:-1].tolist(),
                                   nets.student.process)
        pipe = export_and_load(teacher, folder, nets.student.network, tmp_path / f"{num_steps}", num_steps, scheduler,
                               use_lora)
        if backbone == "sd":
            assert pipe.scheduler.config.prediction_type == "v_prediction"
        torch.testing.assert_close(latents_of(pipe, teacher, noise, num_steps), expected, rtol=1e-4, atol=1e-4)


def test_the_ddim_grid_is_diffusers_own_and_other_step_counts_are_refused(tiny_pipeline_dir):
    teacher = load_teacher(str(tiny_pipeline_dir))
    scheduler = export.ddim_scheduler(teacher.pipeline.scheduler, teacher.process.for_few_steps())
    assert export.sampling_grid(scheduler, 4).tolist() == [999, 749, 499, 249, -1]
    assert export.sampling_grid(scheduler, 1).tolist() == [999, -1]
    with pytest.raises(ValueError, match="must divide the teacher's 1000"):
        export.sampling_grid(scheduler, 16)  # DDIM steps 999 → 937 while its next timestep is 936
    assert export.steps_on(scheduler, torch.tensor([999.0, 749.0, 499.0, 249.0, -1.0]))
    assert not export.steps_on(scheduler, torch.tensor([999.0, 750.0, 499.0, 249.0, -1.0]))
    assert not export.steps_on(scheduler, torch.linspace(999, -1, 17))  # no 16-step grid is DDIM's
