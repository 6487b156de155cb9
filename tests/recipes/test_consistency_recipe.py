"""recipes/consistency.py end to end on a tiny random-weight SD pipeline: the code path a hub model takes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from stepdistill import config as configs
from stepdistill.models.loading import load_pipeline


def smoke_config(consistency, teacher_dir, output_dir, **overrides):
    values = dict(
        pretrained_model_name_or_path=str(teacher_dir), output_dir=str(output_dir), max_train_steps=2,
        train_batch_size=2, num_student_steps=2, eval_steps=(1, 2), eval_num_samples=10, teacher_eval_steps=2,
        validation_steps=0,
    )
    values.update(overrides)
    return consistency.ConsistencyConfig(**values)


def read_log(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "train_log.jsonl").read_text().splitlines()]


def test_lora_two_steps_then_export_and_report(consistency, tiny_pipeline_dir, tmp_path, shipped_classifier):
    cfg = smoke_config(consistency, tiny_pipeline_dir, tmp_path, guidance_scale_max=3.0, num_segments=2,
                       validation_steps=2, num_validation_images=10)
    consistency.main(cfg)
    log = read_log(tmp_path)
    assert [row["step"] for row in log] == [1, 2] and all("generator/consistency" in row for row in log)
    assert "validation/fd_digits" in log[1] and (tmp_path / "validation" / "step-2.png").is_file()
    report = json.loads((tmp_path / "report.json").read_text())
    assert {(r["model"], r["num_inference_steps"]) for r in report["results"]} == {
        ("student", 1), ("student", 2), ("teacher", 2)}
    student = tmp_path / "student"
    assert (student / "pytorch_lora_weights.safetensors").is_file()
    scheduler = json.loads((student / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["timestep_scaling"] == 10.0 and scheduler["original_inference_steps"] == 50
    assert json.loads((student / "stepdistill_student.json").read_text())["timesteps"] == [999, 499]


def test_full_weights_with_ema_target_checkpoint_and_resume(consistency, tiny_pipeline_dir, tmp_path):
    cfg = smoke_config(consistency, tiny_pipeline_dir, tmp_path, use_lora=False, target_ema_decay=0.5,
                       checkpointing_steps=2, eval_num_samples=0)
    consistency.main(cfg)
    assert type(load_pipeline(tmp_path / "student").scheduler).__name__ == "LCMScheduler"
    # the EMA target is checkpointed as the method's state, and it moved: θ⁻ = ½ θ⁻ + ½ θ after each update
    checkpoint = tmp_path / "checkpoint-2"
    student, target = load_file(str(checkpoint / "model.safetensors")), load_file(str(checkpoint / "method.safetensors"))
    assert not (checkpoint / "model_1.safetensors").exists()  # the student is the one prepared module
    teacher = load_pipeline(tiny_pipeline_dir).unet.state_dict()
    name = "conv_in.weight"
    assert not (target[f"denoiser.network.{name}"] == teacher[name]).all()
    assert not (target[f"denoiser.network.{name}"] == student[name]).all()
    resumed = smoke_config(consistency, tiny_pipeline_dir, tmp_path, use_lora=False, target_ema_decay=0.5,
                           max_train_steps=3, resume_from_checkpoint="latest", eval_num_samples=0)
    consistency.main(resumed)
    assert [row["step"] for row in read_log(tmp_path)] == [1, 2, 3]


def test_guidance_embedded_full_student(consistency, tiny_pipeline_dir, tmp_path, shipped_classifier):
    cfg = smoke_config(consistency, tiny_pipeline_dir, tmp_path, use_lora=False, guidance_embedding=True,
                       guidance_scale=1.5, guidance_scale_max=3.0, validation_steps=2, num_validation_images=10)
    consistency.main(cfg)
    assert "validation/fd_digits" in read_log(tmp_path)[1]
    assert load_pipeline(tmp_path / "student").unet.config.time_cond_proj_dim == 256
    assert json.loads((tmp_path / "student" / "stepdistill_student.json").read_text())["guidance_scale"] == 1.5
    students = [r for r in json.loads((tmp_path / "report.json").read_text())["results"] if r["model"] == "student"]
    assert [(r["guidance_scale"], r["nfe"]) for r in students] == [(1.5, 1), (1.5, 2)]  # no CFG pass: NFE = steps


def test_deterministic_sampler_validates_exports_and_reports_with_ddim(consistency, tiny_pipeline_dir, tmp_path,
                                                                     shipped_classifier):
    cfg = smoke_config(consistency, tiny_pipeline_dir, tmp_path, sampler="ddim", validation_steps=2,
                       num_validation_images=10)
    consistency.main(cfg)
    assert "validation/fd_digits" in read_log(tmp_path)[1]
    scheduler = json.loads((tmp_path / "student" / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "DDIMScheduler" and scheduler["timestep_spacing"] == "trailing"
    assert scheduler["set_alpha_to_one"] and scheduler["prediction_type"] == "epsilon"
    assert json.loads((tmp_path / "student" / "stepdistill_student.json").read_text())["timesteps"] == [999, 499]
    students = [r for r in json.loads((tmp_path / "report.json").read_text())["results"] if r["model"] == "student"]
    assert [r["num_inference_steps"] for r in students] == [1, 2]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--skipping_interval", "2000"], "--skipping_interval 2000 is larger than the teacher's grid of 1000"),
        (["--skipping_interval", "30"], "--skipping_interval 30 must divide the teacher's 1000 training timesteps"),
        (["--skipping_interval", "0"], "--skipping_interval must be ≥ 1"),
        (["--num_segments", "4"], "--num_segments 4 must divide the 50 solver steps"),
        (["--guidance_scale", "3", "--guidance_scale_max", "2"], "--guidance_scale_max (2.0) must be ≥ --guidance_scale (3.0)"),
        (["--skipping_interval", "250", "--num_student_steps", "8"], "must be ≤ the 4 solver steps"),
        (["--loss_type", "l1"], "--loss_type must be one of huber, l2"),
        (["--huber_c", "0"], "--huber_c must be > 0"),
        (["--target_ema_decay", "0.95"], "--target_ema_decay > 0 needs --use_lora false"),
        (["--use_lora", "false", "--target_ema_decay", "1"], "--target_ema_decay must be in [0, 1)"),
        (["--prompts_file", "README.md"], "give --train_data_dir"),
        (["--eval_steps", "0,2"], "--eval_steps must be ≥ 1"),
        (["--pretrained_model_name_or_path", "/no/such/teacher"], "no pipeline at /no/such/teacher"),
        (["--pretrained_model_name_or_path", "tests"], "not a diffusers pipeline folder"),
        (["--num_student_steps", "0"], "--num_student_steps must be ≥ 1"),
        (["--guidance_embedding", "true"], "--guidance_embedding needs --use_lora false"),
        (["--sampler", "ddim", "--eval_steps", "1,3"], "--sampler ddim: a student step count 3 must divide the teacher's 1000 timesteps"),
        (["--sampler", "tcd"], "--sampler must be one of lcm, ddim"),
    ],
)
def test_bad_flags_fail_before_loading(consistency, flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        configs.parse(consistency.ConsistencyConfig, flags)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_dry_run_validates_and_exits(consistency, tmp_path, capsys):
    flags = ["--dry_run", "true", "--output_dir", str(tmp_path / "dry"), "--skipping_interval", "25", "--num_segments", "8"]
    consistency.main(configs.parse(consistency.ConsistencyConfig, flags))
    assert "flags are valid" in capsys.readouterr().out
    assert not (tmp_path / "dry").exists()
