"""Validation during training samples the student exactly as the exported pipeline would."""

from __future__ import annotations

import math

import torch

from stepdistill import export
from stepdistill.data import digits
from stepdistill.evaluation.sampling import generate
from stepdistill.evaluation.validation import StudentValidator
from stepdistill.models.denoiser import Denoiser
from stepdistill.models.loading import load_pipeline
from stepdistill.models.teacher import load_teacher


def test_validator_matches_the_exported_pipeline_and_scores(tiny_pipeline_dir, tmp_path, digits_evaluator):
    teacher = load_teacher(str(tiny_pipeline_dir))
    student = Denoiser(teacher.network, teacher.process)  # an untrained student: the teacher's weights
    scheduler = export.student_scheduler(teacher.pipeline.scheduler, teacher.process)
    timesteps = export.student_timesteps(scheduler, 2)
    prompts = digits.evaluation_prompts(20)
    validator = StudentValidator(teacher, student, timesteps, prompts, tmp_path, evaluator=digits_evaluator, seed=3)

    export.export_full(teacher.pipeline, teacher.network, tmp_path / "student", num_steps=2, scheduler=scheduler)
    exported = load_pipeline(tmp_path / "student")
    exported.set_progress_bar_config(disable=True)
    expected, _ = generate(exported, prompts, 2, 1.0, seed=3)
    torch.testing.assert_close(validator.sample(), expected, atol=1e-5, rtol=0)

    metrics = validator(step=7)
    assert set(metrics) == {"validation/fd_digits", "validation/prompt_accuracy"}
    assert math.isfinite(metrics["validation/fd_digits"]) and 0 <= metrics["validation/prompt_accuracy"] <= 1
    assert (tmp_path / "validation" / "step-7.png").is_file()
