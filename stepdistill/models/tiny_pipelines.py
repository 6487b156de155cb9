"""Tiny random-weight pipelines of the SDXL, SD3 and Flux families, built from configs, with no download.

They exist for tests: each builder returns a real diffusers pipeline of its family (the same
component classes, the same wiring between text encoders and denoiser, the family's scheduler and
latent normalisation) whose every part is a few thousand parameters, so that a 2-step sample of
32×32 images takes milliseconds on a CPU. The weights are random, seeded per part, and the
pipeline is written with ``save_pretrained`` so that ``DiffusionPipeline.from_pretrained(folder)``
reloads it offline (SD3 without T5 needs ``text_encoder_3=None, tokenizer_3=None`` passed: diffusers
refuses to leave those two out on its own; :func:`stepdistill.models.loading.load_pipeline` passes them).

All three VAEs have two levels (scale factor 2): 32×32 images ↔ 16×16 latents, with each family's
latent channel count (SDXL 4, SD3 16, Flux 16) and its ``scaling_factor``/``shift_factor``.

The CLIP tokenizers are ``tiny_sd``'s word-level CLIP BPE (16 tokens). The T5 tokenizer is a
``T5TokenizerFast`` over a Unigram vocabulary written here: every lowercase letter, digit and a
little punctuation is a piece (alone and word-initial, ``▁x``), each caption word is a single
``▁word`` piece, and ``<pad>`` = 0, ``</s>`` = 1, ``<unk>`` = 2 as in T5. Lowercase English prompts
therefore tokenize without unknowns; uppercase letters become ``<unk>``.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from stepdistill.models.tiny_sd import CAPTION_WORDS, write_tokenizer

CLIP_MAX_LENGTH = 16
T5_MAX_LENGTH = 32
IMAGE_SIZE = 32
LATENT_SIZE = IMAGE_SIZE // 2


def write_t5_tokenizer(folder: str | Path, max_length: int = T5_MAX_LENGTH) -> T5TokenizerFast:
    """Write a Unigram ``T5TokenizerFast`` (tokenizer.json, config) to ``folder`` and load it."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -6.0)]
    vocab += [("▁" + word, -1.0) for word in CAPTION_WORDS]
    for char in string.ascii_lowercase + string.digits + ".,'-!?":
        vocab += [("▁" + char, -4.0), (char, -5.0)]
    T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=max_length).save_pretrained(folder)
    tokenizer = T5TokenizerFast.from_pretrained(folder)
    for word in CAPTION_WORDS:
        ids = tokenizer(word, add_special_tokens=False).input_ids
        assert len(ids) == 1, f"caption word {word!r} should be one token, got {ids}"
    return tokenizer


def clip_text_encoder(
    tokenizer: CLIPTokenizer, hidden_size: int, projection_dim: int | None, seed: int
) -> CLIPTextModel | CLIPTextModelWithProjection:
    """A frozen 2-layer CLIP text encoder; with ``projection_dim`` the ``WithProjection`` variant."""
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        projection_dim=projection_dim or hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=CLIP_MAX_LENGTH,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = CLIPTextModelWithProjection(config) if projection_dim else CLIPTextModel(config)
    return model.eval().requires_grad_(False)


def _t5_text_encoder(tokenizer: T5TokenizerFast, d_model: int, seed: int) -> T5EncoderModel:
    """A frozen 2-layer T5 v1.1-style (gated-GELU) encoder."""
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=d_model // 4,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=T5_MAX_LENGTH,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    return T5EncoderModel(config).eval().requires_grad_(False)


