"""``python -m stepdistill evaluate`` end to end on the tiny random pipeline, and its one-line errors."""

import json
import math
import subprocess
import sys

import pytest
from PIL import Image

import stepdistill.__main__ as cli
from stepdistill import evaluate


def _error_message(argv: list[str], capsys) -> str:
    """The message ``evaluate.main(argv)`` exits with: a ``SystemExit`` text, or what argparse wrote to stderr."""
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(argv)
    code = exit_info.value.code
    assert code not in (0, None), "a bad input must exit non-zero"
    message = code if isinstance(code, str) else capsys.readouterr().err
    lines = message.strip().splitlines()
    assert len(lines) == 1 or lines[0].startswith("usage:"), f"expected a one-line message, got {message!r}"
    return lines[-1]


@pytest.fixture(scope="module")
def evaluation(tiny_pipeline_dir, shipped_classifier, tmp_path_factory):
    """One run over 2 step counts × 2 guidance scales, 20 samples each."""
    output_dir = tmp_path_factory.mktemp("evaluate")
    evaluate.main([
        "--pipeline", str(tiny_pipeline_dir),
        "--num_samples", "20",
        "--num_inference_steps", "1,2",
        "--guidance_scale", "1,2",
        "--batch_size", "10",
        "--output_dir", str(output_dir),
    ])
    return output_dir, json.loads((output_dir / "evaluation.json").read_text())


def test_writes_one_result_per_setting(evaluation, tiny_pipeline_dir):
    _, report = evaluation
    results = report["results"]
    assert len(results) == 4
    assert {(r["num_inference_steps"], r["guidance_scale"]) for r in results} == {(1, 1.0), (2, 1.0), (1, 2.0), (2, 2.0)}
    assert report["pipeline"] == str(tiny_pipeline_dir)
    for result in results:
        assert result["model"] == tiny_pipeline_dir.name
        assert result["num_samples"] == 20
        assert math.isfinite(result["fd_digits"]) and result["fd_digits"] >= 0
        assert 0 <= result["prompt_accuracy"] <= 1
        assert result["nfe"] == result["num_inference_steps"] * (2 if result["guidance_scale"] > 1 else 1)
        assert result["images_per_s"] > 0
        assert result["fid"] is None and result["clip_score"] is None


def test_reports_the_real_floor(evaluation):
    _, report = evaluation
    floor = report["real_vs_real_fd_digits"]
    assert math.isfinite(floor) and floor > 0


def test_writes_a_grid_per_setting(evaluation, tiny_pipeline_dir):
    output_dir, _ = evaluation
    grids = list(output_dir.glob("grid_*.png"))
    assert {g.name for g in grids} == {
        f"grid_{tiny_pipeline_dir.name}_steps{steps}_cfg{cfg}.png" for cfg in (1, 2) for steps in (1, 2)
    }
    for grid in grids:
        with Image.open(grid) as picture:
            assert picture.size == (10 * 32 * 2, 2 * 32 * 2)  # 20 images in rows of 10, upscaled 2×


