"""recipes/sid.py end to end on a tiny random-weight SD pipeline: the code path a hub model takes."""

from __future__ import annotations

import json

import pytest

from stepdistill import config as configs
from stepdistill import run
from stepdistill.assets import DIGITS_TEACHER, DIGITS_TEACHER_SD3
from stepdistill.run.flags import DEFAULT_GUIDANCE_SCALE
from stepdistill.models.loading import load_pipeline


def smoke_config(sid, teacher_dir, output_dir, **overrides):
    values = dict(
        pretrained_model_name_or_path=str(teacher_dir), output_dir=str(output_dir), max_train_steps=2,
        train_batch_size=2, eval_num_samples=10, teacher_eval_steps=2, validation_steps=0,
    )
    values.update(overrides)
    return sid.SiDConfig(**values)


def read_log(output_dir) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("use_lora", [False, True])
def test_two_steps_then_export_and_report(sid, tiny_pipeline_dir, tmp_path, use_lora, shipped_classifier):
    cfg = smoke_config(sid, tiny_pipeline_dir, tmp_path, use_lora=use_lora, validation_steps=2, num_validation_images=10,
                       fake_guidance_scale_generator=-0.5)  # Anti-CFG
    sid.main(cfg)
    log = read_log(tmp_path)
    assert [row["step"] for row in log] == [1, 2]
    assert all("critic/fake_score" in row and "generator/sid" in row and "critic/gan_critic" not in row for row in log)
    assert "validation/fd_digits" in log[1]
    report = json.loads((tmp_path / "report.json").read_text())
    assert {(r["model"], r["num_inference_steps"]) for r in report["results"]} == {("student", 1), ("teacher", 2)}
    student = tmp_path / "student"
    if use_lora:
        assert (student / "pytorch_lora_weights.safetensors").is_file()
    else:
        assert type(load_pipeline(student).scheduler).__name__ == "LCMScheduler"


@pytest.mark.parametrize("per_step_fake_score", [False, True])
def test_few_step_student_from_an_initial_timestep_with_the_gan_term(sid, tiny_pipeline_dir, tmp_path, per_step_fake_score):
    cfg = smoke_config(sid, tiny_pipeline_dir, tmp_path, num_student_steps=2, gan_generator_weight=0.01,
                       gan_critic_weight=0.01, eval_num_samples=0, conditioning_timestep=625,
                       critic_steps_per_generator_step=2, per_step_fake_score=per_step_fake_score)
    sid.main(cfg)
    assert all("critic/gan_critic" in row and "generator/gan_generator" in row for row in read_log(tmp_path))
    assert json.loads((tmp_path / "student" / "stepdistill_student.json").read_text())["timesteps"] == [625, 312]
    assert load_pipeline(tmp_path / "student").scheduler.config.num_train_timesteps == 626


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--alpha=-1"], "--alpha must be ≥ 0"),
        (["--fake_guidance_scale=-1"], "--fake_guidance_scale must be ≥ 0"),
        (["--critic_learning_rate", "0"], "--critic_learning_rate must be > 0"),
        (["--critic_steps_per_generator_step", "0"], "--critic_steps_per_generator_step must be ≥ 1"),
        (["--gan_generator_weight", "0.1", "--prompts_file", "README.md"], "the GAN term needs real images"),
        (["--num_student_steps", "0"], "--num_student_steps must be ≥ 1"),
        (["--conditioning_timestep", "1000"], "--conditioning_timestep must be in [1, 999]"),
        (["--teacher_eval_guidance_scale=-1"], "--teacher_eval_guidance_scale must be ≥ 0"),
        (["--per_step_fake_score", "true"], "--per_step_fake_score needs --num_student_steps > 1"),
        (["--per_step_fake_score", "true", "--num_student_steps", "4", "--use_lora", "true"], "full-weight fake score"),
    ],
)
def test_bad_flags_fail_before_loading(sid, flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        configs.parse(sid.SiDConfig, flags)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_the_report_compares_with_the_shipped_teachers_best_guidance(sid, tiny_pipeline_dir):
    # SiD distils CFG 1.25 on the digits; its report's teacher row stays the bar's reference, CFG 1.5
    assert sid.SiDConfig().guidance_scale == 1.25
    assert sid.SiDConfig().teacher_report_guidance_scale == 1.5
    other = sid.SiDConfig(pretrained_model_name_or_path=str(tiny_pipeline_dir), guidance_scale=4.5)
    assert other.teacher_report_guidance_scale == 4.5  # another teacher: the distilled scale
    assert sid.SiDConfig(teacher_eval_guidance_scale=2.0).teacher_report_guidance_scale == 2.0


def test_the_distilled_guidance_defaults_to_each_shipped_teachers_own(sid, tiny_pipeline_dir):
    flow = sid.SiDConfig(pretrained_model_name_or_path="digits-sd3")  # the alias names the shipped folder
    assert flow.pretrained_model_name_or_path == str(DIGITS_TEACHER_SD3)
    assert flow.guidance_scale == 1.0 and flow.teacher_report_guidance_scale == 1.0  # its best is unguided
    assert sid.SiDConfig(pretrained_model_name_or_path="digits").pretrained_model_name_or_path == str(DIGITS_TEACHER)
    assert sid.SiDConfig(pretrained_model_name_or_path=str(tiny_pipeline_dir)).guidance_scale == DEFAULT_GUIDANCE_SCALE
    assert run.RunConfig().guidance_scale == 1.5 and run.RunConfig(pretrained_model_name_or_path="digits-sd3").guidance_scale == 1.0
