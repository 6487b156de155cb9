"""User data read as the recipes read it: prompts files and captioned image folders, and the one-line
errors that name the file (and line) when they cannot be read."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

import torch

from stepdistill.data.loader import TrainingExamples, collate
from stepdistill.data.prompts import DataError, read_prompts
from stepdistill.data.sources import ImageFolder, PromptsFile


def test_txt_and_jsonl_prompts_skip_blank_lines(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n\n  \n a dog \n")
    (tmp_path / "p.jsonl").write_text('{"prompt": "a cat"}\n\n{"text": "a dog", "id": 2}\n')
    for name in ("p.txt", "p.jsonl"):
        assert read_prompts(tmp_path / name) == ["a cat", "a dog"]
        lazily = PromptsFile(tmp_path / name)
        assert [lazily[index].caption for index in range(len(lazily))] == ["a cat", "a dog"]


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("empty.txt", b"", "empty.txt holds no prompts (it is empty or only blank lines)"),
        ("blank.txt", b"\n  \n\t\n", "blank.txt holds no prompts"),
        ("latin1.txt", "a cat\nun caf\xe9\n".encode("latin-1"), "latin1.txt:2 is not UTF-8 text (byte 0xe9)"),
        ("image.txt", b"\x89PNG\r\n\x1a\n\x00\x00", "image.txt:1 is not UTF-8 text (byte 0x89)"),
        ("nul.txt", b"a cat\na\x00b\n", "nul.txt:2 holds a NUL byte"),
        ("bad.jsonl", b'{"prompt": "a cat"}\n{prompt: dog}\n', "bad.jsonl:2 is not a JSON object"),
        ("field.jsonl", b'{"caption": "a cat"}\n', "field.jsonl:1 has no 'prompt' or 'text' string field"),
        ("list.jsonl", b'["a cat"]\n', "list.jsonl:1 has no 'prompt' or 'text'"),
    ],
)
def test_unreadable_prompts_files_are_named_with_the_line(tmp_path, name, content, message):
    """Read whole (evaluation prompts) or lazily (training): the same one-line error, naming the line."""
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError) as error:
        read_prompts(tmp_path / name)
    assert message in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(DataError) as error:
        prompts = PromptsFile(tmp_path / name)
        [prompts[index] for index in range(len(prompts))]
    assert message in str(error.value) and "\n" not in str(error.value)


def write_image_folder(folder, sizes=((40, 24), (24, 24))):
    folder.mkdir()
    rows = []
    for index, (width, height) in enumerate(sizes):
        pixels = np.zeros((height, width, 3), np.uint8)
        pixels[:, width // 2 - 4 : width // 2 + 4] = 255  # a white centre stripe, kept by the centre crop
        Image.fromarray(pixels).save(folder / f"{index}.png")
        rows.append(json.dumps({"file_name": f"{index}.png", "text": f"caption {index}"}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return folder


def read_all(folder, size: int, **options) -> dict:
    examples = TrainingExamples(ImageFolder(folder), size, **options)
    return collate([examples[(index, index)] for index in range(len(examples))])


def test_image_folder_images_are_centre_cropped_squares_in_the_unit_range(tmp_path):
    batch = read_all(write_image_folder(tmp_path / "images"), 16)
    images = batch["images"]
    assert images.shape == (2, 3, 16, 16) and batch["captions"] == ["caption 0", "caption 1"]
    assert images.min() == -1 and images.max() == 1
    assert (images[:, :, :, 8] > 0.9).all() and (images[:, :, :, 0] == -1).all()  # the stripe stays centred


def test_random_crops_and_flips_depend_on_the_place_only(tmp_path):
    folder = write_image_folder(tmp_path / "images", sizes=((64, 16),))
    examples = TrainingExamples(ImageFolder(folder), 16, center_crop=False, random_flip=True, seed=3)
    crops = [examples[(0, place)]["pixels"] for place in range(8)]
    assert torch.equal(crops[5], examples[(0, 5)]["pixels"])  # the same place, the same crop
    assert len({tuple(crop[0, 0].tolist()) for crop in crops}) > 1  # other places, other squares


@pytest.mark.parametrize("damage", ["truncated", "not_an_image", "missing"])
def test_an_unreadable_image_stops_or_is_skipped_by_name(tmp_path, damage):
    folder = write_image_folder(tmp_path / "images")
    picture = folder / "1.png"
    if damage == "truncated":
        picture.write_bytes(picture.read_bytes()[:60])
    elif damage == "not_an_image":
        picture.write_text("not a png")
    else:
        picture.unlink()
    with pytest.raises(DataError, match=f"cannot read the image {picture}.*--on_bad_image skip"):
        read_all(folder, 16)
    batch = read_all(folder, 16, on_bad_image="skip")
    assert batch["captions"] == ["caption 0"] and batch["images"].shape == (1, 3, 16, 16)
    assert len(batch["skipped"]) == 1 and f"cannot read the image {picture}" in batch["skipped"][0]


def test_a_bad_metadata_line_is_named(tmp_path):
    folder = write_image_folder(tmp_path / "images")
    with (folder / "metadata.jsonl").open("a") as metadata:
        metadata.write('{"file_name": "0.png"}\n')
    with pytest.raises(DataError, match="metadata.jsonl:3 is not a JSON object with 'file_name' and 'text'"):
        ImageFolder(folder)[2]
