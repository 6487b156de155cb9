"""Shared fixtures: a tiny seeded SD pipeline folder and the digits evaluator, each built once per session."""

from __future__ import annotations

import os

# Tests never reach the hub: anything that would download fails at once instead of retrying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from stepdistill.assets import DIGITS_CLASSIFIER  # noqa: E402
from stepdistill.data import digits  # noqa: E402
from stepdistill.models import tiny_sd  # noqa: E402

# The test models are tiny and gain nothing from intra-op threads, while oversubscribed threads on a
# busy 2-core machine slow them ~10×. An explicit OMP_NUM_THREADS wins.
if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(1)


@pytest.fixture
def fresh_accelerator_state():
    """accelerate keeps one process-wide state whose mixed precision cannot change once set: a test
    that runs another precision starts from a clean state and leaves one behind."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="session")
def tiny_config() -> tiny_sd.TinySDConfig:
    """Two-level UNet and VAE: 32×32 images ↔ 16×16×4 latents, a 16-d text encoder."""
    return tiny_sd.TinySDConfig(unet_channels=(8, 16), vae_channels=(8, 8), text_hidden_size=16)


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory, tiny_config):
    """A random-weight (seed 0) ``StableDiffusionPipeline``, also saved to ``tiny_pipeline.folder``."""
    folder = tmp_path_factory.mktemp("tiny_sd")
    pipe = tiny_sd.build_pipeline(folder, tiny_config, seed=0)
    pipe.save_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    pipe.folder = folder
    return pipe


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tiny_pipeline):
    """The folder the tiny pipeline was saved to (has ``model_index.json``)."""
    return tiny_pipeline.folder


@pytest.fixture(scope="session")
def heldout() -> digits.DigitsSplit:
    return digits.load_digits("heldout")


@pytest.fixture(scope="session")
def shipped_classifier():
    """The shipped classifier's path; tests that need it skip when it has not been trained yet."""
    if not DIGITS_CLASSIFIER.is_file():
        pytest.skip(f"no shipped digit classifier at {DIGITS_CLASSIFIER}; run recipes/train_teacher.py")
    return DIGITS_CLASSIFIER


@pytest.fixture(scope="session")
def digits_evaluator(shipped_classifier):
    """``DigitsEvaluator`` on the shipped classifier (it computes the held-out features once)."""
    from stepdistill.evaluation.digits_metrics import DigitsEvaluator

    return DigitsEvaluator()


BACKBONES = ("sd_v", "sdxl", "sd3", "flux")  # beside the ε SD pipeline above: every adapter and both processes


@pytest.fixture(scope="session")
def backbone_dirs(tmp_path_factory, tiny_config) -> dict[str, object]:
    """Saved tiny random-weight pipelines of every backbone family, by name: ``sd`` (ε), ``sd_v``
    (v-prediction), ``sdxl``, ``sd3`` (saved without its T5 encoder) and ``flux`` (with a guidance input)."""
    from diffusers import DDIMScheduler

    from stepdistill.models import tiny_pipelines

    folders = {name: tmp_path_factory.mktemp(name) for name in ("sd", *BACKBONES)}
    tiny_sd.build_pipeline(folders["sd"], tiny_config, seed=0).save_pretrained(folders["sd"])
    v_pipe = tiny_sd.build_pipeline(folders["sd_v"], tiny_config, seed=1)
    v_pipe.scheduler = DDIMScheduler.from_config(v_pipe.scheduler.config, prediction_type="v_prediction")
    v_pipe.save_pretrained(folders["sd_v"])
    tiny_pipelines.build_sdxl(folders["sdxl"], seed=0)
    tiny_pipelines.build_sd3(folders["sd3"], seed=0, with_t5=False)
    tiny_pipelines.build_flux(folders["flux"], seed=0, guidance_embeds=True)
    return folders
