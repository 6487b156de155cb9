"""The denoiser contract's mid-block features: the hooked forward equals what a plain full forward computes."""

from __future__ import annotations

import torch

from stepdistill.models.denoiser import Denoiser
from stepdistill.models.teacher import load_teacher


def test_features_alone_equal_the_full_forwards_and_carry_gradients(tiny_pipeline_dir):
    teacher = load_teacher(str(tiny_pipeline_dir))
    denoiser = Denoiser(teacher.network, teacher.process)
    teacher.network.requires_grad_(True)
    try:
        x = torch.randn(3, *teacher.latent_shape)
        t = torch.tensor([10, 500, 990])
        text = teacher.encode_prompts(["a handwritten digit one", "a handwritten digit two", ""])
        seen = []
        hook = teacher.network.mid_block.register_forward_hook(lambda module, inputs, output: seen.append(output))
        denoiser(x, t, text)  # the full forward
        hook.remove()
        (features,) = denoiser.features(x, t, text).values()
        expected = seen[0]
        torch.testing.assert_close(features, expected, atol=0, rtol=0)
        features.square().sum().backward()
        assert teacher.network.conv_in.weight.grad.abs().sum() > 0  # the down path is trained through it
        assert teacher.network.conv_out.weight.grad is None  # the up path's output is unused: no gradient reaches it
    finally:
        teacher.network.requires_grad_(False)
