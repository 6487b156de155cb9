"""Sampling a pipeline for evaluation: the same prompts and the same initial noise for every model."""

from __future__ import annotations

import time

import torch
from diffusers import DiffusionPipeline

from stepdistill.models.backbones import backbone_for


def initial_noise(pipe: DiffusionPipeline, num_samples: int, seed: int, resolution: int | None = None) -> torch.Tensor:
    """``(N, C, h, w)`` standard normal latents (unpacked) at ``resolution`` px (default: the pipeline's
    own) drawn from ``seed``: identical for every model of one family."""
    backbone = backbone_for(pipe)
    shape = backbone.latent_shape(pipe, resolution or backbone.default_resolution(pipe))
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((num_samples, *shape), generator=generator)


def number_of_function_evaluations(pipe: DiffusionPipeline, num_inference_steps: int, guidance_scale: float) -> int:
    """Network calls per image: one per step, two with classifier-free guidance (conditional +
    unconditional), which diffusers skips for a network that takes the guidance scale as an input."""
    backbone = backbone_for(pipe)
    runs_cfg = backbone.pipeline_runs_cfg(backbone.network(pipe))
    return num_inference_steps * (2 if guidance_scale > 1 and runs_cfg else 1)


@torch.no_grad()
def generate(
    pipe: DiffusionPipeline,
    prompts: list[str],
    num_inference_steps: int,
    guidance_scale: float,
    seed: int = 0,
    batch_size: int = 250,
    resolution: int | None = None,
) -> tuple[torch.Tensor, float]:
    """Images ``(N, 3, H, W)`` in [-1, 1] for ``prompts`` and the seconds the pipeline took.

    Everything random comes from ``seed``: the initial latents and the scheduler's between-step noise
    (drawn from ``generator``, or, by pipelines that do not pass it to the scheduler (SD3, Flux), from
    torch's global generator, seeded here inside a forked RNG state).
    """
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be ≥ 1 (got {num_inference_steps})")
    backbone = backbone_for(pipe)
    latents = backbone.to_pipeline_latents(initial_noise(pipe, len(prompts), seed, resolution))
    size = {"height": resolution, "width": resolution} if resolution else {}
    generator = torch.Generator().manual_seed(seed)  # any noise the scheduler adds between steps (LCM re-noising)
    images, seconds = [], 0.0
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for start in range(0, len(prompts), batch_size):
            began = time.perf_counter()
            batch = pipe(
                prompt=prompts[start : start + batch_size],
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                latents=latents[start : start + batch_size].to(pipe.device, backbone.network(pipe).dtype),
                generator=generator,
                output_type="pt",
                **size,
            ).images
            seconds += time.perf_counter() - began
            images.append(batch.float().cpu() * 2 - 1)
    return torch.cat(images), seconds
