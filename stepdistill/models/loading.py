"""Loading a diffusers text-to-image pipeline, with errors that say what to do.

The same function serves the shipped digits teacher (a local folder) and hub models such as
``stable-diffusion-v1-5/stable-diffusion-v1-5``; only where the files come from differs.
"""

from __future__ import annotations

import logging
from pathlib import Path

import huggingface_hub
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import logging as diffusers_logging
from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError
from transformers.utils import logging as transformers_logging

from stepdistill.models.repeated_context import collapse_repeated_context


class PipelineError(ValueError):
    """A pipeline path or id that cannot be used; the message says what to provide."""


# What the text side logs for an over-long prompt: diffusers' pipelines quote the cut text (megabytes
# for a runaway line), and a tokenizer warns of the full length.
TRUNCATION_WARNINGS = ("The following part of your input was truncated",
                       "Token indices sequence length is longer than the specified maximum")


class _TruncationNotice(logging.Filter):
    """Lets the run's first truncation warning through as one short line and drops the others."""

    def __init__(self) -> None:
        super().__init__()
        self.shown = False

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.getMessage().startswith(TRUNCATION_WARNINGS):
            return True
        if self.shown:
            return False
        self.shown = True
        record.msg, record.args = ("some prompts are longer than the text encoder takes: they are cut to fit, as the "
                                   "pipeline does (said once per run)"), ()
        return True


TRUNCATION_NOTICE = _TruncationNotice()  # on every loaded pipeline's text side


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def require_pipeline_location(name_or_path: str | Path, revision: str | None = None) -> None:
    """Refuse what cannot be a pipeline before anything is read: a missing path that is no hub id, a
    folder without ``model_index.json``, or a hub id that is neither in the local cache nor reachable."""
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
    else:
        _require_hub_model(name, revision)


def _require_hub_model(repo_id: str, revision: str | None) -> None:
    """A hub model must be in the local cache or on a reachable hub; otherwise say how to get it."""
    if isinstance(huggingface_hub.try_to_load_from_cache(repo_id, "model_index.json", revision=revision), str):
        return  # (not a str: absent, or cached as known to be missing)
    download = (f"download it where there is network (`hf download {repo_id}`) and pass its folder, or point "
                "HF_HOME at a cache that holds it")
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        raise PipelineError(f"{repo_id} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set: {download}")
    try:
        huggingface_hub.model_info(repo_id, revision=revision, timeout=10)
    except (RepositoryNotFoundError, RevisionNotFoundError):
        raise PipelineError(f"no model {repo_id}" + (f" at revision {revision}" if revision else "") + " on the Hugging "
                            "Face Hub (a private or gated one needs `hf auth login`)") from None
    except Exception as error:  # whatever the HTTP client raises when the hub cannot be reached
        raise PipelineError(f"{repo_id} is not in the local Hugging Face cache and the hub cannot be reached "
                            f"({type(error).__name__}: offline?): {download}") from None


def load_pipeline(
    name_or_path: str | Path,
    revision: str | None = None,
    variant: str | None = None,
    torch_dtype: torch.dtype | None = None,
) -> DiffusionPipeline:
    """Load a text-to-image pipeline (it must have a text encoder and a UNet or transformer); over-long
    prompts it is given are cut with one notice per run (:data:`TRUNCATION_NOTICE`), not one each. An
    SD3 transformer computes the run of zero tokens standing in for a missing T5 once, which changes
    its output only by float rounding (:mod:`stepdistill.models.repeated_context`)."""
    name = str(name_or_path)
    require_pipeline_location(name, revision)
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
    collapse_repeated_context(components.get("transformer"))  # exact; SD3 without T5 pays for 1 zero token, not 256
    pipe.set_progress_bar_config(disable=True)
    for source in (type(pipe).__module__, "transformers.tokenization_utils_base"):
        logging.getLogger(source).addFilter(TRUNCATION_NOTICE)  # adding it twice keeps one
    return pipe

