"""``python -m stepdistill bench``: every recipe on the shipped digits teacher, scored side by side.

    python -m stepdistill bench                       # the README's Results (about an hour on 2 CPU cores)
    python -m stepdistill bench --recipes dmd2 --max_train_steps 2 --num_samples 20 --teacher_steps 1,50

Each recipe trains with its own defaults (its step budget is part of the recipe) in a process of
its own, validating every ``--validation_steps``. Then every exported student is loaded as plain
diffusers loads it and sampled at ``--student_steps``, and the teacher at ``--teacher_steps`` ×
``--teacher_guidance_scales``, all in this one process, on the same prompts and initial noise and
with the same evaluator (FD-digits against the held-out split, prompt accuracy). Speed-ups are
ratios of images/s measured here, one after the other, beside the ratio of network evaluations.

Writes to ``--output_dir``: ``results.json`` (everything), ``results.md`` (the tables of the README's
Results), ``fd_vs_sampling_steps.png``, ``fd_vs_training_time.png`` and ``fd_vs_training_steps.png``
(validation FD-digits as training went on), ``grids.png`` (samples side by
side), the sample grids and, under ``runs/``, each recipe's own output folder and log.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from stepdistill import config as configs
from stepdistill import export
from stepdistill.assets import DIGITS_TEACHER, RECIPES_DIR
from stepdistill.config import ConfigError, field
from stepdistill.data import digits
from stepdistill.evaluation import plots, report
from stepdistill.evaluation.digits_metrics import DigitsEvaluator
from stepdistill.models.loading import load_pipeline

BENCHMARKED_RECIPES = ("dmd2", "consistency", "sid")


class RecipeFailed(RuntimeError):
    """A recipe's process ended with an error; the message quotes the end of its log."""


@dataclass
class BenchConfig:
    """Train every recipe on the digits teacher and score students and teacher side by side."""

    recipes: tuple[str, ...] = field(BENCHMARKED_RECIPES, "recipes to run, comma-separated (files in recipes/)")
    output_dir: str = field("benchmarks/results", "where results.json, results.md, plots and runs/ go")
    student_steps: tuple[int, ...] = field((1, 2, 4, 8), "sampling steps every student is scored at")
    teacher_steps: tuple[int, ...] = field((1, 2, 4, 8, 25, 50), "DDIM steps the teacher is scored at")
    teacher_guidance_scales: tuple[float, ...] = field((1.0, 1.5), "teacher CFG scales (1.5: its best, distilled by default)")
    num_samples: int = field(1000, "images per setting and per validation (digit prompts cycle 0..9)")
    max_train_steps: int | None = field(None, "override every recipe's step budget (default: each recipe's own)")
    validation_steps: int = field(50, "validate every recipe every N steps (the FD-against-time curve)")
    recipe_flags: str = field("", "more flags for every recipe, e.g. '--train_batch_size 8'")
    seed: int = field(0, "seed of every recipe and of the evaluation noise")

    def validate(self) -> None:
        for recipe in self.recipes:
            if not (RECIPES_DIR / f"{recipe}.py").is_file():
                known = ", ".join(sorted(p.stem for p in RECIPES_DIR.glob("*.py") if p.stem != "__init__"))
                raise ConfigError(f"--recipes: no recipe {recipe!r} ({RECIPES_DIR} holds {known})")
        if self.num_samples < 2:
            raise ConfigError(f"--num_samples must be ≥ 2, as Fréchet distances need two samples (got {self.num_samples})")
        for name in ("student_steps", "teacher_steps"):
            if not getattr(self, name) or min(getattr(self, name)) < 1:
                raise ConfigError(f"--{name} must be ≥ 1 (got {getattr(self, name)})")
        if not self.teacher_guidance_scales or min(self.teacher_guidance_scales) < 0:
            raise ConfigError(f"--teacher_guidance_scales must be ≥ 0 (got {self.teacher_guidance_scales})")
        if self.max_train_steps is not None and self.max_train_steps < 1:
            raise ConfigError(f"--max_train_steps must be ≥ 1 (got {self.max_train_steps})")
        if self.validation_steps < 0:
            raise ConfigError(f"--validation_steps must be ≥ 0 (got {self.validation_steps})")
        configs.require_writable_dir(self.output_dir, "--output_dir")


