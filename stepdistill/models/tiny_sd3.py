"""The SD3-format digits teacher's pipeline, built from configs with no download (untrained).

A complete ``StableDiffusion3Pipeline``: two frozen random ``CLIPTextModelWithProjection`` encoders
(64-d each, so the joint context is their 128-d concatenated penultimate states and the pooled
projection 128-d), no T5 (``text_encoder_3=None``: the pipeline fills T5's 256 tokens with zeros,
which :mod:`stepdistill.models.repeated_context` computes once), an ``SD3Transformer2DModel``
predicting the flow velocity, ``FlowMatchEulerDiscreteScheduler`` with SD3's shift of 3, and the ε
teacher's trained autoencoder (32×32×3 ↔ 8×8×4) given SD3's latent normalisation
z ↦ (z − shift_factor) · scaling_factor, so that both teachers share one latent space.

The MMDiT works on 2×2 patches (16 image tokens at 32 px; its positional table reaches 128 px):
6 joint blocks of 4 heads × 32 with RMS query-key norm (SD3.5's), 3.5 M parameters.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

from stepdistill.models.tiny_pipelines import CLIP_MAX_LENGTH, clip_text_encoder
from stepdistill.models.tiny_sd import write_tokenizer

SD3_SHIFT = 3.0  # FlowMatchEulerDiscreteScheduler's shift in SD3's own scheduler config
TEXT_WIDTH = 64


def build_pipeline(folder: str | Path, vae: AutoencoderKL, seed: int = 0) -> StableDiffusion3Pipeline:
    """A seeded, untrained digits SD3 pipeline around ``vae`` (its latent normalisation is set by the
    caller); the tokenizers are written to ``folder``."""
    folder = Path(folder)
    tokenizer = write_tokenizer(folder / "tokenizer", CLIP_MAX_LENGTH)
    tokenizer_2 = write_tokenizer(folder / "tokenizer_2", CLIP_MAX_LENGTH)
    text_encoder = clip_text_encoder(tokenizer, hidden_size=TEXT_WIDTH, projection_dim=TEXT_WIDTH, seed=seed)
    text_encoder_2 = clip_text_encoder(tokenizer_2, hidden_size=TEXT_WIDTH, projection_dim=TEXT_WIDTH, seed=seed + 1)
    latent_size = vae.config.sample_size // 2 ** (len(vae.config.block_out_channels) - 1)
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=latent_size,
        patch_size=2,
        in_channels=vae.config.latent_channels,
        out_channels=vae.config.latent_channels,
        num_layers=6,
        attention_head_dim=32,
        num_attention_heads=4,
        joint_attention_dim=2 * TEXT_WIDTH,
        caption_projection_dim=4 * 32,
        pooled_projection_dim=2 * TEXT_WIDTH,
        pos_embed_max_size=16,
        qk_norm="rms_norm",
    )
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SD3_SHIFT),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=None,
        tokenizer_3=None,
    )
