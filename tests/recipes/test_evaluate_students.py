"""``python -m stepdistill evaluate`` scores what the recipes write, LoRA students included, with the
same numbers as the benchmark's loader (``export.load_student``) on the same seed."""

from __future__ import annotations

import json
import shutil

import pytest

from stepdistill import evaluate, export
from stepdistill.data import digits
from stepdistill.evaluation.digits_metrics import DigitsEvaluator
from stepdistill.evaluation.report import Scorers
from stepdistill.evaluation.report import evaluate as score


@pytest.fixture(scope="module")
def lora_students(dmd2, consistency, tiny_pipeline_dir, tmp_path_factory):
    """A 2-step DMD2 LoRA student and a 2-step consistency LoRA student of the tiny pipeline."""
    common = dict(pretrained_model_name_or_path=str(tiny_pipeline_dir), max_train_steps=2, train_batch_size=2,
                  validation_steps=0, eval_num_samples=0, use_lora=True, report_to="none")
    folders = {}
    for name, recipe, config in (("dmd2", dmd2, dmd2.DMD2Config), ("consistency", consistency,
                                                                   consistency.ConsistencyConfig)):
        output = tmp_path_factory.mktemp(name)
        extra = {"critic_steps_per_generator_step": 1} if name == "dmd2" else {}
        recipe.main(config(**common, **extra, output_dir=str(output)))
        folders[name] = output / "student"
    return folders


@pytest.mark.parametrize("name", ["dmd2", "consistency"])
def test_a_lora_student_scores_as_the_benchmark_scores_it(lora_students, shipped_classifier, tmp_path, name, capsys):
    student = lora_students[name]
    evaluate.main(["--pipeline", str(student), "--num_samples", "20", "--num_inference_steps", "1,2",
                   "--output_dir", str(tmp_path), "--batch_size", "10"])
    written = json.loads((tmp_path / "evaluation.json").read_text())
    assert written["loaded"] == "student (lora)" and written["scheduler"] == "LCMScheduler"
    assert written["base_model"] == json.loads((student / export.STUDENT_METADATA).read_text())["base_model"]
    assert "scored pipeline" in capsys.readouterr().out
    pipe, guidance_scale = export.load_student(student)
    expected = score(pipe, "student", (1, 2), (guidance_scale,), digits.evaluation_prompts(20),
                     Scorers(digits=DigitsEvaluator()), seed=0, batch_size=10)
    assert [r["fd_digits"] for r in written["results"]] == pytest.approx([r.fd_digits for r in expected], rel=1e-6)
    assert [r["guidance_scale"] for r in written["results"]] == [guidance_scale] * 2


def test_lora_weights_without_metadata_need_a_base(lora_students, tiny_pipeline_dir, shipped_classifier, tmp_path, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(lora_students["dmd2"] / export.LORA_WEIGHTS, bare)
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--pipeline", str(bare), "--output_dir", str(tmp_path / "out")])
    message = str(exit_info.value)
    assert "without stepdistill_student.json" in message and "--pretrained_model_name_or_path" in message
    assert "\n" not in message and not (tmp_path / "out").exists()
    # with the base given it loads onto it, with the base's scheduler unless --scheduler says otherwise
    evaluate.main(["--pipeline", str(bare / export.LORA_WEIGHTS), "--pretrained_model_name_or_path",
                   str(tiny_pipeline_dir), "--scheduler", "LCMScheduler", "--num_samples", "10",
                   "--num_inference_steps", "2", "--output_dir", str(tmp_path / "out")])
    written = json.loads((tmp_path / "out" / "evaluation.json").read_text())
    assert written["loaded"] == "lora" and written["base_model"] == str(tiny_pipeline_dir)
    assert written["scheduler"] == "LCMScheduler"


def test_a_student_is_scored_at_its_own_step_count_unless_told(lora_students, tiny_pipeline_dir, shipped_classifier,
                                                               tmp_path):
    evaluate.main(["--pipeline", str(lora_students["consistency"]), "--num_samples", "10", "--output_dir",
                   str(tmp_path / "student")])
    assert [r["num_inference_steps"] for r in json.loads((tmp_path / "student" / "evaluation.json").read_text())[
        "results"]] == [json.loads((lora_students["consistency"] / export.STUDENT_METADATA).read_text())[
        "num_inference_steps"]]
    evaluate.main(["--pipeline", str(tiny_pipeline_dir), "--num_samples", "10", "--output_dir", str(tmp_path / "teacher")])
    assert [r["num_inference_steps"] for r in json.loads((tmp_path / "teacher" / "evaluation.json").read_text())[
        "results"]] == [evaluate.DEFAULT_STEPS]
