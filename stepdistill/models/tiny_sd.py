"""Small Stable-Diffusion-format pipelines built from configs, with no download.

The shipped digits teacher and the tiny random-weight pipelines of the tests are both built
here, so that they are real ``StableDiffusionPipeline`` folders: a ``CLIPTokenizer``, a frozen
``CLIPTextModel``, an ``AutoencoderKL``, a ``UNet2DConditionModel`` (epsilon prediction) and a
``DDIMScheduler`` on Stable Diffusion's ``scaled_linear`` schedule (β 0.00085 → 0.012, 1,000
steps; ᾱ_999 ≈ 0.0047, so x0 stays recoverable at the terminal timestep).

The tokenizer is a word-level CLIP BPE: every lowercase letter, digit and a little punctuation
is a token, and each word of the digits captions is merged into a single token. Any lowercase
English prompt therefore tokenizes; the caption words cost one token each.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from stepdistill.data.digits import DIGIT_NAMES

CAPTION_WORDS = ("a", "handwritten", "digit", *DIGIT_NAMES)
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def scheduler_config() -> dict:
    """Stable Diffusion's noise schedule with DDIM "trailing" spacing (so 1 step starts at t = 999)."""
    return dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="trailing",
    )


def write_tokenizer(folder: str | Path, max_length: int = 16) -> CLIPTokenizer:
    """Write a word-level ``CLIPTokenizer`` (vocab.json, merges.txt, config) to ``folder`` and load it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab: dict[str, int] = {}
    for char in string.ascii_lowercase + string.digits + ".,'-!?":
        vocab.setdefault(char, len(vocab))
        vocab.setdefault(char + "</w>", len(vocab))
    merges = []
    for word in CAPTION_WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        merged = pieces[0]
        for piece in pieces[1:]:
            merges.append(f"{merged} {piece}")
            merged += piece
            vocab.setdefault(merged, len(vocab))
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab, indent=0))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer(
        vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"), model_max_length=max_length
    )
    tokenizer.save_pretrained(folder)
    for word in CAPTION_WORDS:
        ids = tokenizer(word, add_special_tokens=False).input_ids
        assert len(ids) == 1, f"caption word {word!r} should be one token, got {ids}"
    return tokenizer


@dataclass(frozen=True)
class TinySDConfig:
    """Sizes of a small SD-format pipeline. The defaults are the shipped digits teacher."""

    text_hidden_size: int = 64
    text_layers: int = 2
    unet_channels: tuple[int, ...] = (32, 64, 64)
    unet_layers_per_block: int = 1
    vae_channels: tuple[int, ...] = (16, 32, 32)
    latent_channels: int = 4
    image_size: int = 32
    max_length: int = 16


def build_pipeline(folder: str | Path, config: TinySDConfig = TinySDConfig(), seed: int = 0) -> StableDiffusionPipeline:
    """A randomly initialised (seeded) SD pipeline of the given sizes; the tokenizer is written to ``folder/tokenizer``."""
    torch.manual_seed(seed)
    tokenizer = write_tokenizer(Path(folder) / "tokenizer", config.max_length)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=config.text_hidden_size,
            intermediate_size=2 * config.text_hidden_size,
            num_hidden_layers=config.text_layers,
            num_attention_heads=4,
            max_position_embeddings=config.max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    levels = len(config.vae_channels)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=config.vae_channels,
        layers_per_block=1,
        latent_channels=config.latent_channels,
        norm_num_groups=min(32, config.vae_channels[0]),
        sample_size=config.image_size,
    )
    unet_levels = len(config.unet_channels)
    unet = UNet2DConditionModel(
        sample_size=config.image_size // 2 ** (levels - 1),
        in_channels=config.latent_channels,
        out_channels=config.latent_channels,
        block_out_channels=config.unet_channels,
        layers_per_block=config.unet_layers_per_block,
        down_block_types=("CrossAttnDownBlock2D",) * (unet_levels - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (unet_levels - 1),
        cross_attention_dim=config.text_hidden_size,
        attention_head_dim=8,
        norm_num_groups=min(32, config.unet_channels[0] // 2),
    )
    text_encoder.requires_grad_(False)
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(**scheduler_config()),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
