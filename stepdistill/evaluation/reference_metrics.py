"""FID and CLIP score, for models whose images are not digits.

Both need weights that cannot be downloaded at run time here, so both take local paths, and
:func:`check_inception_weights` / :func:`check_clip_model` (run by ``evaluate`` before it samples)
fail at once, with what to provide, when they are missing:

* FID (Heusel et al. 2017): the Fréchet distance between the 2048-d Inception-v3 pool features of
  real and generated images. Needs the FID Inception weights file
  (``pt_inception-2015-12-05-6726825d.pth``, the TensorFlow FID network converted to PyTorch, as
  torch-fidelity loads it) and the ``torch-fidelity`` package. Computed by torchmetrics'
  ``FrechetInceptionDistance`` with torch-fidelity's TensorFlow-compatible resize to 299×299
  (``antialias=False``), so it agrees with torch-fidelity's own FID.
* CLIP score (Hessel et al. 2021): the mean over image–prompt pairs of 100 · max(cos(image embedding,
  prompt embedding), 0), the scale torchmetrics uses (Hessel et al. weigh by 2.5). Needs a local CLIP
  model folder (e.g. a download of ``openai/clip-vit-large-patch14``), loaded with transformers'
  ``CLIPModel`` and ``CLIPProcessor``; prompts longer than the text encoder's context are truncated.
  torchmetrics' ``CLIPScore`` is not used: it takes only some hub organisations' model names and
  breaks on transformers 5.
"""

from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path

import torch


class MissingWeightsError(ValueError):
    """A metric's network weights are not on disk; the message says what to provide."""


# The files a CLIP folder needs, each as alternatives (hub downloads and transformers 4 write
# preprocessor_config.json; transformers 5's save_pretrained writes processor_config.json).
_CLIP_FILES = (
    ("config.json",),
    ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json"),
    ("tokenizer.json", "vocab.json"),
    ("preprocessor_config.json", "processor_config.json"),
)


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _to_uint8(images: torch.Tensor) -> torch.Tensor:
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def check_inception_weights(inception_weights: str | Path | None) -> None:
    """Raise :class:`MissingWeightsError` unless FID can run: the weights file and torch-fidelity are there."""
    if inception_weights is None or not Path(inception_weights).is_file():
        raise MissingWeightsError(f"{inception_weights} is not a file: FID needs the FID Inception weights; download "
                                  "pt_inception-2015-12-05-6726825d.pth once and give its path")
    if importlib.util.find_spec("torch_fidelity") is None:
        raise MissingWeightsError("FID needs the torch-fidelity package: pip install torch-fidelity")


def check_clip_model(clip_model: str | Path | None) -> None:
    """Raise :class:`MissingWeightsError` unless ``clip_model`` is a CLIP model folder (reads no weights)."""
    folder = None if clip_model is None else Path(clip_model)
    if folder is None or not folder.is_dir():
        raise MissingWeightsError(f"{clip_model} is not a folder: CLIP score needs a local CLIP model; download e.g. "
                                  "openai/clip-vit-large-patch14 once and give its folder")
    missing = [" or ".join(names) for names in _CLIP_FILES if not any((folder / name).is_file() for name in names)]
    if missing:
        raise MissingWeightsError(f"{clip_model} is not a complete CLIP model folder: it lacks "
                                  f"{'; '.join(missing)} (download all of e.g. openai/clip-vit-large-patch14)")
    try:
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    except (ValueError, AttributeError):
        raise MissingWeightsError(f"{folder / 'config.json'} is not a JSON object: download the CLIP model again") from None
    if model_type != "clip":
        raise MissingWeightsError(f"{clip_model} holds a {model_type!r} model, not a CLIP one; give a CLIP model "
                                  "folder such as a download of openai/clip-vit-large-patch14")


@torch.no_grad()
def fid(
    real_images: torch.Tensor, generated_images: torch.Tensor, inception_weights: str | Path | None,
    batch_size: int = 64,
) -> float:
    """FID between two ``(N, 3, H, W)`` image sets in [-1, 1], ``batch_size`` images through Inception at a time."""
    check_inception_weights(inception_weights)
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(
        feature=2048, feature_extractor_weights_path=str(inception_weights), antialias=False,
    ).to(_device())
    for real, images in ((True, real_images), (False, generated_images)):
        for batch in images.split(batch_size):
            metric.update(_to_uint8(batch).to(metric.device), real=real)
    return float(metric.compute())


@functools.lru_cache(maxsize=1)
def _clip(folder: str):
    """The CLIP model (on the GPU if there is one) and its processor, loaded once per folder."""
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(folder, local_files_only=True).to(_device()).eval()
    return model, CLIPProcessor.from_pretrained(folder, local_files_only=True)


@torch.no_grad()
def clip_score(images: torch.Tensor, prompts: list[str], clip_model: str | Path | None, batch_size: int = 64) -> float:
    """Mean CLIP score, 100 · max(cos, 0), of ``(N, 3, H, W)`` images in [-1, 1] against their N prompts."""
    check_clip_model(clip_model)
    if len(images) != len(prompts):
        raise ValueError(f"need one prompt per image, got {len(images)} images and {len(prompts)} prompts")
    model, processor = _clip(str(Path(clip_model).resolve()))
    device = model.device
    scores = []
    for start in range(0, len(images), batch_size):
        inputs = processor(
            text=prompts[start : start + batch_size], images=list(_to_uint8(images[start : start + batch_size])),
            return_tensors="pt", padding=True, truncation=True,
        )
        output = model(**inputs.to(device))
        cosine = (output.image_embeds * output.text_embeds).sum(-1)  # both embeddings come out unit-length
        scores.append(100 * cosine.clamp(min=0))
    return float(torch.cat(scores).mean())
