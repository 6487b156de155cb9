"""``python -m stepdistill bench``: every recipe on a shipped digits teacher, scored side by side.

    python -m stepdistill bench                       # the bars' protocol (hours on 2 CPU cores; the
                                                      # teacher's rows, half of it, are cached after)
    python -m stepdistill bench --teacher digits-sd3 --output_dir benchmarks/results_sd3   # the flow teacher
    python -m stepdistill bench --recipes dmd2,dmd2:dmd2_cfg125   # a preset beside the default, named after it
    python -m stepdistill bench --recipes dmd2 --max_train_steps 2 --num_samples 20 --seeds 0 --teacher_steps 1,50
    python -m stepdistill bench --jobs 2 --reuse_runs true   # two recipes at a time; resumes a stopped bench

Each recipe trains with its own defaults (its step budget is part of the recipe), or a shipped
preset's (``RECIPE:PRESET``), in a process of its own (``--jobs`` of them at once), validating every
``--validation_steps``, on ``--teacher`` (the ε UNet ``digits`` or the flow-matching MMDiT
``digits-sd3``; it overrides the preset's teacher); ``--reuse_runs`` keeps the runs that finished
before with the same flags, teacher weights and code. Then every exported student is loaded as plain
diffusers loads it and sampled at ``--student_steps``, and the teacher at ``--teacher_steps`` ×
``--teacher_guidance_scales``, all in this one process, on the same prompts and, per sampling seed
(``--seeds``, the protocol's 0 and 1 at 5,000 samples), the same initial noise, with the same
evaluator (FD-digits against the held-out split, prompt accuracy); ratios are taken at the same
seed. The teacher's rows are kept in ``teacher_rows.json`` and their scores reused while the teacher,
the evaluator, the sample count and the seed stay the same (their speed is measured again). Speed-ups
are ratios of images/s measured one after the other, beside the ratio of network evaluations.

Writes to ``--output_dir``: ``results.json`` (everything), ``results.md`` (the tables of the README's
Results), ``fd_vs_sampling_steps.png``, ``fd_vs_training_time.png`` and ``fd_vs_training_steps.png``
(validation FD-digits as training went on), ``grids.png`` (samples side by
side), the sample grids and, under ``runs/``, each recipe's own output folder and log.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from stepdistill import config as configs
from stepdistill import export
from stepdistill.assets import (DIGITS_CLASSIFIER, RECIPES_DIR, SHIPPED_TEACHERS, pipeline_location, recipe_presets,
                                shipped_best_guidance)
from stepdistill.config import ConfigError, field
from stepdistill.data import digits
from stepdistill.evaluation import plots, report
from stepdistill.evaluation.digits_metrics import DigitsEvaluator
from stepdistill.evaluation.grid import save_grid
from stepdistill.evaluation.sampling import generate
from stepdistill.models.loading import load_pipeline

BENCHMARKED_RECIPES = ("dmd2", "consistency", "sid")
TIMING_SAMPLES = 250  # a cached teacher row is timed again on one sampling batch (~25 s at 50 steps, CFG 1.5)


class RecipeFailed(RuntimeError):
    """A recipe's process ended with an error; the message quotes the end of its log."""


