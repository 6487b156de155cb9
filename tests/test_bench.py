"""``python -m stepdistill bench`` end to end at a tiny budget, and its bad input."""

from __future__ import annotations

import json
import math
import shutil
import threading
from dataclasses import replace

import pytest
import torch
from notebook_runner import execute, printed

from stepdistill import bench, bench_data
from stepdistill.assets import DIGITS_TEACHER_SD3
from stepdistill.config import ConfigError
from stepdistill.data import digits
from stepdistill.evaluation import report
from stepdistill.evaluation.digits_metrics import DigitsEvaluator

RECIPE_FLAGS = "--train_batch_size 4 --num_threads 1"


def tiny_bench(output_dir, **changes) -> bench.BenchConfig:
    """Every recipe for one step, trained two at a time, scored on 20 samples at two seeds."""
    return bench.BenchConfig(**{
        "output_dir": str(output_dir), "max_train_steps": 1, "num_samples": 20, "validation_samples": 20,
        "seeds": (0, 1), "student_steps": (1, 2), "teacher_steps": (1, 2), "teacher_guidance_scales": (1.5,),
        "validation_steps": 1, "recipe_flags": RECIPE_FLAGS, "jobs": 2, **changes})


@pytest.fixture(scope="module")
def summary(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("bench")
    cfg = tiny_bench(output_dir)
    cfg.validate()
    return bench.run(cfg), output_dir


@pytest.mark.slow
def test_bench_trains_every_recipe_and_scores_side_by_side(summary):
    result, output_dir = summary
    assert list(result["recipes"]) == list(bench.BENCHMARKED_RECIPES)  # in the order given, though trained 2 at once
    assert not any(run["reused"] for run in result["recipes"].values())
    for name, run in result["recipes"].items():
        assert run["training"]["steps"] == 1, name
        assert run["training"]["peak_memory_bytes"] > 2**20, name  # a real RSS, in bytes
        assert [step for step, _, _ in run["validation_curve"]] == [1], name
    rows = {(r["model"], r["num_inference_steps"], r["seed"]): r for r in result["results"]}
    assert len(rows) == len(result["results"]) == (3 * 2 + 2) * 2  # every setting at both seeds
    for seed in (0, 1):
        reference = rows[("teacher", 2, seed)]  # the most-step teacher row at its best guidance, per seed
        assert result["references"][str(seed)]["fd_digits"] == reference["fd_digits"]
        assert reference["fd_ratio_to_teacher"] == 1 and reference["speedup_wall"] == 1
        assert rows[("dmd2", 1, seed)]["fd_ratio_to_teacher"] == rows[("dmd2", 1, seed)]["fd_digits"] / reference["fd_digits"]
    assert rows[("dmd2", 1, 0)]["fd_digits"] != rows[("dmd2", 1, 1)]["fd_digits"]  # other noise, other samples
    assert rows[("dmd2", 1, 0)]["speedup_nfe"] == 4  # 2 CFG steps (4 calls) against 1 call
    for row in result["results"]:
        assert math.isfinite(row["fd_digits"]) and 0 <= row["prompt_accuracy"] <= 1
        assert 0 <= row["train_copy_share"] <= 1
    on_disk = json.loads((output_dir / "results.json").read_text())
    assert on_disk["results"] == result["results"]
    table = (output_dir / "results.md").read_text()
    assert all(f"| {name} | 1 |" in table for name in bench.BENCHMARKED_RECIPES)
    assert "| train copies |" in table and f"| {rows[('dmd2', 1, 0)]['train_copy_share']:.3f} |" in table
    assert f"| {rows[('dmd2', 1, 0)]['fd_digits']:.3f} / {rows[('dmd2', 1, 1)]['fd_digits']:.3f} |" in table
    assert "Trained 2 recipes at a time" in table
    for name in ("fd_vs_sampling_steps.png", "fd_vs_training_time.png", "grids.png"):
        assert (output_dir / name).stat().st_size > 0


@pytest.mark.slow
def test_reuse_runs_keeps_a_run_finished_by_the_same_code_and_flags_and_retrains_any_other(summary, tmp_path,
                                                                                         monkeypatch):
    result, output_dir = summary
    shutil.copytree(output_dir / "runs" / "sid", tmp_path / "runs" / "sid")
    run_dir = tmp_path / "runs" / "sid"

    def training(command, **kwargs):
        assert not run_dir.exists()  # a fresh folder: no earlier log, checkpoints or student
        raise RuntimeError("trained again")

    monkeypatch.setattr(bench.subprocess, "run", training)
    kept = bench.train_recipe(tiny_bench(output_dir, reuse_runs=True), "sid", None, run_dir)
    assert kept["reused"] and kept["training"] == result["recipes"]["sid"]["training"]
    assert (kept["wall_seconds"], kept["finished"]) == (result["recipes"]["sid"]["wall_seconds"],
                                                        result["recipes"]["sid"]["finished"])
    other_flags = tiny_bench(output_dir, reuse_runs=True, seed=1)
    with pytest.raises(RuntimeError, match="trained again"):
        bench.train_recipe(other_flags, "sid", None, run_dir)
    shutil.copytree(output_dir / "runs" / "sid", run_dir)
    record = json.loads((run_dir / "bench_run.json").read_text())
    (run_dir / "bench_run.json").write_text(json.dumps({**record, "code": "0" * 16}))  # trained by other code
    with pytest.raises(RuntimeError, match="trained again"):
        bench.train_recipe(tiny_bench(output_dir, reuse_runs=True), "sid", None, run_dir)
    shutil.copytree(output_dir / "runs" / "sid", run_dir)
    with pytest.raises(RuntimeError, match="trained again"):  # reuse not asked for
        bench.train_recipe(tiny_bench(output_dir), "sid", None, run_dir)


def test_compare_notebook_runs_on_a_fresh_benchmark(summary, tmp_path, monkeypatch):
    _, output_dir = summary
    notebook = execute("compare_recipes.ipynb", monkeypatch, STEPDISTILL_BENCH_RESULTS=str(output_dir / "results.json"),
                       STEPDISTILL_NOTEBOOK_OUTPUT=str(tmp_path))
    assert "best student:" in printed(notebook)


def test_a_failed_recipe_stops_the_bench_once_the_recipes_training_beside_it_end(tmp_path, monkeypatch):
    started, finished, failing = [], [], threading.Event()

    def train_recipe(cfg, recipe, preset, run_dir):
        started.append(recipe)
        if recipe == "dmd2":
            assert failing.wait(30)  # still training when sid fails
            finished.append(recipe)
            return {}
        failing.set()
        raise bench.RecipeFailed(f"recipe {recipe} failed (exit 1)")

    monkeypatch.setattr(bench, "train_recipe", train_recipe)
    with pytest.raises(bench.RecipeFailed, match="recipe sid failed"):
        bench.train_all(bench.BenchConfig(output_dir=str(tmp_path), recipes=("dmd2", "sid", "consistency"), jobs=2),
                        tmp_path / "runs")
    assert (started, finished) == (["dmd2", "sid"], ["dmd2"])  # consistency never started


def test_jobs_share_the_cores_unless_the_recipe_flags_set_threads(tmp_path, monkeypatch):
    monkeypatch.setattr(bench.os, "cpu_count", lambda: 8)

    def flags(**changes) -> list[str]:
        return bench.recipe_flags(bench.BenchConfig(output_dir=str(tmp_path), **changes), None)

    assert "--num_threads" not in flags(jobs=1)
    assert flags(jobs=3)[-2:] == ["--num_threads", "2"]
    assert flags(jobs=3, recipe_flags="--num_threads 1")[-2:] == ["--num_threads", "1"]
    assert flags(jobs=3, recipe_flags="--num_threads 1").count("--num_threads") == 1


def test_teacher_rows_are_scored_once_per_teacher_evaluator_samples_and_seed(tmp_path, monkeypatch):
    cfg = bench.BenchConfig(output_dir=str(tmp_path), num_samples=10, teacher_steps=(1, 2), teacher_guidance_scales=(1.5,))
    prompts, scorers = digits.evaluation_prompts(10), report.Scorers(digits=DigitsEvaluator())
    scored = bench.teacher_rows(cfg, prompts, scorers, tmp_path / "grids", seed=0)
    assert [(r.num_inference_steps, r.seed) for r in scored] == [(1, 0), (2, 0)]

    def no_sampling(*args, **kwargs):
        raise AssertionError("a cached teacher row was scored again")

    def timed(pipe, timed_prompts, steps, scale, seed):  # a cached row is only timed (and its grid drawn) again
        return torch.zeros(len(timed_prompts), 3, 8, 8), len(timed_prompts) / (100.0 * steps)

    monkeypatch.setattr(bench.report, "evaluate", no_sampling)
    monkeypatch.setattr(bench, "generate", timed)
    shutil.rmtree(tmp_path / "grids")
    again = bench.teacher_rows(cfg, prompts, scorers, tmp_path / "grids", seed=0)
    assert [r.images_per_s for r in again] == [100.0, 200.0]
    assert (tmp_path / "grids" / "grid_teacher_steps2_cfg1.5.png").is_file()
    assert [replace(r, images_per_s=0) for r in again] == [replace(r, images_per_s=0) for r in scored]
    monkeypatch.undo()
    other_seed = bench.teacher_rows(cfg, prompts, scorers, tmp_path / "grids", seed=1)
    assert [r.seed for r in other_seed] == [1, 1] and other_seed[0].fd_digits != scored[0].fd_digits
    cfg.num_samples = 12  # other samples: scored anew
    assert [r.num_samples for r in bench.teacher_rows(cfg, digits.evaluation_prompts(12), scorers, tmp_path / "grids",
                                                      seed=0)] == [12, 12]


def test_bench_distils_and_scores_the_flow_teacher(tmp_path):
    cfg = bench.BenchConfig(
        teacher="digits-sd3", recipes=("dmd2", "sid:sid_sd3"), output_dir=str(tmp_path), max_train_steps=1, num_samples=20,
        validation_samples=20, seeds=(0,), student_steps=(1,), teacher_steps=(2,), validation_steps=1,
        recipe_flags=RECIPE_FLAGS,
    )
    assert cfg.teacher_guidance_scales == (1.0,)  # its best is CFG 1: one teacher row per step count
    result = bench.run(cfg)
    recorded = result["recipes"]["dmd2"]["config"]
    assert recorded["pretrained_model_name_or_path"] == str(DIGITS_TEACHER_SD3)
    assert (recorded["guidance_scale"], recorded["timestep_shift"]) == (1.0, 3.0)  # the teacher's own, recorded
    from_preset = result["recipes"]["sid_sd3"]["config"]  # a RECIPE:PRESET entry trains from the preset
    assert (from_preset["timestep_shift"], from_preset["pretrained_model_name_or_path"]) == (1.0, str(DIGITS_TEACHER_SD3))
    assert [(r["model"], r["num_inference_steps"], r["guidance_scale"]) for r in result["results"]] == [
        ("dmd2", 1, 1.0), ("sid_sd3", 1, 1.0), ("teacher", 2, 1.0)]
    cached = json.loads((tmp_path / "teacher_rows.json").read_text())
    assert [json.loads(key)["teacher"] for key in cached] == [bench.file_digest(
        DIGITS_TEACHER_SD3 / "transformer" / "diffusion_pytorch_model.safetensors")]


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"recipes": ("dmd3",)}, "no recipe 'dmd3'"),
        ({"recipes": ("sid:sid_5step",)}, "sid has no preset 'sid_5step' \\(its presets: sid_4step, sid_gan, sid_sd3\\)"),
        ({"recipes": ("sid:dmd2_4step",)}, "sid has no preset 'dmd2_4step'"),
        ({"recipes": ("sid", "sid")}, "--recipes names a run twice"),
        ({"num_samples": 1}, "--num_samples and --validation_samples must be ≥ 2"),
        ({"seeds": ()}, "--seeds needs at least one seed"),
        ({"student_steps": (0, 1)}, "--student_steps must be ≥ 1"),
        ({"max_train_steps": 0}, "--max_train_steps must be ≥ 1"),
        ({"jobs": 0}, "--jobs must be ≥ 1"),
    ],
)
def test_bench_refuses_bad_input(changes, message, tmp_path):
    cfg = bench.BenchConfig(output_dir=str(tmp_path / "bench"), **changes)
    with pytest.raises(ConfigError, match=message):
        cfg.validate()


