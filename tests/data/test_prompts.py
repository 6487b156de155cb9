"""User data read as the recipes read it: prompts files and captioned image folders, and the one-line
errors that name the file (and line) when they cannot be read."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from stepdistill.data.prompts import DataError, read_image_folder, read_prompts


def test_txt_and_jsonl_prompts_skip_blank_lines(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n\n  \n a dog \n")
    assert read_prompts(tmp_path / "p.txt") == ["a cat", "a dog"]
    (tmp_path / "p.jsonl").write_text('{"prompt": "a cat"}\n\n{"text": "a dog", "id": 2}\n')
    assert read_prompts(tmp_path / "p.jsonl") == ["a cat", "a dog"]


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
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError) as error:
        read_prompts(tmp_path / name)
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


def test_image_folder_images_are_centre_cropped_squares_in_the_unit_range(tmp_path):
    images, captions = read_image_folder(write_image_folder(tmp_path / "images"), 16)
    assert images.shape == (2, 3, 16, 16) and captions == ["caption 0", "caption 1"]
    assert images.min() == -1 and images.max() == 1
    assert (images[:, :, :, 8] > 0.9).all() and (images[:, :, :, 0] == -1).all()  # the stripe stays centred


@pytest.mark.parametrize("damage", ["truncated", "not_an_image", "missing"])
def test_an_unreadable_image_is_named(tmp_path, damage):
    folder = write_image_folder(tmp_path / "images")
    picture = folder / "1.png"
    if damage == "truncated":
        picture.write_bytes(picture.read_bytes()[:60])
    elif damage == "not_an_image":
        picture.write_text("not a png")
    else:
        picture.unlink()
    with pytest.raises(DataError, match=f"cannot read the image {picture}"):
        read_image_folder(folder, 16)


def test_a_bad_metadata_line_is_named(tmp_path):
    folder = write_image_folder(tmp_path / "images")
    with (folder / "metadata.jsonl").open("a") as metadata:
        metadata.write('{"file_name": "0.png"}\n')
    with pytest.raises(DataError, match="metadata.jsonl:3 is not a JSON object with 'file_name' and 'text'"):
        read_image_folder(folder, 16)
