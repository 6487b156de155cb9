"""In-process 2-step smoke test of ``recipes/train_teacher.py`` (the shipped teacher's default sizes)."""

import json

import pytest
import torch
from diffusers import StableDiffusionPipeline

from stepdistill.evaluation.classifier import DigitClassifier
from stepdistill.models.loading import load_pipeline


def test_config_validation(train_teacher, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_teacher.configs.parse(train_teacher.TeacherConfig, ["--unet_steps", "0"])
    assert exit_info.value.code == 2
    assert "--unet_steps must be ≥ 1 (got 0)" in capsys.readouterr().err


def test_batches_cover_every_index_each_epoch(train_teacher):
    generator = torch.Generator().manual_seed(0)
    drawn = torch.cat(list(train_teacher.batches(10, 4, 5, generator)))
    assert len(drawn) == 20
    assert sorted(drawn[:10].tolist()) == list(range(10)) and sorted(drawn[10:].tolist()) == list(range(10))


def test_two_step_run_writes_a_loadable_teacher(train_teacher, tmp_path):
    cfg = train_teacher.TeacherConfig(output_dir=str(tmp_path), classifier_steps=2, vae_steps=2, unet_steps=2, batch_size=8)
    train_teacher.main(cfg)

    assert (tmp_path / "teacher" / "model_index.json").is_file()
    log = json.loads((tmp_path / "train_log.json").read_text())
    assert log["config"]["unet_steps"] == 2
    assert 0 <= log["classifier_heldout_accuracy"] <= 1
    assert log["vae_scaling_factor"] > 0 and log["vae_train_reconstruction_mse"] >= 0

    classifier = DigitClassifier.load(tmp_path / "digits_classifier.safetensors")
    assert classifier(torch.zeros(2, 3, 32, 32)).shape == (2, 10)

    pipe = load_pipeline(tmp_path / "teacher")
    assert isinstance(pipe, StableDiffusionPipeline)
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 32
    assert pipe.vae.config.scaling_factor == pytest.approx(log["vae_scaling_factor"])
    images = pipe(prompt=["a handwritten digit three"], num_inference_steps=1, output_type="pt").images
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()
