"""``python -m stepdistill bench-data``: time to the first training step and peak memory against the data's size.

    python -m stepdistill bench-data                       # 10k / 100k images, 1M / 10M prompts
    python -m stepdistill bench-data --image_counts 1000 --prompt_counts 10000 --work_dir /tmp/bench-data

Writes a folder of tiny captioned images (diffusers' ImageFolder layout, ``--image_size`` px, random
pixels) and a prompts file at each size, then runs ``recipes/dmd2.py`` for one step on each in its own
process: on the images with its GAN term (which reads real images), on the prompts without. It prints
the seconds from launching the recipe to its first logged step (Python start-up, teacher and data
opening, the first batch read and encoded, one step) and the process's peak resident memory, side by
side, so that whether either grows with the data is read off one table. Run it alone: another busy
process on the cores slows the times.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from stepdistill import config as configs
from stepdistill.assets import RECIPES_DIR
from stepdistill.config import field
from stepdistill.data import digits

RECIPE = RECIPES_DIR / "dmd2.py"


@dataclass
class BenchDataConfig:
    """Time to the first training step and peak RSS of a recipe on image folders and prompts files of several sizes."""

    image_counts: tuple[int, ...] = field((10_000, 100_000), "sizes of the image folders, comma-separated", at_least=1)
    prompt_counts: tuple[int, ...] = field((1_000_000, 10_000_000), "lines of the prompts files, comma-separated",
                                           at_least=1)
    image_size: int = field(16, "side of the generated images in px", at_least=1)
    work_dir: str | None = field(None, "where the data and runs go (default: a temporary folder, removed after)")
    num_threads: int = field(0, "CPU threads of each recipe run (0: all cores)", at_least=0)


def write_image_folders(root: Path, counts: tuple[int, ...], size: int) -> dict[int, Path]:
    """One ``images/`` folder of ``max(counts)`` random pictures, and per count a folder whose
    ``metadata.jsonl`` lists the first ``count`` of them."""
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    generator = np.random.default_rng(0)
    for index in range(max(counts)):
        path = images / f"{index:07d}.png"
        if not path.exists():
            Image.fromarray(generator.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
    folders = {}
    for count in counts:
        folder = root / f"folder-{count}"
        folder.mkdir(exist_ok=True)
        with (folder / "metadata.jsonl").open("w") as metadata:
            for index in range(count):
                metadata.write(json.dumps({"file_name": f"../images/{index:07d}.png",
                                           "text": digits.prompt_for(index % 10)}) + "\n")
        folders[count] = folder
    return folders


def write_prompts_file(root: Path, count: int) -> Path:
    path = root / f"prompts-{count}.txt"
    with path.open("w") as prompts:
        for start in range(0, count, 100_000):
            prompts.write("".join(f"{digits.prompt_for(i % 10)}, picture {i}\n"
                                  for i in range(start, min(count, start + 100_000))))
    return path


def first_step(flags: list[str], output_dir: Path, num_threads: int) -> tuple[float, float]:
    """Run the recipe for one step: seconds until its first logged step, and its peak RSS in MiB."""
    log = output_dir / "train_log.jsonl"
    command = [sys.executable, str(RECIPE), *flags, "--output_dir", str(output_dir), "--max_train_steps", "1",
               "--train_batch_size", "8", "--validation_steps", "0", "--eval_num_samples", "0", "--report_to", "none",
               "--num_threads", str(num_threads)]
    errors = output_dir.with_suffix(".log")
    began = time.perf_counter()
    with errors.open("w") as stderr:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr)
        seconds = None
        while True:  # wait4, not Popen.wait: it returns the child's own resource usage
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if seconds is None and log.is_file() and log.stat().st_size:
                seconds = time.perf_counter() - began
            time.sleep(0.05)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise SystemExit(f"error: {' '.join(command)} failed:\n{errors.read_text()[-2000:]}")
    return seconds or time.perf_counter() - began, usage.ru_maxrss / 1024  # Linux: kB


def main(argv: list[str] | None = None) -> None:
    cfg = configs.parse(BenchDataConfig, argv, prog="python -m stepdistill bench-data")
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(cfg.work_dir or scratch)
        root.mkdir(parents=True, exist_ok=True)
        began = time.perf_counter()
        folders = write_image_folders(root, cfg.image_counts, cfg.image_size)
        prompts = {count: write_prompts_file(root, count) for count in cfg.prompt_counts}
        print(f"data written in {time.perf_counter() - began:.0f} s", flush=True)
        rows = []
        for count, folder in folders.items():
            flags = ["--train_data_dir", str(folder), "--gan_generator_weight", "0.1", "--gan_critic_weight", "0.1"]
            rows.append((f"image folder ({cfg.image_size} px)", count, *first_step(flags, root / f"run-images-{count}",
                                                                                   cfg.num_threads)))
        for count, path in prompts.items():
            flags = ["--prompts_file", str(path), "--gan_generator_weight", "0", "--gan_critic_weight", "0"]
            rows.append(("prompts file", count, *first_step(flags, root / f"run-prompts-{count}", cfg.num_threads)))
    print("| data | examples | seconds to the first step | peak RSS (MiB) |\n| --- | --- | --- | --- |")
    for name, count, seconds, rss in rows:
        print(f"| {name} | {count:,} | {seconds:.1f} | {rss:.0f} |")