def machine() -> dict:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return {
        "cpu": cpu, "cpu_cores": os.cpu_count(), "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def train_recipe(cfg: BenchConfig, recipe: str, run_dir: Path) -> dict:
    """Run ``recipes/<recipe>.py`` in its own process (its log in ``<run_dir>.log``); its ``report.json``."""
    flags = ["--output_dir", str(run_dir), "--seed", str(cfg.seed), "--eval_num_samples", "0",
             "--validation_steps", str(cfg.validation_steps), "--num_validation_images", str(cfg.num_samples)]
    if cfg.max_train_steps is not None:
        flags += ["--max_train_steps", str(cfg.max_train_steps)]
    command = [sys.executable, str(RECIPES_DIR / f"{recipe}.py"), *flags, *shlex.split(cfg.recipe_flags)]
    log_path = run_dir.with_suffix(".log")
    print(f"[bench] training {recipe}: {' '.join(command[1:])}  (log: {log_path})", flush=True)
    began = time.perf_counter()
    with log_path.open("w") as log:
        finished = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT)
    if finished.returncode != 0:
        tail = log_path.read_text().replace("\r", "\n").strip().splitlines()[-5:]
        raise RecipeFailed(f"recipe {recipe} failed (exit {finished.returncode}); the end of {log_path}:\n" + "\n".join(tail))
    outcome = json.loads((run_dir / "report.json").read_text())
    outcome["wall_seconds"] = time.perf_counter() - began  # process start to end: loading, validation, export
    return outcome


def _ratio_rows(results: list[report.Result], reference: report.Result) -> list[dict]:
    """Each result with its FD ratio to ``reference`` and its speed-up over it (wall clock and NFE)."""
    return [
        {**asdict(r), "fd_ratio_to_teacher": r.fd_digits / reference.fd_digits,
         "speedup_wall": r.images_per_s / reference.images_per_s, "speedup_nfe": reference.nfe / r.nfe}
        for r in results
    ]


def train_copies_cell(row: dict) -> str:
    """The train-copy share of a results row; results.json files written before it existed have none."""
    share = row.get("train_copy_share")
    return "–" if share is None else f"{share:.3f}"


