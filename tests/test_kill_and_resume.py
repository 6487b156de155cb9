"""SIGKILL a DMD2 run at random steps, resume each time: the exported weights equal an uninterrupted run's, bitwise,
on the in-memory digits and on streamed data (an image folder, tar shards read by a DataLoader worker), whose
position the checkpoints keep."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from digits_layouts import write_layouts

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("data", ["digits", "imagefolder", "tar"])
def test_killed_and_resumed_run_equals_the_uninterrupted_one(tiny_pipeline_dir, tmp_path, data):
    data_flags = []
    if data != "digits":  # 10 images in batches of 2, 3 batches a step: the kills fall mid-epoch
        layout = write_layouts(tmp_path / "data", 10)[data]
        data_flags = ["--train_data_dir", layout, "--gan_generator_weight", "0.1", "--gan_critic_weight", "0.1",
                      "--center_crop", "false", "--random_flip", "true", "--dataloader_num_workers", str(int(data == "tar"))]
    command = [
        sys.executable, str(ROOT / "scripts" / "kill_and_resume.py"), "--kills", "2", "--max_train_steps", "5",
        "--work_dir", str(tmp_path / "runs"), "--", str(ROOT / "recipes" / "dmd2.py"),
        "--pretrained_model_name_or_path", str(tiny_pipeline_dir), "--train_batch_size", "2",
        "--critic_steps_per_generator_step", "2", "--eval_num_samples", "0", "--validation_steps", "0", "--num_threads", "1",
        *data_flags,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert result.stdout.count("killed at step") == 2
    assert "max abs difference of the exported weights: 0 over" in result.stdout
    steps = [json.loads(line)["step"] for line in (tmp_path / "runs" / "resumed" / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]
