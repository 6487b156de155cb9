"""Several processes (gloo, CPU) on the FSDP2 engine: replicated (data parallel) and sharded (FSDP).

Two processes with half the batch each train like one process with all of it (a toy, and DMD2's
recipe, full weights and LoRA: each process draws its rows of the global batch's noise), and resume
bitwise."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DistributedType

from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from stepdistill import sharding
from stepdistill.config import ConfigError
from stepdistill.trainer import require_supported_engine

TOY = Path(__file__).parent / "distributed" / "data_parallel_toy.py"


def run(command: list[str], output_dir: Path, *args: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command + [str(output_dir), *args], env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(output_dir / "weights.pt", weights_only=True)


TWO = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]


@pytest.mark.parametrize("layout", ["replicate", "shard"])
def test_two_processes_match_one_at_the_same_global_batch(tmp_path, layout):
    single = run([sys.executable, str(TOY)], tmp_path / "one")
    double = run([*TWO, "--master_port", "29517", str(TOY)], tmp_path / "two", "--layout", layout)
    for role in ("generator", "critic"):
        for name, value in single[role].items():
            torch.testing.assert_close(double[role][name], value, atol=1e-6, rtol=1e-5)
    log = (tmp_path / "two" / "train_log.jsonl").read_text().splitlines()
    assert [line.count('"step"') for line in log] == [1, 1, 1]  # one line per step: only the main process writes


@pytest.mark.parametrize("layout", ["replicate", "shard"])
def test_two_processes_resume_exactly(tmp_path, layout):
    two = [*TWO, "--master_port", "29518", str(TOY)]
    straight = run(two, tmp_path / "straight", "--steps", "4", "--layout", layout)
    run(two, tmp_path / "resumed", "--steps", "2", "--layout", layout)  # stops after step 2 (checkpoint-2) ...
    resumed = run(two, tmp_path / "resumed", "--steps", "4", "--layout", layout, "--resume")  # ... a second launch ends it
    for role in ("generator", "critic"):
        for name, value in straight[role].items():
            torch.testing.assert_close(resumed[role][name], value, atol=0, rtol=0)
    steps = [json.loads(line)["step"] for line in (tmp_path / "resumed" / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_fsdp_configured_for_one_process_is_refused():
    accelerator = Accelerator(cpu=True)
    accelerator.state.distributed_type = DistributedType.FSDP
    try:
        with pytest.raises(ConfigError, match="FSDP on one process: sharding needs several"):
            require_supported_engine(accelerator)
    finally:
        accelerator.state.distributed_type = DistributedType.NO


def test_engines_the_trainer_does_not_drive_are_refused():
    accelerator = Accelerator(cpu=True)
    accelerator.state.distributed_type = DistributedType.DEEPSPEED  # what `accelerate config` would have set
    try:
        with pytest.raises(ConfigError, match="DEEPSPEED"):
            require_supported_engine(accelerator)
    finally:
        accelerator.state.distributed_type = DistributedType.NO


def test_the_dmd2_recipe_runs_and_resumes_as_two_processes(tiny_pipeline_dir, tmp_path):
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "dmd2.py"
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29519", str(recipe),
              "--pretrained_model_name_or_path", str(tiny_pipeline_dir), "--train_batch_size", "2",
              "--critic_steps_per_generator_step", "2", "--checkpointing_steps", "2", "--output_dir", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = launch + ["--max_train_steps", "2", "--validation_steps", "2", "--num_validation_images", "10",
                      "--eval_num_samples", "10", "--teacher_eval_steps", "2"]
    result = subprocess.run(first, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == [1, 2]  # one process logs, the two train together
    assert result.stdout.count("| student | 1 |") == 1 and (tmp_path / "checkpoint-2").is_dir()
    # a second launch resumes both processes from checkpoint-2
    second = launch + ["--max_train_steps", "3", "--resume_from_checkpoint", "latest", "--validation_steps", "0",
                       "--eval_num_samples", "0"]
    result = subprocess.run(second, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stderr and "checkpoint-2 at step 2" in result.stderr
    steps = [json.loads(line)["step"] for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def launch_dmd2(teacher_dir: Path, output_dir: Path, port: int | None, *flags: str) -> None:
    """A 3-step DMD2 run on ``teacher_dir`` at a global batch of 4: two processes talking on ``port``, or
    one (``None``) (a checkpoint at step 2, nothing scored)."""
    launcher, batch_size = ([*TWO, "--master_port", str(port)], 2) if port else ([sys.executable], 4)
    command = [*launcher, str(RECIPES / "dmd2.py"), "--pretrained_model_name_or_path",
               str(teacher_dir), "--train_batch_size", str(batch_size), "--critic_steps_per_generator_step", "2",
               "--max_train_steps", "3", "--checkpointing_steps", "2", "--validation_steps", "0",
               "--eval_num_samples", "0", "--report_to", "none", "--output_dir", str(output_dir), *flags]
    result = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def test_dmd2_sharded_or_data_parallel_trains_as_one_process_and_resumes_bitwise(tiny_pipeline_dir, tmp_path):
    full = ("--use_lora", "false", "--ema_decay", "0.9", "--validation_steps", "2", "--num_validation_images", "4")
    launch_dmd2(tiny_pipeline_dir, tmp_path / "sharded", 29521, "--parallelism", "fsdp", *full)
    launch_dmd2(tiny_pipeline_dir, tmp_path / "data", 29522, "--parallelism", "data", *full)
    launch_dmd2(tiny_pipeline_dir, tmp_path / "one", None, *full)
    resumed = tmp_path / "resumed"  # a sharded run stopped after its checkpoint at step 2, launched again
    resumed.mkdir()
    shutil.copytree(tmp_path / "sharded" / "checkpoint-2", resumed / "checkpoint-2")
    launch_dmd2(tiny_pipeline_dir, resumed, 29523, "--parallelism", "fsdp", "--resume_from_checkpoint", "latest", *full)
    assert (tmp_path / "sharded" / "checkpoint-2" / "sharded_state").is_dir()  # a distributed checkpoint
    unet = Path("student", "unet", "diffusion_pytorch_model.safetensors")
    sharded, data, one, again = (load_file(str(root / unet)) for root in
                                 (tmp_path / "sharded", tmp_path / "data", tmp_path / "one", resumed))
    teacher = load_file(str(tiny_pipeline_dir / "unet" / "diffusion_pytorch_model.safetensors"))
    assert any(not torch.equal(one[k], teacher[k]) for k in teacher)  # it trained
    for name, value in one.items():  # the processes change the order of sums, not the update
        torch.testing.assert_close(sharded[name], value, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(data[name], value, atol=1e-6, rtol=1e-5)
        assert torch.equal(again[name], sharded[name]), name
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "sharded" / "student")  # plain diffusers loads it
    assert all(torch.equal(p, sharded[n]) for n, p in pipe.unet.state_dict().items())


def test_a_sharded_lora_student_trains_as_one_process_and_loads_in_diffusers(tiny_pipeline_dir, tmp_path):
    launch_dmd2(tiny_pipeline_dir, tmp_path / "fsdp", 29524, "--parallelism", "fsdp", "--use_lora", "true")
    launch_dmd2(tiny_pipeline_dir, tmp_path / "one", None, "--use_lora", "true")
    lora = Path("student", "pytorch_lora_weights.safetensors")
    sharded, one = (load_file(str(tmp_path / run / lora)) for run in ("fsdp", "one"))
    assert sharded.keys() == one.keys()
    assert any(value.abs().max() > 0 for name, value in one.items() if "lora_B" in name)  # it trained (B starts at 0)
    for name, value in one.items():
        torch.testing.assert_close(sharded[name], value, atol=1e-6, rtol=1e-5)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir)
    pipe.load_lora_weights(tmp_path / "fsdp" / "student")
    assert pipe.get_list_adapters()["unet"]


def test_a_method_with_its_own_network_trains_sharded_in_bf16_with_gradient_checkpointing(tiny_pipeline_dir, tmp_path):
    """Consistency distillation's EMA target (a network the method holds) is sharded like the student;
    bf16 weights are gathered by the engine (no autocast), activations recomputed inside each unit."""
    command = [*TWO, "--master_port", "29526", str(RECIPES / "consistency.py"), "--pretrained_model_name_or_path",
               str(tiny_pipeline_dir), "--train_batch_size", "2", "--max_train_steps", "2", "--validation_steps", "2",
               "--num_validation_images", "4", "--eval_num_samples", "0", "--report_to", "none", "--output_dir",
               str(tmp_path), "--parallelism", "fsdp", "--use_lora", "false", "--target_ema_decay", "0.95",
               "--mixed_precision", "bf16", "--gradient_checkpointing", "true"]
    result = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    student = load_file(str(tmp_path / "student" / "unet" / "diffusion_pytorch_model.safetensors"))
    teacher = load_file(str(tiny_pipeline_dir / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(value.dtype == torch.float32 and torch.isfinite(value).all() for value in student.values())
    assert any(not torch.equal(student[k], teacher[k]) for k in teacher)
    assert (tmp_path / "validation" / "step-2.png").is_file()


def test_the_shipped_accelerate_config_selects_fsdp2_and_the_sharded_layout():
    config = load_config_from_file(str(Path(__file__).resolve().parents[1] / "configs" / "accelerate" / "fsdp.yaml"))
    assert config.distributed_type == DistributedType.FSDP and config.fsdp_config["fsdp_version"] == 2
    assert sharding.resolve_layout("auto", fsdp_configured=True) == "shard"
    assert sharding.resolve_layout("auto", fsdp_configured=False) == "replicate"
    assert sharding.resolve_layout("replicate", fsdp_configured=True) == "replicate"  # the flag wins
    with pytest.raises(ValueError, match="layout must be"):
        sharding.resolve_layout("zero3", fsdp_configured=False)


def test_a_one_process_checkpoint_is_refused_in_one_line_by_two_processes(tmp_path):
    run([sys.executable, str(TOY)], tmp_path, "--steps", "2")
    command = [*TWO, "--master_port", "29527", str(TOY), str(tmp_path), "--steps", "3", "--resume"]
    result = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                            timeout=240)
    assert result.returncode != 0
    assert "CheckpointError: cannot load" in result.stderr and "written by a one-process run" in result.stderr


def test_a_four_step_student_trains_sharded_in_bf16(tiny_pipeline_dir, tmp_path):
    """Backward simulation runs the student k times without gradient, k drawn per step: every process
    must run it as often (each sharded forward is a collective), so k is the main process's draw."""
    launch_dmd2(tiny_pipeline_dir, tmp_path, 29529, "--parallelism", "fsdp", "--use_lora", "false",
                "--num_student_steps", "4", "--mixed_precision", "bf16")
    student = load_file(str(tmp_path / "student" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.isfinite(value).all() for value in student.values())
