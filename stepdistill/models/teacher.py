"""The frozen teacher: a Stable-Diffusion-family pipeline, its noise process and its prompt encoder.

Supported today: pipelines whose denoiser is a ``UNet2DConditionModel`` conditioned only on one
text encoder's hidden states (SD 1.x / 2.x and the shipped digits teacher), predicting ε, x0 or v
on a DDPM-family schedule. Others are refused with a message that says so.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import DiffusionPipeline, UNet2DConditionModel

from stepdistill.diffusion import NoiseProcess
from stepdistill.models.loading import PipelineError, load_pipeline


@dataclass
class Teacher:
    """A loaded teacher pipeline with its frozen parts and its noise process."""

    pipeline: DiffusionPipeline
    process: NoiseProcess

    @property
    def unet(self) -> UNet2DConditionModel:
        return self.pipeline.unet

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        size = self.unet.config.sample_size
        return (self.unet.config.in_channels, size, size)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], batch_size: int = 256) -> torch.Tensor:
        """Text-encoder hidden states ``(N, L, D)`` for ``prompts`` (the UNet's cross-attention input)."""
        chunks = []
        for start in range(0, len(prompts), batch_size):
            embeddings, _ = self.pipeline.encode_prompt(
                prompts[start : start + batch_size], device=self.unet.device, num_images_per_prompt=1,
                do_classifier_free_guidance=False,
            )
            chunks.append(embeddings)
        return torch.cat(chunks)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """Scaled VAE latents (posterior means) of ``(N, 3, H, W)`` images in [-1, 1]."""
        vae = self.pipeline.vae
        latents = [
            vae.encode(chunk.to(vae.device, vae.dtype)).latent_dist.mean * vae.config.scaling_factor
            for chunk in images.split(batch_size)
        ]
        return torch.cat(latents).float()


def load_teacher(name_or_path: str, revision: str | None = None, variant: str | None = None) -> Teacher:
    """Load and freeze a teacher pipeline; refuse architectures the methods cannot drive yet."""
    pipe = load_pipeline(name_or_path, revision=revision, variant=variant)
    unet = getattr(pipe, "unet", None)
    if not isinstance(unet, UNet2DConditionModel) or not hasattr(pipe, "encode_prompt"):
        raise PipelineError(
            f"{name_or_path} is a {type(pipe).__name__}; stepdistill distils UNet text-to-image pipelines "
            "(Stable Diffusion 1.x/2.x style) so far. Transformer (SD3, Flux) teachers are not supported yet."
        )
    if unet.config.addition_embed_type is not None or getattr(pipe, "text_encoder_2", None) is not None:
        raise PipelineError(
            f"{name_or_path} needs added conditioning (SDXL-style text_encoder_2 / time ids), which is not supported yet"
        )
    try:
        process = NoiseProcess.from_scheduler(pipe.scheduler)
    except ValueError as error:
        raise PipelineError(f"{name_or_path}: {error}") from None
    for part in (pipe.unet, pipe.vae, pipe.text_encoder):
        part.requires_grad_(False).eval()
    return Teacher(pipeline=pipe, process=process)
