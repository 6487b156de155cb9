"""Loading a diffusers text-to-image pipeline, with errors that say what to do.

The same function serves the shipped digits teacher (a local folder) and hub models such as
``stable-diffusion-v1-5/stable-diffusion-v1-5``; only where the files come from differs.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from diffusers.utils import logging as diffusers_logging
from transformers.utils import logging as transformers_logging


class PipelineError(ValueError):
    """A pipeline path or id that cannot be used; the message says what to provide."""


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def require_pipeline_location(name_or_path: str | Path) -> None:
    """Refuse what cannot be a pipeline before anything is read: a missing path that is no hub id, or
    a folder without ``model_index.json``."""
    name = str(name_or_path)
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise PipelineError(
                f"{path} is not a diffusers pipeline folder (no model_index.json); "
                "give a folder written by `pipe.save_pretrained(...)` or a hub id"
            )
    elif not _looks_like_hub_id(name):
        raise PipelineError(f"no pipeline at {name}: the path does not exist and is not a hub id like 'owner/model'")


def load_pipeline(
    name_or_path: str | Path,
    revision: str | None = None,
    variant: str | None = None,
    torch_dtype: torch.dtype | None = None,
) -> DiffusionPipeline:
    """Load a text-to-image pipeline (it must have a text encoder and a UNet or transformer)."""
    name = str(name_or_path)
    require_pipeline_location(name)
    if Path(name).expanduser().exists():
        diffusers_logging.disable_progress_bar()  # local folders load in a blink: no bars
        transformers_logging.disable_progress_bar()
    try:
        index = DiffusionPipeline.load_config(name, revision=revision)
        # parts saved as absent ([null, null], e.g. SD3 without its T5 encoder) load as None
        extra = {part: None for part, entry in index.items()
                 if part == "safety_checker" or (isinstance(entry, list) and entry[0] is None)}
        pipe = DiffusionPipeline.from_pretrained(name, revision=revision, variant=variant, torch_dtype=torch_dtype, **extra)
    except (OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise PipelineError(
            f"could not load the pipeline {name!r}: {first_line}. Without network access, give a local folder "
            "(e.g. one downloaded earlier with `hf download`)."
        ) from error
    components = pipe.components
    has_text_encoder = any(components.get(k) is not None for k in ("text_encoder", "text_encoder_2"))
    if not has_text_encoder or not any(components.get(k) is not None for k in ("unet", "transformer")):
        raise PipelineError(
            f"{name} holds a {type(pipe).__name__}, which is not a text-to-image pipeline "
            "(it needs a text encoder and a UNet or transformer)"
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe

