import json

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from transformers import CLIPTokenizer

from stepdistill.data import digits
from stepdistill.models import tiny_sd

CAPTIONS = [digits.prompt_for(label) for label in range(10)]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer")
    tiny_sd.write_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return CLIPTokenizer.from_pretrained(tokenizer_dir)


def test_write_tokenizer_writes_a_loadable_folder(tmp_path):
    tokenizer = tiny_sd.write_tokenizer(tmp_path, max_length=12)
    assert {"vocab.json", "merges.txt", "tokenizer_config.json"} <= {p.name for p in tmp_path.iterdir()}
    assert tokenizer.model_max_length == 12
    vocab = json.loads((tmp_path / "vocab.json").read_text())
    assert len(vocab) == len(tokenizer)
    assert vocab[tiny_sd.BOS] == tokenizer.bos_token_id and vocab[tiny_sd.EOS] == tokenizer.eos_token_id


@pytest.mark.parametrize("word", tiny_sd.CAPTION_WORDS)
def test_every_caption_word_is_one_token(tokenizer, word):
    assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1


@pytest.mark.parametrize("caption", CAPTIONS)
def test_caption_is_bos_four_words_eos(tokenizer, caption):
    ids = tokenizer(caption).input_ids
    assert len(ids) == 6
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.unk_token_id not in ids[1:-1]  # CLIP's unknown token is its EOS


@pytest.mark.parametrize("text", [*CAPTIONS, "", "hello world", "a lazy dog sleeping"])
def test_decode_encode_round_trip(tokenizer, text):
    assert tokenizer.decode(tokenizer(text).input_ids, skip_special_tokens=True) == text


@pytest.mark.parametrize("text", [*CAPTIONS, "", "hello world"])
def test_returned_and_reloaded_tokenizers_agree(tmp_path, text):
    written = tiny_sd.write_tokenizer(tmp_path)
    reloaded = CLIPTokenizer.from_pretrained(tmp_path)
    assert written(text).input_ids == reloaded(text).input_ids
    padded = reloaded(text, padding="max_length", max_length=reloaded.model_max_length).input_ids
    assert len(padded) == 16


def test_scheduler_config_is_sd_schedule_with_trailing_spacing():
    scheduler = DDIMScheduler(**tiny_sd.scheduler_config())
    scheduler.set_timesteps(1)
    assert scheduler.timesteps.tolist() == [999]
    assert 0.004 < float(scheduler.alphas_cumprod[-1]) < 0.0055


def test_tiny_pipeline_components(tiny_pipeline, tiny_config):
    assert isinstance(tiny_pipeline, StableDiffusionPipeline)
    assert tiny_pipeline.vae_scale_factor == 2
    assert tiny_pipeline.unet.config.sample_size == 16
    assert tiny_pipeline.unet.config.sample_size * tiny_pipeline.vae_scale_factor == tiny_config.image_size == 32
    assert tiny_pipeline.unet.config.cross_attention_dim == tiny_pipeline.text_encoder.config.hidden_size == 16
    assert tiny_pipeline.unet.config.in_channels == tiny_pipeline.vae.config.latent_channels == 4
    assert tiny_pipeline.text_encoder.config.vocab_size == len(tiny_pipeline.tokenizer)
    assert not any(p.requires_grad for p in tiny_pipeline.text_encoder.parameters())
    assert tiny_pipeline.safety_checker is None


def test_build_pipeline_is_seeded(tmp_path, tiny_pipeline, tiny_config):
    again = tiny_sd.build_pipeline(tmp_path, tiny_config, seed=0)
    other = tiny_sd.build_pipeline(tmp_path / "other", tiny_config, seed=1)
    for name, weight in tiny_pipeline.unet.state_dict().items():
        assert torch.equal(weight, again.unet.state_dict()[name]), name
    assert not all(torch.equal(w, other.unet.state_dict()[n]) for n, w in tiny_pipeline.unet.state_dict().items())


def test_pipeline_makes_32x32_images_by_default(tiny_pipeline):
    prompts = [CAPTIONS[3], CAPTIONS[7], ""]
    generator = torch.Generator().manual_seed(0)
    images = tiny_pipeline(prompt=prompts, num_inference_steps=2, output_type="pt", generator=generator).images
    assert images.shape == (3, 3, 32, 32)
    assert torch.isfinite(images).all()
    assert images.min() >= 0 and images.max() <= 1