def test_prints_a_markdown_table(tiny_pipeline_dir, shipped_classifier, tmp_path, capsys):
    evaluate.main(["--pipeline", str(tiny_pipeline_dir), "--num_samples", "2", "--num_inference_steps", "1",
                   "--output_dir", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "| model | num_inference_steps |" in printed
    assert "real-vs-real FD-digits floor at 2 samples" in printed
    assert (tmp_path / "evaluation.json").is_file()


def test_scheduler_flag_samples_with_that_scheduler(tiny_pipeline_dir, shipped_classifier, evaluation, tmp_path):
    # the ancestral sampler adds noise between steps, so at 2 steps it gives other images than the pipeline's DDIM
    evaluate.main(["--pipeline", str(tiny_pipeline_dir), "--num_samples", "20", "--num_inference_steps", "1,2",
                   "--guidance_scale", "1", "--batch_size", "10", "--scheduler", "DDPMScheduler",
                   "--output_dir", str(tmp_path)])
    report = json.loads((tmp_path / "evaluation.json").read_text())
    assert report["scheduler"] == "DDPMScheduler" and evaluation[1]["scheduler"] == "DDIMScheduler"
    default = {r["num_inference_steps"]: r["fd_digits"] for r in evaluation[1]["results"] if r["guidance_scale"] == 1}
    ancestral = {r["num_inference_steps"]: r["fd_digits"] for r in report["results"]}
    assert ancestral[2] != pytest.approx(default[2], rel=1e-6)


def test_missing_pipeline(tmp_path, capsys):
    missing = tmp_path / "no_such_pipeline"
    message = _error_message(["--pipeline", str(missing), "--output_dir", str(tmp_path)], capsys)
    assert str(missing) in message


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--num_samples", "0"], "--eval_num_samples must be ≥ 2"),  # the recipes' name, and the older alias
        (["--eval_num_samples", "1"], "--eval_num_samples must be ≥ 2"),
        (["--num_inference_steps", "0"], "--num_inference_steps must be ≥ 1"),
        (["--num_inference_steps", "4,0"], "--num_inference_steps must be ≥ 1"),
        (["--guidance_scale", "-1"], "--guidance_scale must be ≥ 0"),
        (["--batch_size", "0"], "--batch_size must be ≥ 1"),
        (["--prompts_file", "no_such_prompts.txt"], "--prompts_file no_such_prompts.txt does not exist"),
        (["--inception_weights", "pt_inception.pth"], "FID needs both --inception_weights and --fid_reference_dir"),
        (["--fid_reference_dir", "."], "FID needs both --inception_weights and --fid_reference_dir"),
        (["--inception_weights", "missing.pth", "--fid_reference_dir", "."], "--inception_weights: missing.pth is not a file"),
        (["--clip_model", "no_such_clip"], "--clip_model: no_such_clip is not a folder"),
        (["--clip_model", "."], "--clip_model: . is not a complete CLIP model folder"),
        (["--num_sample", "10"], "unrecognized arguments"),
        (["--scheduler", "DDPMPipeline"], "--scheduler DDPMPipeline is not a diffusers scheduler class"),
        (["--scheduler", "NoSuchScheduler"], "--scheduler NoSuchScheduler is not a diffusers scheduler class"),
    ],
)
def test_bad_flags_fail_before_loading(tiny_pipeline_dir, tmp_path, capsys, monkeypatch, flags, expected):
    monkeypatch.setattr(evaluate.export, "load_any", lambda *args: pytest.fail("loaded the pipeline"))
    message = _error_message(["--pipeline", str(tiny_pipeline_dir), "--output_dir", str(tmp_path), *flags], capsys)
    assert expected in message
    assert not (tmp_path / "evaluation.json").exists()


def test_fid_reference_dir_must_be_a_folder(tiny_pipeline_dir, tmp_path, capsys):
    weights = tmp_path / "pt_inception.pth"
    weights.write_bytes(b"")
    message = _error_message(
        ["--pipeline", str(tiny_pipeline_dir), "--inception_weights", str(weights), "--fid_reference_dir", str(tmp_path / "nope")],
        capsys,
    )
    assert "--fid_reference_dir" in message and "is not a folder" in message


def test_non_digit_prompts_need_clip(tiny_pipeline_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\na handwritten digit seven\n")
    message = _error_message(
        ["--pipeline", str(tiny_pipeline_dir), "--prompts_file", str(prompts), "--num_samples", "4",
         "--output_dir", str(tmp_path)],
        capsys,
    )
    assert "--clip_model" in message


def test_empty_prompts_file(tiny_pipeline_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n  \n")
    message = _error_message(["--pipeline", str(tiny_pipeline_dir), "--prompts_file", str(prompts)], capsys)
    assert "holds no prompts (it is empty or only blank lines)" in message


def test_prompts_file_is_used_cyclically(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a handwritten digit one\n\n  a handwritten digit two  \n")
    cfg = evaluate.EvaluateConfig(prompts_file=str(prompts), eval_num_samples=5)
    assert cfg.prompts() == ["a handwritten digit one", "a handwritten digit two"] * 2 + ["a handwritten digit one"]


@pytest.mark.parametrize("argv", [[], ["train"], ["--help"]])
def test_module_without_a_command_prints_usage(argv):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code not in (0, None)
    assert str(exit_info.value.code).startswith("usage: python -m stepdistill {evaluate,bench,throughput,cache,bench-data}")


def test_module_dispatches_to_evaluate(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["evaluate", "--help"])
    assert exit_info.value.code == 0
    assert "--num_inference_steps" in capsys.readouterr().out


def test_python_dash_m_exits_nonzero_with_usage():
    completed = subprocess.run([sys.executable, "-m", "stepdistill"], capture_output=True, text=True, timeout=60)
    assert completed.returncode != 0
    assert "usage: python -m stepdistill" in completed.stderr
