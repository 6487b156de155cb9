"""FID and CLIP score end to end on random-weight networks saved as the real ones come, against references
computed another way; only the real weights themselves stay untested."""

import json
import time

import pytest
import torch
from PIL import Image
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

from stepdistill.assets import DIGITS_TEACHER
from stepdistill.evaluation.reference_metrics import MissingWeightsError, check_clip_model, clip_score, fid

IMAGES = torch.zeros(2, 3, 32, 32)
PROMPTS = ["a cat", "a dog"]


def _images(seed: int, n: int, size: int, brightest: int = 255) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random uint8 images and the same images as floats in [-1, 1] (they convert back exactly)."""
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, brightest + 1, (n, 3, size, size), generator=generator, dtype=torch.uint8)
    return pixels, pixels.float() / 127.5 - 1


class _RandomInception(FeatureExtractorInceptionV3):
    """torch-fidelity's FID Inception that keeps its random initialisation instead of loading weights."""

    def load_state_dict(self, state_dict, strict=True, assign=False):
        return None


@pytest.fixture(scope="module")
def random_inception_weights(tmp_path_factory):
    """A weights file in the format of pt_inception-2015-12-05-6726825d.pth (torch-fidelity's Inception state
    dict, saved with ``torch.save``), with He-initialised random convolutions."""
    folder = tmp_path_factory.mktemp("inception")
    torch.save({}, folder / "empty.pth")
    torch.manual_seed(0)
    network = _RandomInception("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(folder / "empty.pth"))
    for parameter in network.parameters():
        if parameter.ndim == 4:
            torch.nn.init.kaiming_normal_(parameter, nonlinearity="relu")
    torch.save(network.state_dict(), folder / "pt_inception-random.pth")
    return folder / "pt_inception-random.pth"


@pytest.mark.slow
def test_fid_matches_torch_fidelity(random_inception_weights):
    """Against torch-fidelity's own extractor and Fréchet distance (the TTUR code) on the same file."""
    real_pixels, real = _images(0, 6, 32)
    generated_pixels, generated = _images(1, 6, 48, brightest=127)  # darker, and another size

    extractor = FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(random_inception_weights))
    with torch.no_grad():
        real_stats, generated_stats = (fid_features_to_statistics(extractor(p)[0])
                                       for p in (real_pixels, generated_pixels))
    expected = fid_statistics_to_metric(real_stats, generated_stats, verbose=False)["frechet_inception_distance"]

    assert expected > 1  # the random network tells the sets apart, so the comparison means something
    assert fid(real, generated, random_inception_weights, batch_size=4) == pytest.approx(expected, rel=1e-5)
    assert fid(real[:3], real[:3].flip(0), random_inception_weights) == pytest.approx(0, abs=1e-4)


@pytest.mark.parametrize("weights", [None, "no/such/pt_inception.pth"])
def test_fid_without_weights_says_what_to_download(tmp_path, weights):
    weights = None if weights is None else tmp_path / weights
    began = time.perf_counter()
    with pytest.raises(MissingWeightsError, match="is not a file: FID needs the FID Inception weights"):
        fid(IMAGES, IMAGES, inception_weights=weights)
    assert time.perf_counter() - began < 5


def test_fid_with_a_folder_as_weights(tmp_path):
    with pytest.raises(MissingWeightsError, match="download pt_inception-2015-12-05-6726825d.pth"):
        fid(IMAGES, IMAGES, inception_weights=tmp_path)


def test_fid_without_torch_fidelity_says_what_to_install(tmp_path, monkeypatch):
    weights = tmp_path / "pt_inception.pth"
    weights.write_bytes(b"")
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *args: None)
    with pytest.raises(MissingWeightsError, match="pip install torch-fidelity"):
        fid(IMAGES, IMAGES, inception_weights=weights)


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    """A random 2-layer ``CLIPModel`` (32×32 images, the shipped 16-token tokenizer) saved with its processor."""
    tokenizer = CLIPTokenizer.from_pretrained(DIGITS_TEACHER / "tokenizer")
    layers = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2}
    text_config = {
        **layers, "vocab_size": len(tokenizer), "max_position_embeddings": tokenizer.model_max_length,
        "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
    }
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=text_config, vision_config={**layers, "image_size": 32, "patch_size": 8},
                                 projection_dim=8))
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    folder = tmp_path_factory.mktemp("clip")
    model.save_pretrained(folder)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def test_clip_score_matches_the_model_s_own_embeddings(tiny_clip_dir):
    """Against ``get_image_features`` / ``get_text_features`` on PIL images and max-length padded prompts,
    with the clip at 0 per pair (some pairs here have negative cosines)."""
    pixels, images = _images(0, 6, 48)  # resized to 32 by the processor
    prompts = ["a handwritten digit seven", "a photo of a cat", "a handwritten digit one " * 6,  # past 16 tokens
               "seven", "a handwritten digit two", "a digit"]

    model = CLIPModel.from_pretrained(tiny_clip_dir)
    pixel_values = CLIPImageProcessor.from_pretrained(tiny_clip_dir)(
        [Image.fromarray(p.permute(1, 2, 0).numpy()) for p in pixels], return_tensors="pt").pixel_values
    tokens = CLIPTokenizer.from_pretrained(tiny_clip_dir)(prompts, padding="max_length", truncation=True, return_tensors="pt")
    with torch.no_grad():
        image_embeddings = model.get_image_features(pixel_values=pixel_values).pooler_output
        text_embeddings = model.get_text_features(**tokens).pooler_output
    cosine = torch.nn.functional.cosine_similarity(image_embeddings, text_embeddings)
    assert (cosine < 0).any() and (cosine > 0).any()

    expected = float((100 * cosine.clamp(min=0)).mean())
    assert clip_score(images, prompts, tiny_clip_dir, batch_size=4) == pytest.approx(expected, rel=1e-5)


def test_clip_score_needs_a_prompt_per_image(tiny_clip_dir):
    with pytest.raises(ValueError, match="one prompt per image"):
        clip_score(IMAGES, PROMPTS[:1], tiny_clip_dir)


@pytest.mark.parametrize("folder", [None, "missing", "empty", "no_tokenizer"])
def test_clip_score_without_model_says_what_to_download(tmp_path, tiny_clip_dir, folder):
    if folder == "empty":
        (tmp_path / "empty").mkdir()
    if folder == "no_tokenizer":  # transformers 5 would load it with an empty vocabulary and score nonsense
        (tmp_path / folder).mkdir()
        for name in ("config.json", "model.safetensors", "processor_config.json"):
            (tmp_path / folder / name).write_bytes((tiny_clip_dir / name).read_bytes())
    clip_model = None if folder is None else tmp_path / folder
    began = time.perf_counter()
    with pytest.raises(MissingWeightsError, match="openai/clip-vit-large-patch14") as error:
        clip_score(IMAGES, PROMPTS, clip_model=clip_model)
    expected = {"empty": "lacks config.json;", "no_tokenizer": "lacks tokenizer.json or vocab.json ("}
    assert expected.get(folder, "is not a folder") in str(error.value)
    assert time.perf_counter() - began < 5


def test_a_non_clip_model_folder_is_refused(tmp_path, tiny_clip_dir):
    for name in ("model.safetensors", "processor_config.json", "tokenizer.json"):
        (tmp_path / name).write_bytes((tiny_clip_dir / name).read_bytes())
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "siglip"}))
    with pytest.raises(MissingWeightsError, match="holds a 'siglip' model, not a CLIP one"):
        check_clip_model(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(MissingWeightsError, match="config.json is not a JSON object"):
        check_clip_model(tmp_path)
