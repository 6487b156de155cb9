"""A guidance-scale input for full-weight students: diffusers' embedding, and a start equal to the teacher."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import StableDiffusionPipeline

from stepdistill.diffusion import guidance_scale_embedding, process_from_scheduler
from stepdistill.models.denoiser import Denoiser
from stepdistill.models.guidance_embedding import with_guidance_embedding


@pytest.mark.parametrize("dim", [256, 7])
def test_embedding_is_the_one_diffusers_pipelines_pass(dim):
    w = torch.tensor([1.0, 1.5, 3.0, 8.0])
    expected = StableDiffusionPipeline.get_guidance_scale_embedding(None, w - 1, embedding_dim=dim)
    torch.testing.assert_close(guidance_scale_embedding(w, dim), expected)


def test_the_embedded_student_starts_as_the_teacher_at_every_scale(tiny_pipeline):
    teacher_unet = copy.deepcopy(tiny_pipeline.unet)
    process = process_from_scheduler(tiny_pipeline.scheduler)
    teacher, student = Denoiser(teacher_unet, process), Denoiser(with_guidance_embedding(teacher_unet, 32), process)
    assert student.takes_guidance_scale and not teacher.takes_guidance_scale
    generator = torch.Generator().manual_seed(0)
    x_t = torch.randn(3, 4, 16, 16, generator=generator)
    t = torch.tensor([999, 500, 20])
    text = {"prompt_embeds": torch.randn(3, 77, tiny_pipeline.text_encoder.config.hidden_size, generator=generator)}
    with torch.no_grad():
        expected = teacher(x_t, t, text).x0
        for w in (1.0, 4.0):
            torch.testing.assert_close(student(x_t, t, text, embedded_guidance=torch.full((3,), w)).x0, expected)
    with pytest.raises(ValueError, match="needs embedded_guidance"):
        student(x_t, t, text)
    with pytest.raises(ValueError, match="only such a UNet takes it"):
        teacher(x_t, t, text, embedded_guidance=torch.ones(3))
    with pytest.raises(ValueError, match="already takes"):
        with_guidance_embedding(student.network)