@pytest.mark.slow
def test_an_installed_package_runs_its_own_recipes_and_presets(tmp_path):
    """A non-editable install (what `pip install stepdistill` gives) carries the recipes and presets."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target",
                    str(site), str(root)], check=True, capture_output=True)
    environment = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    located = subprocess.run(
        [sys.executable, "-c", "from stepdistill.assets import PRESETS_DIR, RECIPES_DIR; print(RECIPES_DIR, PRESETS_DIR)"],
        cwd=tmp_path, env=environment, capture_output=True, text=True, check=True).stdout.split()
    assert located == [str(site / "stepdistill" / "recipes"), str(site / "stepdistill" / "recipes" / "configs")]
    assert (site / "stepdistill" / "recipes" / "configs" / "dmd2_4step.yaml").is_file()
    refused = subprocess.run([sys.executable, "-m", "stepdistill", "bench", "--recipes", "dmd3"], cwd=tmp_path,
                             env=environment, capture_output=True, text=True)
    assert f"no recipe 'dmd3' ({site / 'stepdistill' / 'recipes'} holds add, consistency, dmd2, progressive, sid" in refused.stderr
    dry = subprocess.run([sys.executable, str(site / "stepdistill" / "recipes" / "sid.py"), "--config", "sid_4step",
                          "--dry_run", "--output_dir", str(tmp_path / "run")], cwd=tmp_path, env=environment,
                         capture_output=True, text=True)
    assert "flags are valid" in dry.stdout, dry.stderr


def test_every_subpackage_is_listed_for_the_wheel():
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(root).parts) for p in (root / "stepdistill").rglob("__init__.py")}
    assert listed == found | {"stepdistill.recipes"}


def test_bench_data_prints_start_up_time_and_memory_per_dataset(tmp_path, capsys):
    bench_data.main(["--image_counts", "6", "--prompt_counts", "20,40", "--work_dir", str(tmp_path), "--num_threads", "1"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| image") or line.startswith("| prompts")]
    assert [row.split(" | ")[1] for row in rows] == ["6", "20", "40"]
    assert all(float(row.split(" | ")[2]) > 0 and float(row.split(" | ")[3].rstrip(" |")) > 100 for row in rows)  # s, MiB