def markdown(summary: dict) -> str:
    """The README's Results tables from a ``results.json`` summary."""
    m, reference = summary["machine"], summary["reference"]
    lines = [
        f"Measured {m['date']} on {m['cpu']} ({m['cpu_cores']} cores{', ' + m['gpu'] if m['gpu'] else ''}), "
        f"torch {m['torch']}, by `{summary['command']}`. {summary['num_samples']:,} samples per row; "
        f"real-vs-real FD-digits floor {summary['real_vs_real_fd_digits']:.3f}. Ratios are against the teacher's "
        f"{reference['num_inference_steps']}-step CFG {reference['guidance_scale']:g} row "
        f"(FD {reference['fd_digits']:.3f}); speed-ups are images/s ratios measured in the same run, beside the NFE ratio.",
        "",
        "| model | steps | CFG | NFE | FD-digits | FD / teacher | prompt acc. | train copies | images/s | speed-up (wall) | speed-up (NFE) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary["results"]:
        lines.append(
            f"| {r['model']} | {r['num_inference_steps']} | {r['guidance_scale']:g} | {r['nfe']} | {r['fd_digits']:.3f} | "
            f"{r['fd_ratio_to_teacher']:.2f}× | {r['prompt_accuracy']:.3f} | {train_copies_cell(r)} | {r['images_per_s']:.1f} | "
            f"{r['speedup_wall']:.1f}× | {r['speedup_nfe']:.0f}× |"
        )
    lines += ["", "| recipe | training steps | training time (min) | steps/s | peak RSS (GiB) | best validation FD (step) |",
              "|---|---|---|---|---|---|"]
    for name, run in summary["recipes"].items():
        training = run["training"]
        curve = run["validation_curve"]
        best = min(curve, key=lambda point: point[2]) if curve else None
        lines.append(
            f"| {name} | {training['steps']} | {training['seconds'] / 60:.1f} | {training['steps_per_second']:.2f} | "
            f"{training['peak_memory_bytes'] / 2**30:.2f} | "
            + (f"{best[2]:.3f} ({best[0]}) |" if best else "– |")
        )
    return "\n".join(lines) + "\n"


def run(cfg: BenchConfig, command: str = "python -m stepdistill bench") -> dict:
    output_dir = Path(cfg.output_dir)
    (output_dir / "runs").mkdir(parents=True, exist_ok=True)
    # 1. train every recipe, each in its own process (clean timings and peak memory)
    runs = {recipe: train_recipe(cfg, recipe, output_dir / "runs" / recipe) for recipe in cfg.recipes}

    # 2. score every student and the teacher here, on the same prompts, noise and evaluator
    prompts = digits.evaluation_prompts(cfg.num_samples)
    scorers = report.Scorers(digits=DigitsEvaluator())
    grids = output_dir / "grids"
    results: list[report.Result] = []
    for recipe in cfg.recipes:
        print(f"[bench] scoring {recipe} at {cfg.student_steps} steps", flush=True)
        student, guidance_scale = export.load_student(output_dir / "runs" / recipe / "student")
        results += report.evaluate(student, recipe, cfg.student_steps, (guidance_scale,), prompts, scorers, grids, seed=cfg.seed)
    print(f"[bench] scoring the teacher at {cfg.teacher_steps} steps, CFG {cfg.teacher_guidance_scales}", flush=True)
    teacher = load_pipeline(str(DIGITS_TEACHER))
    results += report.evaluate(teacher, "teacher", cfg.teacher_steps, cfg.teacher_guidance_scales, prompts, scorers,
                               grids, seed=cfg.seed)

    # 3. ratios against the teacher's most-step best-guidance row; tables, plots, JSON
    floor = scorers.digits.real_floor(cfg.num_samples)
    most_steps = max(cfg.teacher_steps)
    reference = min((r for r in results if r.model == "teacher" and r.num_inference_steps == most_steps),
                    key=lambda r: r.fd_digits)
    summary = {
        "command": command, "machine": machine(), "config": asdict(cfg), "num_samples": cfg.num_samples,
        "real_vs_real_fd_digits": floor, "reference": asdict(reference),
        "results": _ratio_rows(results, reference),
        "recipes": {
            recipe: {"training": outcome["training"], "wall_seconds": outcome["wall_seconds"], "config": outcome["config"],
                     "validation_curve": plots.validation_curve(output_dir / "runs" / recipe / "train_log.jsonl")}
            for recipe, outcome in runs.items()
        },
    }
    (output_dir / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    (output_dir / "results.md").write_text(markdown(summary))
    draw(summary, output_dir)
    draw_grids(summary, output_dir)
    print(markdown(summary))
    print(f"[bench] wrote {output_dir / 'results.json'}, results.md and plots")
    return summary


def draw(summary: dict, output_dir: Path) -> None:
    """FD-digits against sampling steps and during training (against time and steps), from a summary (``compare_recipes.ipynb``
    draws them from ``results.json``)."""
    levels = {
        f"teacher, {summary['reference']['num_inference_steps']} steps": summary["reference"]["fd_digits"],
        "real vs real": summary["real_vs_real_fd_digits"],
    }
    by_model: dict[str, list[tuple[int, float]]] = {}
    for r in summary["results"]:
        name = r["model"] if r["model"] != "teacher" else f"teacher, CFG {r['guidance_scale']:g}"
        by_model.setdefault(name, []).append((r["num_inference_steps"], r["fd_digits"]))
    plots.plot_fd_against_sampling_steps(by_model, output_dir / "fd_vs_sampling_steps.png", levels)
    runs = summary["recipes"].items()
    minutes = {name: [(seconds / 60, fd) for _, seconds, fd in run["validation_curve"]] for name, run in runs}
    plots.plot_fd_during_training(minutes, output_dir / "fd_vs_training_time.png",
                                  "training time (min, validation excluded)", levels)
    steps = {name: [(step, fd) for step, _, fd in run["validation_curve"]] for name, run in runs}
    plots.plot_fd_during_training(steps, output_dir / "fd_vs_training_steps.png", "training step", levels)


def draw_grids(summary: dict, output_dir: Path) -> None:
    """``grids.png``: the teacher's reference samples beside each student's at 1 and 4 steps."""
    reference = summary["reference"]
    images = {f"teacher, {reference['num_inference_steps']} steps, CFG {reference['guidance_scale']:g}":
              output_dir / "grids" / f"grid_teacher_steps{reference['num_inference_steps']}_cfg{reference['guidance_scale']:g}.png"}
    for r in summary["results"]:
        if r["model"] != "teacher" and r["num_inference_steps"] in (1, 4):
            step_word = "step" if r["num_inference_steps"] == 1 else "steps"
            images[f"{r['model']}, {r['num_inference_steps']} {step_word}"] = (
                output_dir / "grids" / f"grid_{r['model']}_steps{r['num_inference_steps']}_cfg{r['guidance_scale']:g}.png")
    plots.side_by_side(images, output_dir / "grids.png")


def command_main(config_cls: type, run_fn, command: str, argv: list[str] | None) -> None:
    """``python -m stepdistill <command>``: parse the flags, run, and end bad input or a failed recipe
    with one ``error:`` line; the results record the command as typed."""
    argv = sys.argv[1:] if argv is None else argv
    cfg = configs.parse(config_cls, argv, prog=f"python -m stepdistill {command}")
    try:
        run_fn(cfg, command=shlex.join(["python", "-m", "stepdistill", command, *argv]))
    except (ConfigError, RecipeFailed) as error:
        raise SystemExit(f"error: {error}") from None


def main(argv: list[str] | None = None) -> None:
    command_main(BenchConfig, run, "bench", argv)
