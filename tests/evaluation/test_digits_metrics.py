"""The offline digits metrics on the shipped classifier (skipped until it has been trained)."""

import math

import pytest
import torch

from stepdistill.data import digits
from stepdistill.evaluation.classifier import FEATURE_DIM, DigitClassifier


@pytest.fixture(scope="module")
def noise_images() -> torch.Tensor:
    return torch.rand(450, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1


@pytest.fixture(scope="module")
def noise_fd(digits_evaluator, noise_images) -> float:
    return digits_evaluator.fd(noise_images)


def test_reference_features_are_the_heldout_split(digits_evaluator, heldout):
    assert digits_evaluator.reference_features.shape == (450, FEATURE_DIM)
    assert torch.isfinite(digits_evaluator.reference_features).all()


def test_heldout_against_itself_is_zero(digits_evaluator, heldout):
    assert abs(digits_evaluator.fd(heldout.images)) < 1e-6


def test_noise_is_far_from_the_real_floor(digits_evaluator, noise_fd):
    floor = digits_evaluator.real_floor(450)
    assert math.isfinite(floor) and floor > 0
    assert noise_fd > 10 * floor, f"noise FD {noise_fd:.3f} vs real-vs-real floor {floor:.3f} at 450 samples"


def test_real_floor_at_full_train_size(digits_evaluator, noise_fd):
    floor = digits_evaluator.real_floor(1347)
    assert math.isfinite(floor) and floor > 0
    assert floor < noise_fd / 10


def test_real_digits_are_recognised(digits_evaluator, heldout):
    accuracy = digits_evaluator.prompt_accuracy(heldout.images, heldout.prompts)
    assert accuracy >= 0.95


def test_wrong_prompts_lower_accuracy(digits_evaluator, heldout):
    images = heldout.images[:100]
    shifted = [digits.prompt_for((int(y) + 1) % 10) for y in heldout.labels[:100]]
    right = digits_evaluator.prompt_accuracy(images, heldout.prompts[:100])
    wrong = digits_evaluator.prompt_accuracy(images, shifted)
    assert wrong < right - 0.5


def test_evaluate_returns_both_metrics(digits_evaluator, heldout):
    scores = digits_evaluator.evaluate(heldout.images[:50], heldout.prompts[:50])
    assert set(scores) == {"fd_digits", "prompt_accuracy"}
    assert math.isfinite(scores["fd_digits"]) and scores["fd_digits"] > 0
    assert 0 <= scores["prompt_accuracy"] <= 1


def test_features_do_not_depend_on_batching(digits_evaluator, heldout, shipped_classifier):
    from stepdistill.evaluation.digits_metrics import DigitsEvaluator

    images = heldout.images[:30]
    small_batches = DigitsEvaluator.__new__(DigitsEvaluator)
    small_batches.classifier, small_batches.batch_size = digits_evaluator.classifier, 7
    torch.testing.assert_close(small_batches.features(images), digits_evaluator.features(images), rtol=1e-4, atol=1e-5)


def test_train_copy_share_of_real_digits(digits_evaluator, heldout):
    from stepdistill.evaluation.digits_metrics import COPY_QUANTILE

    train = digits.load_digits("train")
    # the train images are their own nearest neighbours (distance 0): all of them count as copies
    assert digits_evaluator.train_copy_share(train.images[:200]) == 1.0
    # the threshold is the held-out split's own quantile: unseen digits score the quantile (±1 image)
    assert abs(digits_evaluator.train_copy_share(heldout.images) - COPY_QUANTILE) <= 1 / len(heldout)


def test_train_copy_share_of_noise_is_zero(digits_evaluator, noise_images):
    assert digits_evaluator.train_copy_share(noise_images) == 0.0


def test_evaluate_rejects_other_image_sizes(digits_evaluator):
    images = torch.zeros(4, 3, 16, 16)
    with pytest.raises(ValueError, match="32×32"):
        digits_evaluator.evaluate(images, digits.evaluation_prompts(4))


def test_prompt_accuracy_needs_digit_prompts(digits_evaluator, heldout):
    prompts = heldout.prompts[:4]
    prompts[2] = "a photo of a cat"
    with pytest.raises(ValueError, match="digit prompts"):
        digits_evaluator.prompt_accuracy(heldout.images[:4], prompts)


def test_classifier_load_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_teacher"):
        DigitClassifier.load(tmp_path / "missing.safetensors")


def test_classifier_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    classifier = DigitClassifier().eval()
    classifier.save(tmp_path / "classifier.safetensors")
    loaded = DigitClassifier.load(tmp_path / "classifier.safetensors")
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(loaded(images), classifier(images))
    assert loaded.features(images).shape == (2, FEATURE_DIM)
    assert not any(p.requires_grad for p in loaded.parameters())
    with pytest.raises(ValueError, match=r"\(N, 3, 32, 32\)"):
        loaded.features(torch.zeros(2, 1, 32, 32))
