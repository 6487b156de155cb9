"""The stage hand-over's frozen copy of the student: a full copy, or a second LoRA adapter."""

from __future__ import annotations

import pytest
import torch

from stepdistill.models import networks
from stepdistill.models.networks import StageTeacher
from stepdistill.models.teacher import load_teacher


def outputs(denoiser, teacher):
    x_t = torch.randn((2, *teacher.latent_shape), generator=torch.Generator().manual_seed(0))
    condition = teacher.encode_prompts(["a handwritten digit one", "a handwritten digit two"])
    with torch.no_grad():
        return denoiser(x_t, torch.tensor([999.0, 400.0]), condition).x0


def nudge(parameters, seed):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in parameters:
            param.add_(0.05 * torch.randn(param.shape, generator=generator))


@pytest.mark.parametrize("use_lora", [False, True], ids=["full", "lora"])
def test_the_stage_teacher_is_the_student_as_it_was_at_the_last_hand_over(tiny_pipeline_dir, use_lora):
    teacher = load_teacher(str(tiny_pipeline_dir))
    nets = networks.build_networks(teacher.network, teacher.process, use_lora=use_lora, lora_rank=4,
                                   with_fake_score=False, student_process=teacher.process.for_few_steps())
    base = outputs(nets.teacher, teacher)
    nudge(nets.generator_parameters(), seed=1)
    copy = StageTeacher(nets.student)
    handed_over = outputs(nets.student, teacher)
    torch.testing.assert_close(outputs(copy.denoiser, teacher), handed_over, atol=0, rtol=0)
    own = [p for name, p in copy.denoiser.network.named_parameters() if not use_lora or ".stage_teacher." in name]
    assert own and not any(p.requires_grad for p in own)
    assert {id(p) for p in nets.generator_parameters()}.isdisjoint(id(p) for p in own)
    assert all(p.requires_grad for p in nets.generator_parameters())  # adding the copy left the student trainable

    nudge(nets.generator_parameters(), seed=2)  # the student trains on; the copy stays
    torch.testing.assert_close(outputs(copy.denoiser, teacher), handed_over, atol=0, rtol=0)
    assert not torch.allclose(outputs(nets.student, teacher), handed_over)
    torch.testing.assert_close(outputs(nets.teacher, teacher), base, atol=0, rtol=0)  # the base never changes

    saved = {name: tensor.clone() for name, tensor in copy.state_dict().items()}
    copy.copy_student()
    torch.testing.assert_close(outputs(copy.denoiser, teacher), outputs(nets.student, teacher), atol=0, rtol=0)
    copy.load_state_dict(saved)  # a resumed run restores the copy from its checkpoint
    torch.testing.assert_close(outputs(copy.denoiser, teacher), handed_over, atol=0, rtol=0)
    with pytest.raises(KeyError, match="other weights"):
        copy.load_state_dict({})
