"""FID and CLIP score through torchmetrics, for models whose images are not digits.

Both need weights that cannot be downloaded at run time here, so both take local paths and fail
at once, with what to provide, when they are missing:

* FID (Heusel et al. 2017): the FID Inception weights file (``pt_inception-2015-12-05-6726825d.pth``)
  and the ``torch-fidelity`` package, through ``torchmetrics.image.fid.FrechetInceptionDistance``.
* CLIP score (Hessel et al. 2021): a local CLIP model folder (e.g. a download of
  ``openai/clip-vit-large-patch14``), through ``torchmetrics.multimodal.CLIPScore``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch


class MissingWeightsError(RuntimeError):
    """A metric's network weights are not on disk; the message says what to provide."""


def _to_uint8(images: torch.Tensor) -> torch.Tensor:
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def fid(real_images: torch.Tensor, generated_images: torch.Tensor, inception_weights: str | Path | None) -> float:
    """FID between two ``(N, 3, H, W)`` image sets in [-1, 1]."""
    if inception_weights is None or not Path(inception_weights).is_file():
        raise MissingWeightsError(
            f"FID needs the FID Inception weights on disk (got {inception_weights!r}): download "
            "pt_inception-2015-12-05-6726825d.pth once and pass its path with --inception_weights"
        )
    if importlib.util.find_spec("torch_fidelity") is None:
        raise MissingWeightsError("FID needs the torch-fidelity package: pip install torch-fidelity")
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(inception_weights))
    metric.update(_to_uint8(real_images), real=True)
    metric.update(_to_uint8(generated_images), real=False)
    return float(metric.compute())


def clip_score(images: torch.Tensor, prompts: list[str], clip_model: str | Path | None) -> float:
    """Mean CLIP score (100 · cosine similarity, clipped at 0) of images against their prompts."""
    if clip_model is None or not (Path(clip_model) / "config.json").is_file():
        raise MissingWeightsError(
            f"CLIP score needs a local CLIP model folder with config.json (got {clip_model!r}): download e.g. "
            "openai/clip-vit-large-patch14 once and pass its folder with --clip_model"
        )
    from torchmetrics.multimodal.clip_score import CLIPScore

    metric = CLIPScore(model_name_or_path=str(clip_model))
    metric.update(_to_uint8(images), prompts)
    return float(metric.compute())
