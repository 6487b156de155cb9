"""The notebooks execute top to bottom (nbclient) on the offline default and check their own numbers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from notebook_runner import execute, printed

ROOT = Path(__file__).resolve().parents[1]
COMMITTED_RESULTS = ROOT / "benchmarks" / "results" / "results.json"


@pytest.fixture(scope="module")
def lora_student(tmp_path_factory) -> Path:
    """A digits student, LoRA, after one DMD2 step (the notebook must load what the recipes write)."""
    output_dir = tmp_path_factory.mktemp("dmd2_lora")
    subprocess.run(
        [sys.executable, str(ROOT / "recipes" / "dmd2.py"), "--output_dir", str(output_dir), "--max_train_steps", "1",
         "--train_batch_size", "4", "--use_lora", "true", "--validation_steps", "0", "--eval_num_samples", "0",
         "--num_threads", "1"],
        check=True, capture_output=True,
    )
    return output_dir / "student"


@pytest.mark.slow
def test_evaluate_notebook_scores_a_lora_student(lora_student, tmp_path, monkeypatch):
    notebook = execute("evaluate.ipynb", monkeypatch, STEPDISTILL_STUDENT=str(lora_student),
                       STEPDISTILL_NUM_SAMPLES="40", STEPDISTILL_NOTEBOOK_OUTPUT=str(tmp_path))
    text = printed(notebook)
    assert "fd_digits" in text and "real-vs-real FD-digits floor at 40 samples" in text
    assert "speed-up:" in text
    assert (tmp_path / "quality_vs_steps.png").stat().st_size > 0
    assert (tmp_path / "samples.png").stat().st_size > 0


@pytest.mark.slow
def test_compare_notebook_draws_the_committed_benchmark(tmp_path, monkeypatch):
    notebook = execute("compare_recipes.ipynb", monkeypatch, STEPDISTILL_BENCH_RESULTS=str(COMMITTED_RESULTS),
                       STEPDISTILL_NOTEBOOK_OUTPUT=str(tmp_path))
    assert "best student:" in printed(notebook)
    for name in ("fd_vs_sampling_steps.png", "fd_vs_training_time.png", "fd_vs_speed.png"):
        assert (tmp_path / name).stat().st_size > 0
