import time

import pytest
import torch

from stepdistill.evaluation.reference_metrics import MissingWeightsError, clip_score, fid

IMAGES = torch.zeros(2, 3, 32, 32)
PROMPTS = ["a cat", "a dog"]


@pytest.mark.parametrize("weights", [None, "no/such/pt_inception.pth"])
def test_fid_without_weights_says_which_flag(tmp_path, weights):
    weights = None if weights is None else tmp_path / weights
    began = time.perf_counter()
    with pytest.raises(MissingWeightsError, match="--inception_weights"):
        fid(IMAGES, IMAGES, inception_weights=weights)
    assert time.perf_counter() - began < 5


def test_fid_with_a_folder_as_weights(tmp_path):
    with pytest.raises(MissingWeightsError, match="--inception_weights"):
        fid(IMAGES, IMAGES, inception_weights=tmp_path)


@pytest.mark.parametrize("folder", [None, "empty", "missing"])
def test_clip_score_without_model_says_which_flag(tmp_path, folder):
    if folder == "empty":
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "tokenizer.json").write_text("{}")
    clip_model = None if folder is None else tmp_path / folder
    began = time.perf_counter()
    with pytest.raises(MissingWeightsError, match="--clip_model") as error:
        clip_score(IMAGES, PROMPTS, clip_model=clip_model)
    assert "config.json" in str(error.value)
    assert time.perf_counter() - began < 5
