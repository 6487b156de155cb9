"""The frozen teacher: a text-to-image pipeline, its backbone adapter, its noise process and its encoders.

Supported: Stable Diffusion 1.x/2.x and SDXL (UNets, DDPM-family schedulers: ε, x0 or v prediction),
SD3/SD3.5 and Flux (transformers, rectified flow). Others are refused with a message that says so
(:func:`~stepdistill.models.backbones.backbone_for`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from diffusers import DiffusionPipeline
from torch import nn

from stepdistill import conditioning
from stepdistill.conditioning import Condition
from stepdistill.diffusion import NoiseProcess, process_from_scheduler
from stepdistill.models.backbones import Backbone, BackboneError, backbone_for
from stepdistill.models.loading import PipelineError, load_pipeline

@dataclass
class Teacher:
    """A loaded teacher pipeline with its frozen parts, its adapter, its noise process and the
    resolution it is distilled at."""

    pipeline: DiffusionPipeline
    backbone: Backbone
    process: NoiseProcess
    resolution: int

    @property
    def network(self) -> nn.Module:
        """The denoising network: a UNet or a transformer."""
        return self.backbone.network(self.pipeline)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """``(C, h, w)`` of one latent at :attr:`resolution`, as methods see it (unpacked)."""
        return self.backbone.latent_shape(self.pipeline, self.resolution)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], batch_size: int = 256) -> Condition:
        """The condition of every prompt (text-encoder outputs the network reads), computed in chunks and
        kept on the CPU (a Flux condition is 8 MiB a prompt): batches move what they pick. Over-long
        prompts are cut as the pipeline cuts them (see :data:`~stepdistill.models.loading.TRUNCATION_NOTICE`)."""
        chunks = [conditioning.to(self.backbone.encode(self.pipeline, prompts[start : start + batch_size],
                                                       self.resolution), "cpu")
                  for start in range(0, len(prompts), batch_size)]
        return conditioning.concat(*chunks)

    @torch.no_grad()
    def encode_unconditional(self) -> Condition:
        """The unconditional condition of classifier-free guidance, one sample (as the pipeline makes it)."""
        return self.backbone.encode_unconditional(self.pipeline, self.resolution)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """Scaled (and shifted, where the VAE has a shift factor) VAE latents (posterior means) of
        ``(N, 3, H, W)`` images in [-1, 1], in the memory layout the VAE leaves them (channels-last on
        the CPU: ``randn_like`` of them draws other numbers than of a contiguous copy)."""
        vae = self.pipeline.vae
        shift = vae.config.get("shift_factor") or 0.0
        latents = [(vae.encode(chunk.to(vae.device, vae.dtype)).latent_dist.mean - shift) * vae.config.scaling_factor
                   for chunk in images.split(batch_size)]
        return torch.cat(latents).float()

    def encoder_fingerprints(self) -> dict[str, str]:
        """A fingerprint of each encoder a cache depends on (the VAE and every text encoder), by name:
        SHA-256 of its parameters' names, shapes and dtypes and ~1,024 values spread over each (a
        full hash of a 5 B-parameter T5 would take minutes; a different checkpoint differs in these)."""
        fingerprints = {}
        for name, part in sorted(self.pipeline.components.items()):
            if isinstance(part, nn.Module) and (name == "vae" or name.startswith("text_encoder")):
                digest = hashlib.sha256()
                for key, tensor in part.state_dict().items():
                    flat = tensor.detach().reshape(-1)
                    sample = flat[:: max(1, flat.numel() // 1024)].float().cpu().numpy()
                    digest.update(f"{key}{tuple(tensor.shape)}{tensor.dtype}".encode() + sample.tobytes())
                fingerprints[name] = digest.hexdigest()[:16]
        return fingerprints

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Images ``(N, 3, H, W)`` in [-1, 1] from latents as :meth:`encode_images` makes them."""
        return self.decode(latents).clamp(-1, 1)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """:meth:`decode_latents` with gradient and without clamping (ADD's discriminator reads decoded
        student samples; gradients flow back through the frozen VAE)."""
        vae = self.pipeline.vae
        shift = vae.config.get("shift_factor") or 0.0
        return vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor + shift).sample.float()


def load_teacher(
    name_or_path: str, revision: str | None = None, variant: str | None = None, resolution: int | None = None,
    timestep_sampling: str = "uniform", logit_mean: float = 0.0, logit_std: float = 1.0,
    timestep_shift: float | None = None,
) -> Teacher:
    """Load and freeze a teacher pipeline at ``resolution`` px (default: the pipeline's own); refuse
    architectures, schedulers and sizes the methods cannot drive, in one line each."""
    pipe = load_pipeline(name_or_path, revision=revision, variant=variant)
    try:
        backbone = backbone_for(pipe)
    except BackboneError as error:
        raise PipelineError(f"{name_or_path}: {error}") from None
    resolution = resolution or backbone.default_resolution(pipe)
    multiple = backbone.resolution_multiple(pipe)
    if resolution % multiple:
        raise PipelineError(f"--resolution {resolution} is not a multiple of {multiple}, which this "
                            f"{type(pipe).__name__} needs")
    try:
        process = process_from_scheduler(
            pipe.scheduler, image_seq_len=backbone.image_seq_len(backbone.latent_shape(pipe, resolution)),
            timestep_sampling=timestep_sampling, logit_mean=logit_mean, logit_std=logit_std, shift=timestep_shift)
    except ValueError as error:
        raise PipelineError(f"{name_or_path}: {error}") from None
    for name, part in pipe.components.items():
        if isinstance(part, nn.Module):
            part.requires_grad_(False).eval()
    return Teacher(pipeline=pipe, backbone=backbone, process=process, resolution=resolution)
