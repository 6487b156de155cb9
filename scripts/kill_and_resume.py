"""Kill a training run with SIGKILL at random steps, resume it each time, and compare with an uninterrupted run.

    python scripts/kill_and_resume.py --kills 5 -- recipes/dmd2.py --max_train_steps 20 --train_batch_size 8

Everything after ``--`` is the recipe and its flags (``--output_dir``, ``--checkpointing_steps`` and
``--resume_from_checkpoint`` are set here). The script runs the recipe once straight through, then
again with a checkpoint every step, killing it as soon as it has logged each chosen step and resuming
with ``--resume_from_checkpoint latest``. It prints the largest absolute difference between the two
runs' exported weights (0 means the resumed run is bitwise the uninterrupted one) and exits non-zero
if they differ.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file


def logged_step(output_dir: Path) -> int:
    """The last step the run has written to its log (0 before the first)."""
    log = output_dir / "train_log.jsonl"
    if not log.is_file():
        return 0
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    try:
        return json.loads(lines[-1])["step"] if lines else 0
    except ValueError:  # a line being written
        return json.loads(lines[-2])["step"] if len(lines) > 1 else 0


def has_checkpoint(output_dir: Path) -> bool:
    return any(p.is_dir() and not p.name.endswith(".partial") for p in output_dir.glob("checkpoint-*"))


def launch(recipe: list[str], output_dir: Path, resume: bool) -> subprocess.Popen:
    flags = ["--output_dir", str(output_dir), "--checkpointing_steps", "1", "--checkpoints_total_limit", "2"]
    if resume:
        flags += ["--resume_from_checkpoint", "latest"]
    return subprocess.Popen([sys.executable, *recipe, *flags], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen) -> None:
    _, stderr = process.communicate()
    if process.returncode != 0:
        raise SystemExit(f"the recipe failed (exit {process.returncode}):\n{stderr[-3000:]}")


def run_with_kills(recipe: list[str], output_dir: Path, kill_steps: list[int]) -> None:
    for step in kill_steps:
        process = launch(recipe, output_dir, resume=has_checkpoint(output_dir))
        while logged_step(output_dir) < step and process.poll() is None:
            time.sleep(0.05)
        if process.poll() is not None:
            finish(process)
            raise SystemExit(f"the run ended before step {step}; choose fewer or earlier kills")
        process.send_signal(signal.SIGKILL)
        process.wait()
        print(f"killed at step {logged_step(output_dir)}", flush=True)
    finish(launch(recipe, output_dir, resume=has_checkpoint(output_dir)))


def weights(output_dir: Path) -> dict[str, torch.Tensor]:
    files = sorted((output_dir / "student").rglob("*.safetensors"))
    if not files:
        raise SystemExit(f"no exported weights under {output_dir / 'student'}")
    return {f"{f.relative_to(output_dir)}:{k}": v for f in files for k, v in load_file(f).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=5, help="how many times to kill the run")
    parser.add_argument("--max_train_steps", type=int, required=True, help="the recipe's --max_train_steps (also passed on)")
    parser.add_argument("--work_dir", default="outputs/kill_and_resume", help="where the two runs go (emptied first)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill steps")
    parser.add_argument("recipe", nargs=argparse.REMAINDER, help="-- recipe.py [flags]")
    args = parser.parse_args()
    recipe = [a for a in args.recipe if a != "--"] + ["--max_train_steps", str(args.max_train_steps)]
    if args.kills >= args.max_train_steps:
        raise SystemExit("--kills must be smaller than --max_train_steps")
    work = Path(args.work_dir)
    shutil.rmtree(work, ignore_errors=True)
    kill_steps = sorted(random.Random(args.seed).sample(range(1, args.max_train_steps), args.kills))
    print(f"uninterrupted run, then kills after steps {kill_steps}", flush=True)
    finish(launch(recipe, work / "uninterrupted", resume=False))
    run_with_kills(recipe, work / "resumed", kill_steps)
    reference, resumed = weights(work / "uninterrupted"), weights(work / "resumed")
    if reference.keys() != resumed.keys():
        raise SystemExit("the two runs exported different tensors")
    difference = max((reference[k].float() - resumed[k].float()).abs().max().item() for k in reference)
    print(f"max abs difference of the exported weights: {difference:g} over {len(reference)} tensors")
    if difference != 0:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
