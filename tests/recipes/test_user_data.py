"""The non-digits data path end to end, at sizes other than the digits' 32 px: ``--prompts_file`` on a teacher
whose own size is 48 px, and ``--train_data_dir`` (diffusers' ImageFolder layout: images and a
``metadata.jsonl`` of ``file_name`` and ``text``) at ``--resolution 64``, both streamed and encoded batch by
batch. Each trains two steps, and its export loads in plain diffusers and samples, by default, at the size it
was trained at."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from stepdistill import export
from stepdistill.evaluation.sampling import generate
from stepdistill.methods.fake_score import FakeScoreDistillation
from stepdistill.models import tiny_sd
from stepdistill.models.loading import load_pipeline
from stepdistill.models.teacher import Teacher

CAPTIONS = ["a red circle", "a blue square", "a handwritten digit three"]
COMMON = dict(max_train_steps=2, train_batch_size=2, validation_steps=0, eval_num_samples=0, report_to="none",
              num_threads=1)


@pytest.fixture(scope="module")
def teacher_48(tmp_path_factory, tiny_config):
    """The tiny SD pipeline built for 48 px images (24×24 latents): its own default size is not 32."""
    folder = tmp_path_factory.mktemp("sd48")
    tiny_sd.build_pipeline(folder, dataclasses.replace(tiny_config, image_size=48), seed=0).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """Three captioned pictures of three other sizes, none square, in diffusers' ImageFolder layout."""
    folder = tmp_path_factory.mktemp("images")
    generator = np.random.default_rng(0)
    with open(folder / "metadata.jsonl", "w") as metadata:
        for i, (caption, (width, height)) in enumerate(zip(CAPTIONS, [(80, 48), (40, 72), (100, 90)])):
            Image.fromarray(generator.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(folder / f"{i}.png")
            metadata.write(json.dumps({"file_name": f"{i}.png", "text": caption}) + "\n")
    return folder


def record_calls(monkeypatch, owner, name: str) -> list:
    """Replace ``owner.name`` by a wrapper that keeps each call's first argument (after ``self``) and its result."""
    original, calls = getattr(owner, name), []

    def recorded(self, first, *args, **kwargs):
        result = original(self, first, *args, **kwargs)
        calls.append((first, result))
        return result

    monkeypatch.setattr(owner, name, recorded)
    return calls


def assert_trained_and_finite(student_dir, teacher_dir) -> None:
    student = load_pipeline(student_dir).unet.state_dict()
    teacher = load_pipeline(teacher_dir).unet.state_dict()
    assert all(torch.isfinite(weight).all() for weight in student.values())
    changed = sum(not torch.equal(weight, teacher[name]) for name, weight in student.items())
    assert changed > len(student) // 2, f"only {changed} of {len(student)} student tensors moved"


def test_a_prompts_file_trains_at_the_teachers_own_size(dmd2, teacher_48, tmp_path, monkeypatch):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a red circle"}\n\n{"text": "a blue square", "id": 2}\n')
    encoded = record_calls(monkeypatch, Teacher, "encode_prompts")
    generated = record_calls(monkeypatch, FakeScoreDistillation, "generate")
    dmd2.main(dmd2.DMD2Config(pretrained_model_name_or_path=str(teacher_48), output_dir=str(tmp_path), **COMMON,
                              prompts_file=str(prompts), gan_generator_weight=0.0, gan_critic_weight=0.0,
                              critic_steps_per_generator_step=1))
    assert sorted(encoded[0][0]) == ["a blue square", "a red circle"]  # the batches' conditions are the file's prompts
    assert {tuple(x.shape[1:]) for _, (x, _) in generated} == {(4, 24, 24)}  # students sampled 48 px latents
    assert_trained_and_finite(tmp_path / "student", teacher_48)
    pipe, guidance_scale = export.load_student(tmp_path / "student")
    pipe.set_progress_bar_config(disable=True)
    images, _ = generate(pipe, CAPTIONS[:2], 1, guidance_scale)  # plain diffusers at the pipeline's own size
    assert images.shape == (2, 3, 48, 48) and torch.isfinite(images).all()


@pytest.mark.parametrize("name", ["dmd2", "consistency"])
def test_an_image_folder_trains_at_the_resolution_flag(request, name, tiny_pipeline_dir, image_folder, tmp_path,
                                                       monkeypatch):
    recipe = request.getfixturevalue(name)
    images = record_calls(monkeypatch, Teacher, "encode_images")
    encoded = record_calls(monkeypatch, Teacher, "encode_prompts")
    common = dict(pretrained_model_name_or_path=str(tiny_pipeline_dir), output_dir=str(tmp_path), **COMMON,
                  train_data_dir=str(image_folder), resolution=64)
    if name == "dmd2":  # the GAN term trains on the folder's images
        cfg = recipe.DMD2Config(**common, critic_steps_per_generator_step=1)
    else:
        cfg = recipe.ConsistencyConfig(**common, use_lora=False, num_student_steps=2)
    recipe.main(cfg)
    for pictures, latents in images:  # encoded batch by batch, each picture centre-cropped and resized to --resolution
        assert pictures.shape == (2, 3, 64, 64) and latents.shape == (2, 4, 32, 32)
    assert set(encoded[0][0] + encoded[1][0]) == set(CAPTIONS)  # the first epoch (3 examples, batches of 2): every caption
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == [1, 2]
    if name == "dmd2":
        assert all(np.isfinite(row["critic/gan_critic"]) for row in log)
    assert_trained_and_finite(tmp_path / "student", tiny_pipeline_dir)
    pipe, described = export.load_any(tmp_path / "student")
    assert described["student_resolution"] == 64  # recorded, for `evaluate` to sample at
    pipe.set_progress_bar_config(disable=True)
    sampled, _ = generate(pipe, CAPTIONS[:2], cfg.num_student_steps, described["student_guidance_scale"])
    assert sampled.shape == (2, 3, 64, 64) and torch.isfinite(sampled).all()  # plain diffusers' default size