def _vae(latent_channels: int, scaling_factor: float, shift_factor: float | None, seed: int) -> AutoencoderKL:
    """A two-level ``AutoencoderKL`` (scale factor 2); SD3/Flux-style (no quant convs) when ``shift_factor`` is set."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 8),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=IMAGE_SIZE,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=shift_factor is None,
        use_post_quant_conv=shift_factor is None,
    )


def build_sdxl(folder: str | Path, seed: int = 0) -> StableDiffusionXLPipeline:
    """A tiny seeded ``StableDiffusionXLPipeline`` saved to ``folder``; its default (and intended) size is 32×32.

    Latents are 4×16×16. The UNet has SDXL's ``text_time`` added conditioning: text_encoder_2's
    16-d projection plus six 8-d size/crop embeddings (input 64), and cross-attends to the
    concatenated penultimate states of the 8-d ``CLIPTextModel`` and the 16-d
    ``CLIPTextModelWithProjection`` (24-d). The scheduler is ``EulerDiscreteScheduler`` on SD's
    ``scaled_linear`` schedule (β 0.00085 → 0.012, epsilon) with "trailing" spacing, so 1 step
    starts at t = 999.
    """
    folder = Path(folder)
    tokenizer = write_tokenizer(folder / "tokenizer", CLIP_MAX_LENGTH)
    tokenizer_2 = write_tokenizer(folder / "tokenizer_2", CLIP_MAX_LENGTH)
    text_encoder = clip_text_encoder(tokenizer, hidden_size=8, projection_dim=None, seed=seed)
    text_encoder_2 = clip_text_encoder(tokenizer_2, hidden_size=16, projection_dim=16, seed=seed)
    addition_time_embed_dim = 8
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=text_encoder.config.hidden_size + text_encoder_2.config.hidden_size,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=addition_time_embed_dim,
        projection_class_embeddings_input_dim=text_encoder_2.config.projection_dim + 6 * addition_time_embed_dim,
        norm_num_groups=8,
    )
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        timestep_spacing="trailing",
    )
    pipe = StableDiffusionXLPipeline(
        vae=_vae(latent_channels=4, scaling_factor=0.13025, shift_factor=None, seed=seed),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipe.save_pretrained(folder)
    return pipe


def build_sd3(folder: str | Path, seed: int = 0, with_t5: bool = False) -> StableDiffusion3Pipeline:
    """A tiny seeded ``StableDiffusion3Pipeline`` saved to ``folder``; its default (and intended) size is 32×32.

    Latents are 16×16×16 (2×2 patches: 64 image tokens); the positional embedding covers up to
    64×64 images. The two ``CLIPTextModelWithProjection`` encoders are 8- and 16-d, so the
    pooled projection is 24-d and their concatenated penultimate states are zero-padded to the
    32-d joint attention width, which is also the T5 encoder's width. Without T5
    (``with_t5=False``) ``text_encoder_3`` and ``tokenizer_3`` are None and the pipeline feeds
    zeros in T5's place (``max_sequence_length`` tokens, 256 by default); reload that folder with
    ``DiffusionPipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)``. The
    scheduler is ``FlowMatchEulerDiscreteScheduler(shift=3.0)``.
    """
    folder = Path(folder)
    tokenizer = write_tokenizer(folder / "tokenizer", CLIP_MAX_LENGTH)
    tokenizer_2 = write_tokenizer(folder / "tokenizer_2", CLIP_MAX_LENGTH)
    text_encoder = clip_text_encoder(tokenizer, hidden_size=8, projection_dim=8, seed=seed)
    text_encoder_2 = clip_text_encoder(tokenizer_2, hidden_size=16, projection_dim=16, seed=seed)
    tokenizer_3 = write_t5_tokenizer(folder / "tokenizer_3") if with_t5 else None
    text_encoder_3 = _t5_text_encoder(tokenizer_3, d_model=32, seed=seed) if with_t5 else None
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=LATENT_SIZE,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        caption_projection_dim=16,
        pooled_projection_dim=text_encoder.config.projection_dim + text_encoder_2.config.projection_dim,
        pos_embed_max_size=16,
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=_vae(latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609, seed=seed),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )
    pipe.save_pretrained(folder)
    return pipe


def build_flux(folder: str | Path, seed: int = 0, guidance_embeds: bool = True) -> FluxPipeline:
    """A tiny seeded ``FluxPipeline`` saved to ``folder``; call it with ``height=32, width=32``.

    Flux's pipeline ignores the model's size for its default (128 × the VAE factor = 256 px), so
    pass the size. Height and width must be multiples of 4 (VAE factor 2 × 2×2 packing). At 32×32
    the latents are 16×16×16, packed into 64 tokens of 64 features (``transformer.in_channels``).
    The transformer has one double-stream and one single-stream block, 2 heads of 16 (RoPE axes
    4 + 6 + 6), the pooled 16-d ``CLIPTextModel`` output and the 32-d T5 encoder's states as
    context, and a guidance embedding when ``guidance_embeds`` (guidance-distilled, like
    FLUX.1-dev). The scheduler is ``FlowMatchEulerDiscreteScheduler`` with Flux's resolution-
    dependent shift (μ from 0.5 at 256 tokens to 1.15 at 4,096).
    """
    folder = Path(folder)
    tokenizer = write_tokenizer(folder / "tokenizer", CLIP_MAX_LENGTH)
    tokenizer_2 = write_t5_tokenizer(folder / "tokenizer_2")
    text_encoder = clip_text_encoder(tokenizer, hidden_size=16, projection_dim=None, seed=seed)
    text_encoder_2 = _t5_text_encoder(tokenizer_2, d_model=32, seed=seed)
    latent_channels = 16
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * latent_channels,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=text_encoder_2.config.d_model,
        pooled_projection_dim=text_encoder.config.hidden_size,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 6, 6),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=_vae(latent_channels=latent_channels, scaling_factor=0.3611, shift_factor=0.1159, seed=seed),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    pipe.save_pretrained(folder)
    return pipe