@dataclass
class BenchConfig:
    """Train every recipe on the digits teacher and score students and teacher side by side."""

    recipes: tuple[str, ...] = field(BENCHMARKED_RECIPES, "recipes to run, comma-separated (files in recipes/); "
                                     "RECIPE:PRESET runs a recipe with --config PRESET, its rows named after the preset")
    teacher: str = field("digits", "the shipped teacher every recipe distils and the teacher rows score: digits (ε "
                                   "UNet) or digits-sd3 (flow-matching MMDiT)", choices=tuple(SHIPPED_TEACHERS))
    output_dir: str = field("benchmarks/results", "where results.json, results.md, plots and runs/ go")
    student_steps: tuple[int, ...] = field((1, 2, 4, 8), "sampling steps every student is scored at")
    teacher_steps: tuple[int, ...] = field((1, 2, 4, 8, 25, 50), "steps of its own sampler (DDIM, Euler) the teacher "
                                                                 "is scored at")
    teacher_guidance_scales: tuple[float, ...] | None = field(None, "teacher CFG scales (default: 1 and the teacher's "
                                                                    "best, which the recipes distil by default)")
    num_samples: int = field(5000, "images per row (digit prompts cycle 0..9; the bars' protocol: 5,000)")
    seeds: tuple[int, ...] = field((0, 1), "sampling seeds every row is scored at (the bars' protocol: 0 and 1)")
    cache_teacher_rows: bool = field(True, "reuse teacher rows scored before on the same teacher, evaluator, samples "
                                           "and seed (kept in <output_dir>/teacher_rows.json)")
    max_train_steps: int | None = field(None, "override every recipe's step budget (default: each recipe's own)")
    validation_steps: int = field(50, "validate every recipe every N steps (the FD-against-time curve)")
    validation_samples: int = field(1000, "images per validation")
    recipe_flags: str = field("", "more flags for every recipe, e.g. '--train_batch_size 8'")
    jobs: int = field(1, "recipes trained at once, each in its own process with a share of the cores (unless "
                         "--recipe_flags sets --num_threads); the training times are then measured side by side")
    reuse_runs: bool = field(False, "keep a run of <output_dir>/runs/ that finished before with the same recipe, "
                                    "flags, teacher weights and code instead of training it again (a bench stopped "
                                    "while scoring resumes there); it keeps the training time it recorded")
    seed: int = field(0, "seed of every recipe's training")

    def __post_init__(self) -> None:
        if self.teacher_guidance_scales is None:
            self.teacher_guidance_scales = tuple(dict.fromkeys((1.0, shipped_best_guidance(self.teacher))))

    @property
    def runs(self) -> dict[str, tuple[str, str | None]]:
        """Each ``--recipes`` entry by the name its rows and run folder take: (recipe, preset or None)."""
        runs = {}
        for entry in self.recipes:
            recipe, _, preset = entry.partition(":")
            runs[preset or recipe] = (recipe, preset or None)
        return runs

    @property
    def teacher_path(self) -> Path:
        return Path(pipeline_location(self.teacher))

    def validate(self) -> None:
        if len(self.runs) < len(self.recipes):
            raise ConfigError(f"--recipes names a run twice ({','.join(self.recipes)}); each recipe or preset once")
        for recipe, preset in self.runs.values():
            if not (RECIPES_DIR / f"{recipe}.py").is_file():
                known = ", ".join(sorted(p.stem for p in RECIPES_DIR.glob("*.py") if p.stem != "__init__"))
                raise ConfigError(f"--recipes: no recipe {recipe!r} ({RECIPES_DIR} holds {known})")
            if preset is not None and preset not in recipe_presets(recipe):
                raise ConfigError(f"--recipes: {recipe} has no preset {preset!r} (its presets: "
                                  f"{', '.join(recipe_presets(recipe)) or 'none'})")
        if self.num_samples < 2 or self.validation_samples < 2:
            raise ConfigError("--num_samples and --validation_samples must be ≥ 2, as Fréchet distances need two "
                              f"samples (got {self.num_samples}, {self.validation_samples})")
        if not self.seeds:
            raise ConfigError("--seeds needs at least one seed")
        for name in ("student_steps", "teacher_steps"):
            if not getattr(self, name) or min(getattr(self, name)) < 1:
                raise ConfigError(f"--{name} must be ≥ 1 (got {getattr(self, name)})")
        if not self.teacher_guidance_scales or min(self.teacher_guidance_scales) < 0:
            raise ConfigError(f"--teacher_guidance_scales must be ≥ 0 (got {self.teacher_guidance_scales})")
        if self.max_train_steps is not None and self.max_train_steps < 1:
            raise ConfigError(f"--max_train_steps must be ≥ 1 (got {self.max_train_steps})")
        if self.jobs < 1:
            raise ConfigError(f"--jobs must be ≥ 1 (got {self.jobs})")
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


_PRINTING = threading.Lock()


def say(line: str) -> None:
    """Print one whole line (recipes train on several threads with ``--jobs``)."""
    with _PRINTING:
        print(line, flush=True)


