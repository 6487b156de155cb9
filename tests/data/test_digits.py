from collections import Counter

import pytest
import torch

from stepdistill.data import digits


@pytest.fixture(scope="module")
def train() -> digits.DigitsSplit:
    return digits.load_digits("train")


def _sklearn_digits():
    from sklearn.datasets import load_digits

    return load_digits()


def test_split_sizes(train, heldout):
    assert len(train) == 1347
    assert len(heldout) == 450
    assert len(train) + len(heldout) == len(_sklearn_digits().target) == 1797


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_images_and_labels_have_the_documented_shapes_dtypes_and_range(split, train, heldout):
    data = {"train": train, "heldout": heldout}[split]
    n = len(data)
    assert data.images.shape == (n, 3, 32, 32)
    assert data.images.dtype == torch.float32
    assert data.labels.shape == (n,)
    assert data.labels.dtype == torch.int64
    assert data.images.min() >= -1 and data.images.max() <= 1
    assert data.images.min() == -1, "blank background should map to -1"
    assert torch.equal(data.images[:, 0], data.images[:, 1]) and torch.equal(data.images[:, 0], data.images[:, 2])
    assert set(data.labels.tolist()) == set(range(10))
    assert data.prompts[:5] == [digits.prompt_for(int(y)) for y in data.labels[:5]]


def test_split_is_stratified(train, heldout):
    total = Counter(_sklearn_digits().target.tolist())
    held = Counter(heldout.labels.tolist())
    kept = Counter(train.labels.tolist())
    for label in range(10):
        assert held[label] + kept[label] == total[label]
        assert abs(held[label] - 0.25 * total[label]) <= 1, f"digit {label}: {held[label]} of {total[label]} held out"


def test_split_is_deterministic(train, heldout):
    again_train, again_heldout = digits.load_digits("train"), digits.load_digits("heldout")
    assert torch.equal(again_train.images, train.images) and torch.equal(again_train.labels, train.labels)
    assert torch.equal(again_heldout.images, heldout.images) and torch.equal(again_heldout.labels, heldout.labels)


def test_splits_partition_the_dataset(train, heldout):
    """train ∪ heldout is exactly the whole dataset, each image once (genuine duplicates counted as such)."""
    data = _sklearn_digits()
    everything = digits.to_images(torch.from_numpy(data.data))

    def rows(images, labels):
        return Counter((image.numpy().tobytes(), int(y)) for image, y in zip(images, labels))

    whole = rows(everything, data.target)
    assert rows(train.images, train.labels) + rows(heldout.images, heldout.labels) == whole


def test_unknown_split_raises():
    with pytest.raises(ValueError, match="split"):
        digits.load_digits("test")


def test_to_images_maps_ink_range_to_minus_one_one():
    blank, full = torch.zeros(1, 64), torch.full((1, 64), 16)
    images = digits.to_images(torch.cat([blank, full]))
    assert images.shape == (2, 3, 32, 32)
    assert torch.all(images[0] == -1) and torch.all(images[1] == 1)


@pytest.mark.parametrize("label", range(10))
def test_prompt_and_label_round_trip(label):
    prompt = digits.prompt_for(label)
    assert prompt == f"a handwritten digit {digits.DIGIT_NAMES[label]}"
    assert digits.label_of(prompt) == label


def test_label_of_ignores_case_and_whitespace():
    assert digits.label_of("  A Handwritten Digit SEVEN ") == 7


@pytest.mark.parametrize("prompt", ["", "   ", "a photo of a cat", "a handwritten digit 7", "seven cats"])
def test_label_of_non_digit_prompt_is_none(prompt):
    assert digits.label_of(prompt) is None


@pytest.mark.parametrize("label", [-1, 10])
def test_prompt_for_out_of_range_raises(label):
    with pytest.raises(ValueError, match="0..9"):
        digits.prompt_for(label)


def test_evaluation_prompts_cycle_through_the_digits():
    prompts = digits.evaluation_prompts(1000)
    assert len(prompts) == 1000
    assert Counter(digits.label_of(p) for p in prompts) == {label: 100 for label in range(10)}
    assert prompts[:10] == [digits.prompt_for(label) for label in range(10)]
    assert digits.evaluation_prompts(3) == [digits.prompt_for(0), digits.prompt_for(1), digits.prompt_for(2)]


@pytest.mark.parametrize("num_samples", [0, -5])
def test_evaluation_prompts_needs_at_least_one(num_samples):
    with pytest.raises(ValueError, match="num_samples"):
        digits.evaluation_prompts(num_samples)
