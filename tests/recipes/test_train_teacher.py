"""In-process 2-step smoke tests of ``recipes/train_teacher.py`` (the shipped teachers' default sizes)."""

import json

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline, StableDiffusionPipeline

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

    first = files_of(tmp_path)
    again = tmp_path / "again"
    train_teacher.main(train_teacher.TeacherConfig(output_dir=str(again), classifier_steps=2, vae_steps=2, unet_steps=2,
                                                   batch_size=8))
    assert files_of(again) == first  # seeded, the classifier's initialisation included


def files_of(folder) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*.safetensors"))}


def test_the_sd3_format_trains_a_seeded_flow_teacher_that_plain_diffusers_loads(train_teacher, tmp_path):
    runs = []
    for name in ("a", "b"):
        cfg = train_teacher.TeacherConfig(output_dir=str(tmp_path / name), format="sd3", transformer_steps=2, batch_size=8)
        train_teacher.main(cfg)
        runs.append(files_of(tmp_path / name / "teacher_sd3"))
    assert runs[0] == runs[1] and "transformer/diffusion_pytorch_model.safetensors" in runs[0]  # seeded
    log = json.loads((tmp_path / "a" / "train_log_sd3.json").read_text())
    assert log["config"]["format"] == "sd3" and log["transformer_parameters"] > 3e6

    # diffusers' own loader, with its own attention (the T5 parts saved as absent are passed as such)
    pipe = StableDiffusion3Pipeline.from_pretrained(tmp_path / "a" / "teacher_sd3", text_encoder_3=None, tokenizer_3=None)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler) and pipe.scheduler.config.shift == 3.0
    assert pipe.vae.config.shift_factor == pytest.approx(log["vae_shift_factor"])
    assert pipe.vae.config.scaling_factor == pytest.approx(log["vae_scaling_factor"])
    pipe.set_progress_bar_config(disable=True)
    images = pipe(prompt=["a handwritten digit three"], num_inference_steps=2, guidance_scale=1.5, output_type="pt").images
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()
