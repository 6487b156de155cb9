"""recipes/progressive.py end to end on a tiny random-weight SD pipeline: stages, exports, report, resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from stepdistill.config import ConfigError
from stepdistill.models.loading import load_pipeline


def smoke_config(progressive, teacher_dir, output_dir, **overrides):
    values = dict(
        pretrained_model_name_or_path=str(teacher_dir), output_dir=str(output_dir), max_train_steps=2,
        train_batch_size=2, start_steps=4, num_student_steps=1, eval_num_samples=10, teacher_eval_steps=2,
        validation_steps=2, num_validation_images=10, report_to="none",
    )
    values.update(overrides)
    return progressive.ProgressiveConfig(**values)


def read_log(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "train_log.jsonl").read_text().splitlines()]


def test_guidance_stage_then_halvings_export_every_stage_and_score_them(progressive, tiny_pipeline_dir, tmp_path,
                                                                         shipped_classifier):
    progressive.main(smoke_config(progressive, tiny_pipeline_dir, tmp_path, guidance_scale=1.0, guidance_scale_max=2.0))
    log = read_log(tmp_path)
    assert [row["stage"] for row in log] == [0, 0, 1, 1, 2, 2]  # guidance distillation, 4 → 2, 2 → 1
    assert all("validation/fd_digits" in row for row in log[1::2])  # each stage's last step validates
    # the guidance stage's student predicts as the teacher does (ε), the halving stages' v
    for folder, steps, prediction in (("stages/guidance", 4, "epsilon"), ("stages/2-step", 2, "v_prediction"),
                                      ("student", 1, "v_prediction")):
        metadata = json.loads((tmp_path / folder / "stepdistill_student.json").read_text())
        assert metadata["num_inference_steps"] == steps and metadata["scheduler"] == "DDIMScheduler"
        pipe = load_pipeline(tmp_path / folder)
        assert pipe.unet.config.time_cond_proj_dim is not None  # w is an input: one network call per step
        assert pipe.scheduler.config.prediction_type == prediction
    report = json.loads((tmp_path / "report.json").read_text())
    assert {(r["model"], r["num_inference_steps"], r["nfe"]) for r in report["results"]} == {
        ("student", 1, 1), ("stage0_student", 4, 4), ("stage1_student", 2, 2), ("teacher", 2, 2)}


def test_lora_distils_one_guidance_scale(progressive, tiny_pipeline_dir, tmp_path):
    progressive.main(smoke_config(progressive, tiny_pipeline_dir, tmp_path, use_lora=True, guidance_distillation=False,
                                  eval_num_samples=0, validation_steps=0))
    assert [row["stage"] for row in read_log(tmp_path)] == [0, 0, 1, 1]
    assert (tmp_path / "student" / "pytorch_lora_weights.safetensors").is_file()
    assert (tmp_path / "stages" / "2-step" / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.parametrize("stop_after, guidance", [(2, False), (3, False), (2, True)],
                         ids=["at-the-boundary", "inside-a-stage", "after-the-guidance-stage"])
def test_a_run_resumed_across_a_stage_boundary_equals_the_uninterrupted_one(progressive, tiny_pipeline_dir, tmp_path,
                                                                            stop_after, guidance):
    quiet = dict(eval_num_samples=0, validation_steps=0, guidance_distillation=guidance)
    progressive.main(smoke_config(progressive, tiny_pipeline_dir, tmp_path / "full", **quiet))
    split = tmp_path / "split"
    progressive.main(smoke_config(progressive, tiny_pipeline_dir, split, checkpointing_steps=stop_after,
                                  checkpoints_total_limit=3, **quiet))
    shutil.rmtree(split / "student")  # what is compared below is what the resumed run writes
    shutil.rmtree(split / "stages")
    resumed = smoke_config(progressive, tiny_pipeline_dir, split, resume_from_checkpoint=f"checkpoint-{stop_after}",
                           **quiet)
    progressive.main(resumed)  # redoes the steps after ``stop_after``, and the hand-over when it stopped at one
    state = json.loads((split / f"checkpoint-{stop_after}" / "trainer_state.json").read_text())
    assert state["progress"]["stage"] == (0 if stop_after == 2 else 1)
    method_state = load_file(str(split / f"checkpoint-{stop_after}" / "method.safetensors"))
    assert method_state["stage"].item() == state["progress"]["stage"]
    for folder in ("student", "stages/2-step") if stop_after == 2 else ("student",):
        ours, theirs = (load_file(str(root / folder / "unet" / "diffusion_pytorch_model.safetensors"))
                        for root in (split, tmp_path / "full"))
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.parametrize("flags, message", [
    (dict(start_steps=6, num_student_steps=4), "must be --num_student_steps \\(4\\) times 2, 4, 8"),
    (dict(start_steps=4, num_student_steps=4), "every stage halves the steps"),
    (dict(num_student_steps=16, start_steps=32), "must divide the teacher's 1000 timesteps"),
    (dict(start_steps=1024, num_student_steps=1), "must be ≤ 500"),
    (dict(ema_decay=0.9), "no EMA is kept across stages"),
    (dict(prompts_file=__file__), "noises real images"),  # any existing file
])
def test_bad_flags_are_one_line_before_anything_loads(progressive, tiny_pipeline_dir, tmp_path, flags, message):
    with pytest.raises(ConfigError, match=message):
        smoke_config(progressive, tiny_pipeline_dir, tmp_path, **flags).validate()


def test_a_range_of_w_needs_a_w_input(progressive, tiny_pipeline_dir, tmp_path):
    with pytest.raises(ConfigError, match="a range of w needs"):
        progressive.main(smoke_config(progressive, tiny_pipeline_dir, tmp_path, use_lora=True, guidance_scale=1.0,
                                      guidance_scale_max=2.0))
    assert not tmp_path.joinpath("config.json").exists()
