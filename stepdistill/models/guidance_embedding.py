"""A student that takes the guidance scale as an input (LCM §4.1, "w-conditioned" students).

The UNet's timestep embedding gets a second summand, a linear map of a sinusoidal embedding of the
guidance scale: diffusers' ``UNet2DConditionModel(time_cond_proj_dim=d)`` adds ``cond_proj(e(w))``
to the time embedding, and its Stable Diffusion pipelines then skip classifier-free guidance and
pass e(w) instead (:func:`~stepdistill.diffusion.guidance_scale_embedding`; diffusers' convention:
w = 1 is unguided). The projection starts at zero, so the student starts
as the teacher whatever w is, and one student samples at any w in the range it was trained on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from diffusers import UNet2DConditionModel
from torch import nn

if TYPE_CHECKING:
    from stepdistill.diffusion import NoiseProcess
    from stepdistill.models.denoiser import Prediction

LCM_EMBEDDING_DIM = 256


def with_guidance_embedding(unet: UNet2DConditionModel, dim: int = LCM_EMBEDDING_DIM) -> UNet2DConditionModel:
    """A copy of ``unet`` with a guidance-scale input whose projection starts at zero (= ``unet`` at every w)."""
    if unet.config.time_cond_proj_dim is not None:
        raise ValueError("this UNet already takes a guidance-scale embedding (time_cond_proj_dim is set)")
    settings = {k: v for k, v in unet.config.items() if not k.startswith("_")}  # "_use_default_values" would reset it
    student = UNet2DConditionModel.from_config({**settings, "time_cond_proj_dim": dim})
    missing, unexpected = student.load_state_dict(unet.state_dict(), strict=False)
    if unexpected or set(missing) != {"time_embedding.cond_proj.weight"}:
        raise ValueError(f"cannot copy the UNet into one with a guidance embedding (missing {missing}, unexpected {unexpected})")
    nn.init.zeros_(student.time_embedding.cond_proj.weight)
    return student.to(device=unet.device, dtype=unet.dtype)


class AtGuidanceScale(nn.Module):
    """A guidance-embedded student fixed at one scale w: ``model(x_t, t, condition)`` as samplers call it."""

    def __init__(self, student: nn.Module, guidance_scale: float) -> None:
        super().__init__()
        self.student = student
        self.guidance_scale = guidance_scale

    @property
    def process(self) -> NoiseProcess:
        return self.student.process

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, condition: dict) -> Prediction:
        scale = torch.full((x_t.shape[0],), self.guidance_scale, device=x_t.device)
        return self.student(x_t, t, condition, embedded_guidance=scale)