def code_digest() -> str:
    """The first 16 hex digits of a SHA-256 over the library's and the recipes' sources and presets:
    which code a run was trained with."""
    files = {*Path(__file__).parent.rglob("*.py"), *RECIPES_DIR.rglob("*.py"), *RECIPES_DIR.rglob("*.yaml")}
    digest = hashlib.sha256()
    for path in sorted(files):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def recipe_flags(cfg: BenchConfig, preset: str | None) -> list[str]:
    """The flags a run of the bench trains with, but its ``--output_dir``; with ``--jobs`` > 1 and no
    ``--num_threads`` of the user's, each recipe gets its share of the cores."""
    flags = [*(("--config", preset) if preset else ()),
             "--pretrained_model_name_or_path", cfg.teacher, "--seed", str(cfg.seed),
             "--eval_num_samples", "0",
             "--validation_steps", str(cfg.validation_steps), "--num_validation_images", str(cfg.validation_samples)]
    if cfg.max_train_steps is not None:
        flags += ["--max_train_steps", str(cfg.max_train_steps)]
    user_flags = shlex.split(cfg.recipe_flags)
    if cfg.jobs > 1 and "--num_threads" not in user_flags:
        flags += ["--num_threads", str(max(1, (os.cpu_count() or 1) // cfg.jobs))]
    return flags + user_flags


def train_recipe(cfg: BenchConfig, recipe: str, preset: str | None, run_dir: Path) -> dict:
    """Run ``recipes/<recipe>.py`` (from ``preset`` when given) in its own process (its log in
    ``<run_dir>.log``) in a fresh ``run_dir``; its ``report.json`` and the process's wall-clock
    seconds. With ``--reuse_runs``, a run that finished with the same recipe, flags, teacher weights
    and code (``<run_dir>/bench_run.json``) is kept as it is."""
    flags = recipe_flags(cfg, preset)
    identity = {"recipe": recipe, "flags": flags, "teacher": file_digest(teacher_weights(cfg)), "code": code_digest()}
    record_path = run_dir / "bench_run.json"
    if cfg.reuse_runs and run_dir.is_dir():
        finished = record_path.is_file() and (run_dir / "report.json").is_file()
        record = json.loads(record_path.read_text()) if finished else {}
        if {key: record.get(key) for key in identity} == identity:
            say(f"[bench] reusing {run_dir} (trained {record['finished']} by the same code and flags)")
            return {**json.loads((run_dir / "report.json").read_text()), **record, "reused": True}
        say(f"[bench] {run_dir} holds no finished run of this code and these flags: training it again")
    shutil.rmtree(run_dir, ignore_errors=True)  # no earlier run's log, checkpoints or student mixed in
    command = [sys.executable, str(RECIPES_DIR / f"{recipe}.py"), "--output_dir", str(run_dir), *flags]
    log_path = run_dir.with_suffix(".log")
    say(f"[bench] training {run_dir.name}: {' '.join(command[1:])}  (log: {log_path})")
    began = time.perf_counter()
    with log_path.open("w") as log:
        finished = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT)
    if finished.returncode != 0:
        tail = log_path.read_text().replace("\r", "\n").strip().splitlines()[-5:]
        raise RecipeFailed(f"recipe {run_dir.name} failed (exit {finished.returncode}); the end of {log_path}:\n"
                           + "\n".join(tail))
    record = {**identity, "wall_seconds": time.perf_counter() - began,  # process start to end: loading, export
              "finished": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    partial = record_path.with_suffix(".partial")
    partial.write_text(json.dumps(record, indent=1) + "\n")
    partial.replace(record_path)  # written whole or not at all: a run without it is trained again
    return {**json.loads((run_dir / "report.json").read_text()), **record, "reused": False}


def train_all(cfg: BenchConfig, runs_dir: Path) -> dict[str, dict]:
    """Every run of ``--recipes`` trained, ``--jobs`` at a time, by name in the order given. A failed
    recipe is reported at once and no other starts; those training beside it finish (and are kept
    for ``--reuse_runs``)."""
    waiting, running, outcomes = list(cfg.runs.items()), {}, {}
    with ThreadPoolExecutor(max_workers=cfg.jobs) as pool:
        while waiting or running:
            while waiting and len(running) < cfg.jobs:
                name, (recipe, preset) = waiting.pop(0)
                running[pool.submit(train_recipe, cfg, recipe, preset, runs_dir / name)] = name
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for job in done:
                name = running.pop(job)
                if job.exception() is not None:
                    say(f"[bench] {job.exception()}".splitlines()[0] + ": stopping once the recipes training now end")
                    raise job.exception()
                outcomes[name] = job.result()
    return {name: outcomes[name] for name in cfg.runs}


def _ratio_rows(results: list[report.Result], references: dict[int, report.Result]) -> list[dict]:
    """Each result with its FD ratio to the reference row of its seed and its speed-up over it (wall
    clock and NFE)."""
    rows = []
    for r in results:
        reference = references[r.seed]
        rows.append({**asdict(r), "fd_ratio_to_teacher": r.fd_digits / reference.fd_digits,
                     "speedup_wall": r.images_per_s / reference.images_per_s, "speedup_nfe": reference.nfe / r.nfe})
    return rows


def teacher_weights(cfg: BenchConfig) -> Path:
    """The shipped teacher's denoiser weights (a UNet's or a transformer's)."""
    network = next(cfg.teacher_path / part for part in ("unet", "transformer") if (cfg.teacher_path / part).is_dir())
    return network / "diffusion_pytorch_model.safetensors"


def file_digest(path: Path) -> str:
    """The first 16 hex digits of a file's SHA-256: which weights a cached row was scored with."""
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def teacher_rows(cfg: BenchConfig, prompts: list[str], scorers: report.Scorers, grids: Path, seed: int) -> list[report.Result]:
    """The teacher's rows at ``seed``: every (steps, CFG) of the config, from ``teacher_rows.json`` when
    scored before on the same teacher weights, evaluator, samples and seed (``--cache_teacher_rows``),
    else scored now and added there. A cached row keeps its scores; its images/s is measured again now,
    on the first ``TIMING_SAMPLES`` prompts, so that speed-ups stay ratios of one run's timings."""
    cache_path = Path(cfg.output_dir) / "teacher_rows.json"
    cache = json.loads(cache_path.read_text()) if cfg.cache_teacher_rows and cache_path.is_file() else {}
    identity = {"teacher": file_digest(teacher_weights(cfg)),
                "evaluator": file_digest(DIGITS_CLASSIFIER), "num_samples": cfg.num_samples, "seed": seed}

    def key(steps: int, scale: float) -> str:
        return json.dumps({**identity, "steps": steps, "guidance_scale": scale}, sort_keys=True)

    teacher = load_pipeline(cfg.teacher_path)
    rows = []
    for scale in cfg.teacher_guidance_scales:
        missing = tuple(steps for steps in cfg.teacher_steps if key(steps, scale) not in cache)
        if missing:
            print(f"[bench] scoring the teacher at {missing} steps, CFG {scale:g}, seed {seed}", flush=True)
            for result in report.evaluate(teacher, "teacher", missing, (scale,), prompts, scorers, grids, seed=seed):
                cache[key(result.num_inference_steps, scale)] = asdict(result)
        for steps in cfg.teacher_steps:
            row = report.Result(**cache[key(steps, scale)])
            if steps not in missing:
                timed = prompts[:TIMING_SAMPLES]
                images, seconds = generate(teacher, timed, steps, scale, seed=seed)
                row.images_per_s = len(timed) / seconds
                save_grid(images[:100], grids / f"grid_teacher_steps{steps}_cfg{scale:g}.png")  # as evaluate draws it
            rows.append(row)
    if cfg.cache_teacher_rows:
        cache_path.write_text(json.dumps(cache, indent=1, sort_keys=True) + "\n")
    return rows


def train_copies_cell(row: dict) -> str:
    """The train-copy share of a results row; results.json files written before it existed have none."""
    share = row.get("train_copy_share")
    return "–" if share is None else f"{share:.3f}"


def by_setting(summary: dict) -> dict[tuple, list[dict]]:
    """The rows of each (model, steps, CFG), one per seed in the order scored (a summary written before
    rows had seeds has one each)."""
    grouped: dict[tuple, list[dict]] = {}
    for row in summary["results"]:
        grouped.setdefault((row["model"], row["num_inference_steps"], row["guidance_scale"]), []).append(row)
    return grouped


def markdown(summary: dict) -> str:
    """The README's Results tables from a ``results.json`` summary: a row per (model, steps, CFG), with
    quality at every seed (``a / b``) and speed from the first."""
    m, reference = summary["machine"], summary["reference"]
    seeds = summary["config"].get("seeds", [summary["config"]["seed"]])
    references = " / ".join(f"{row['fd_digits']:.3f}" for row in summary.get("references", {"": reference}).values())
    lines = [
        f"Measured {m['date']} on {m['cpu']} ({m['cpu_cores']} cores{', ' + m['gpu'] if m['gpu'] else ''}), "
        f"torch {m['torch']}, by `{summary['command']}`. {summary['num_samples']:,} samples per row at sampling "
        f"seed{'s' if len(seeds) > 1 else ''} {' / '.join(str(seed) for seed in seeds)}; real-vs-real FD-digits floor "
        f"{summary['real_vs_real_fd_digits']:.3f}. Ratios are against the teacher's "
        f"{reference['num_inference_steps']}-step CFG {reference['guidance_scale']:g} row at the same seed "
        f"(FD {references}); speed-ups are images/s ratios at the first seed, beside the NFE ratio (a teacher row "
        f"reused from `teacher_rows.json` is timed again on {TIMING_SAMPLES} of the prompts).",
        "",
        "| model | steps | CFG | NFE | FD-digits | FD / teacher | prompt acc. | train copies | images/s | speed-up (wall) | speed-up (NFE) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (model, steps, scale), rows in by_setting(summary).items():
        first = rows[0]
        fd, ratio, accuracy = (" / ".join(form.format(r[name]) for r in rows) for name, form in
                               (("fd_digits", "{:.3f}"), ("fd_ratio_to_teacher", "{:.2f}×"), ("prompt_accuracy", "{:.3f}")))
        lines.append(
            f"| {model} | {steps} | {scale:g} | {first['nfe']} | {fd} | {ratio} | {accuracy} | {train_copies_cell(first)} | "
            f"{first['images_per_s']:.1f} | {first['speedup_wall']:.1f}× | {first['speedup_nfe']:.0f}× |"
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
    at_once = min(summary["config"].get("jobs", 1), len(summary["recipes"]))
    if at_once > 1:
        lines += ["", f"Trained {at_once} recipes at a time: the training times were measured side by side."]
    reused = [f"{name} ({run['finished']})" for name, run in summary["recipes"].items() if run.get("reused")]
    if reused:
        lines += ["", f"Kept from an earlier run of the bench (`--reuse_runs`), with the training times measured "
                      f"then: {', '.join(reused)}."]
    return "\n".join(lines) + "\n"


def run(cfg: BenchConfig, command: str = "python -m stepdistill bench") -> dict:
    output_dir = Path(cfg.output_dir)
    (output_dir / "runs").mkdir(parents=True, exist_ok=True)
    # 1. train every recipe, each in its own process (its own timings and peak memory)
    runs = train_all(cfg, output_dir / "runs")

    # 2. score every student and the teacher, at every seed on the same prompts, noise and evaluator
    prompts = digits.evaluation_prompts(cfg.num_samples)
    scorers = report.Scorers(digits=DigitsEvaluator())
    grids = output_dir / "grids"
    results: list[report.Result] = []
    for seed in cfg.seeds:
        for name in cfg.runs:
            print(f"[bench] scoring {name} at {cfg.student_steps} steps, seed {seed}", flush=True)
            student, guidance_scale = export.load_student(output_dir / "runs" / name / "student")
            results += report.evaluate(student, name, cfg.student_steps, (guidance_scale,), prompts, scorers, grids,
                                       seed=seed)
        results += teacher_rows(cfg, prompts, scorers, grids, seed)

    # 3. ratios against the teacher's most-step best-guidance row at the same seed; tables, plots, JSON
    floor = scorers.digits.real_floor(cfg.num_samples)
    most_steps = max(cfg.teacher_steps)
    references = {seed: min((r for r in results if r.model == "teacher" and r.num_inference_steps == most_steps
                             and r.seed == seed), key=lambda r: r.fd_digits) for seed in cfg.seeds}
    summary = {
        "command": command, "machine": machine(), "config": asdict(cfg), "num_samples": cfg.num_samples,
        "real_vs_real_fd_digits": floor, "reference": asdict(references[cfg.seeds[0]]),
        "references": {str(seed): asdict(row) for seed, row in references.items()},
        "results": _ratio_rows(results, references),
        "recipes": {
            recipe: {"training": outcome["training"], "wall_seconds": outcome["wall_seconds"],
                     "finished": outcome["finished"], "reused": outcome["reused"], "config": outcome["config"],
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
    for (model, steps, scale), rows in by_setting(summary).items():  # at the first seed
        name = model if model != "teacher" else f"teacher, CFG {scale:g}"
        by_model.setdefault(name, []).append((steps, rows[0]["fd_digits"]))
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
    for rows in by_setting(summary).values():
        r = rows[0]
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
