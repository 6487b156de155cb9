"""The networks of a distillation run: frozen teacher, student (generator), fake score, discriminator.

Full mode keeps three UNets: the frozen teacher and two trainable copies of it. LoRA mode keeps
ONE frozen UNet with two peft LoRA adapters, ``student`` and ``fake_score``; the teacher is that
UNet with adapters off. LoRA B-matrices start at zero, so in both modes student and fake score
start as exact copies of the teacher.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import torch
from peft import LoraConfig
from torch import nn

from stepdistill.diffusion import NoiseProcess
from stepdistill.models.denoiser import Denoiser, select_adapter
from stepdistill.models.guidance_embedding import with_guidance_embedding

STUDENT, FAKE_SCORE = "student", "fake_score"
LORA_TARGET_MODULES = (
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj",
)


class DiscriminatorHead(nn.Module):
    """DMD2's GAN classifier on the fake score's mid-block features ``(B, C, h, w)`` → one logit per image."""

    def __init__(self, channels: int, hidden: int = 128) -> None:
        super().__init__()
        groups = 32 if channels % 32 == 0 else 8 if channels % 8 == 0 else 1
        self.layers = nn.Sequential(
            nn.GroupNorm(groups, channels), nn.SiLU(),
            nn.Conv2d(channels, hidden, 3, padding=1), nn.SiLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(hidden, 1),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features.float()).squeeze(1)


@dataclass
class Networks:
    """What a method may call. ``teacher`` is frozen; the trainer optimises the other three."""

    teacher: Denoiser
    student: Denoiser
    fake_score: Denoiser | None  # None for methods without a critic (consistency distillation)
    discriminator: DiscriminatorHead | None

    def generator_parameters(self) -> list[nn.Parameter]:
        return _trainable(self.student.unet, STUDENT)

    def critic_parameters(self) -> list[nn.Parameter]:
        params = _trainable(self.fake_score.unet, FAKE_SCORE) if self.fake_score is not None else []
        if self.discriminator is not None:
            params += list(self.discriminator.parameters())
        return params


def _trainable(unet: nn.Module, adapter: str) -> list[nn.Parameter]:
    """All weights of a full copy, or only the LoRA weights of ``adapter`` on a shared UNet."""
    if getattr(unet, "_hf_peft_config_loaded", False):
        return [p for name, p in unet.named_parameters() if f".{adapter}." in name]
    return list(unet.parameters())


def lora_config(rank: int) -> LoraConfig:
    """LoRA on attention, feed-forward and convolution layers (B = 0 at start, scale α/r = 1)."""
    return LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=list(LORA_TARGET_MODULES))


def build_networks(
    teacher_unet: nn.Module,
    process: NoiseProcess,
    use_lora: bool = False,
    lora_rank: int = 16,
    with_discriminator: bool = False,
    with_fake_score: bool = True,
    guidance_embedding_dim: int | None = None,
) -> Networks:
    """Student and (unless ``with_fake_score=False``) fake score initialised from the teacher,
    full copies or LoRA adapters; ``guidance_embedding_dim`` gives a full student a guidance-scale input."""
    if guidance_embedding_dim is not None and use_lora:
        raise ValueError("a guidance-scale input needs a full-weight student: LoRA cannot add the projection layer")
    teacher_unet.requires_grad_(False).eval()
    adapters = (STUDENT, FAKE_SCORE) if with_fake_score else (STUDENT,)
    if use_lora:
        if lora_rank < 1:
            raise ValueError(f"lora_rank must be ≥ 1 (got {lora_rank})")
        with warnings.catch_warnings():  # peft warns about a second adapter, which is the point here
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            for adapter in adapters:
                teacher_unet.add_adapter(lora_config(lora_rank), adapter_name=adapter)
        select_adapter(teacher_unet, STUDENT)
        student_unet = fake_unet = teacher_unet
    else:
        student_unet = (copy.deepcopy(teacher_unet) if guidance_embedding_dim is None
                        else with_guidance_embedding(teacher_unet, guidance_embedding_dim))
        student_unet.requires_grad_(True).train()
        fake_unet = copy.deepcopy(teacher_unet).requires_grad_(True).train() if with_fake_score else None
    discriminator = None
    if with_discriminator:
        discriminator = DiscriminatorHead(teacher_unet.config.block_out_channels[-1])
    return Networks(
        teacher=Denoiser(teacher_unet, process, adapter=None),
        student=Denoiser(student_unet, process, adapter=STUDENT if use_lora else None),
        fake_score=Denoiser(fake_unet, process, adapter=FAKE_SCORE if use_lora else None) if with_fake_score else None,
        discriminator=discriminator,
    )
