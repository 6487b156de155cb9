import pytest
import torch
from diffusers import (
    DiffusionPipeline,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionXLPipeline,
)
from transformers import T5EncoderModel, T5TokenizerFast

from stepdistill.models import tiny_pipelines
from stepdistill.models.tiny_sd import CAPTION_WORDS

PROMPTS = ["a handwritten digit three", "a handwritten digit seven"]


def sample(pipe, **kwargs):
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    return pipe(
        prompt=PROMPTS, height=32, width=32, num_inference_steps=2, output_type="pt", generator=generator, **kwargs
    ).images


def assert_reload_samples_like_built(built, reloaded, **kwargs):
    images = sample(reloaded, **kwargs)
    assert images.shape == (2, 3, 32, 32)
    assert torch.isfinite(images).all()
    assert images.min() >= 0 and images.max() <= 1
    torch.testing.assert_close(images, sample(built, **kwargs), rtol=0, atol=1e-6)


def test_t5_tokenizer_round_trips(tmp_path):
    written = tiny_pipelines.write_t5_tokenizer(tmp_path, max_length=12)
    reloaded = T5TokenizerFast.from_pretrained(tmp_path)
    assert (reloaded.pad_token_id, reloaded.eos_token_id, reloaded.unk_token_id) == (0, 1, 2)
    assert reloaded.model_max_length == 12 and len(reloaded) == len(written)
    for word in CAPTION_WORDS:
        assert len(reloaded(word, add_special_tokens=False).input_ids) == 1
    for text in [*PROMPTS, "hello world 42", ""]:
        ids = reloaded(text).input_ids
        assert ids == written(text).input_ids
        assert ids[-1] == reloaded.eos_token_id and reloaded.unk_token_id not in ids
        assert reloaded.decode(ids, skip_special_tokens=True) == text
    padded = reloaded(PROMPTS[0], padding="max_length", max_length=12).input_ids
    assert padded == [*reloaded(PROMPTS[0]).input_ids, *[0] * 7]


def test_sdxl_reloads_and_samples(tmp_path):
    built = tiny_pipelines.build_sdxl(tmp_path)
    pipe = DiffusionPipeline.from_pretrained(tmp_path)
    assert isinstance(pipe, StableDiffusionXLPipeline) and isinstance(pipe.scheduler, EulerDiscreteScheduler)
    assert pipe.config.force_zeros_for_empty_prompt
    unet = pipe.unet.config
    assert unet.addition_embed_type == "text_time"
    assert unet.projection_class_embeddings_input_dim == (
        pipe.text_encoder_2.config.projection_dim + 6 * unet.addition_time_embed_dim
    )
    assert unet.cross_attention_dim == pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    assert unet.in_channels == pipe.vae.config.latent_channels == 4
    assert unet.sample_size * pipe.vae_scale_factor == 32
    assert_reload_samples_like_built(built, pipe, guidance_scale=5.0)


def test_sd3_without_t5_reloads_and_samples(tmp_path):
    built = tiny_pipelines.build_sd3(tmp_path)
    pipe = DiffusionPipeline.from_pretrained(tmp_path, text_encoder_3=None, tokenizer_3=None)
    assert isinstance(pipe, StableDiffusion3Pipeline)
    assert pipe.text_encoder_3 is None and pipe.tokenizer_3 is None
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler) and pipe.scheduler.config.shift == 3.0
    transformer = pipe.transformer.config
    assert transformer.in_channels == pipe.vae.config.latent_channels == 16
    assert transformer.sample_size * pipe.vae_scale_factor == 32
    assert pipe.vae.config.shift_factor is not None
    assert_reload_samples_like_built(built, pipe, guidance_scale=5.0)


def test_sd3_with_t5_reloads_and_samples(tmp_path):
    built = tiny_pipelines.build_sd3(tmp_path, with_t5=True)
    pipe = DiffusionPipeline.from_pretrained(tmp_path)
    assert isinstance(pipe.text_encoder_3, T5EncoderModel) and isinstance(pipe.tokenizer_3, T5TokenizerFast)
    assert pipe.transformer.config.joint_attention_dim == pipe.text_encoder_3.config.d_model
    assert_reload_samples_like_built(built, pipe, guidance_scale=5.0, max_sequence_length=16)


@pytest.mark.parametrize("guidance_embeds", [True, False])
def test_flux_reloads_and_samples(tmp_path, guidance_embeds):
    built = tiny_pipelines.build_flux(tmp_path, guidance_embeds=guidance_embeds)
    pipe = DiffusionPipeline.from_pretrained(tmp_path)
    assert isinstance(pipe, FluxPipeline) and isinstance(pipe.tokenizer_2, T5TokenizerFast)
    assert pipe.transformer.config.guidance_embeds is guidance_embeds
    assert pipe.transformer.config.in_channels == 4 * pipe.vae.config.latent_channels
    assert pipe.scheduler.config.use_dynamic_shifting
    assert_reload_samples_like_built(built, pipe, guidance_scale=3.5)
    packed = pipe(prompt=PROMPTS[:1], height=32, width=32, num_inference_steps=1, output_type="latent").images
    assert packed.shape == (1, 8 * 8, 4 * 16)


@pytest.mark.parametrize("build", [tiny_pipelines.build_sdxl, tiny_pipelines.build_sd3, tiny_pipelines.build_flux])
def test_builders_are_seeded(tmp_path, build):
    first, again, other = (build(tmp_path / name, seed=seed) for name, seed in [("a", 0), ("b", 0), ("c", 1)])
    for name in ("text_encoder", "vae", "unet" if build is tiny_pipelines.build_sdxl else "transformer"):
        weights = [getattr(pipe, name).state_dict() for pipe in (first, again, other)]
        assert all(torch.equal(w, weights[1][k]) for k, w in weights[0].items()), name
        assert not all(torch.equal(w, weights[2][k]) for k, w in weights[0].items()), name
