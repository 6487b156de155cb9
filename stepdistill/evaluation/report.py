"""One evaluation entry point: sample a pipeline at several settings, score, tabulate, save.

Used by ``python -m stepdistill evaluate`` and by every recipe's final report, so that numbers
from anywhere in the project come from the same prompts, noise, metrics and sample counts.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from diffusers import DiffusionPipeline

from stepdistill.data import digits
from stepdistill.evaluation import reference_metrics
from stepdistill.evaluation.digits_metrics import DigitsEvaluator
from stepdistill.evaluation.grid import save_grid
from stepdistill.evaluation.sampling import generate, number_of_function_evaluations


@dataclass
class Result:
    """One row of a results table."""

    model: str
    num_inference_steps: int
    guidance_scale: float
    nfe: int
    num_samples: int
    images_per_s: float
    seed: int = 0
    fd_digits: float | None = None
    prompt_accuracy: float | None = None
    train_copy_share: float | None = None
    fid: float | None = None
    clip_score: float | None = None


@dataclass
class Scorers:
    """Which metrics to compute: the digits metrics, and FID / CLIP when their weights are given."""

    digits: DigitsEvaluator | None = None
    inception_weights: str | None = None
    fid_reference: torch.Tensor | None = None
    clip_model: str | None = None


def evaluate(
    pipe: DiffusionPipeline,
    model: str,
    steps: tuple[int, ...],
    guidance_scales: tuple[float, ...],
    prompts: list[str],
    scorers: Scorers,
    output_dir: Path | None = None,
    seed: int = 0,
    batch_size: int = 250,
    resolution: int | None = None,
) -> list[Result]:
    """Score ``pipe`` at every (steps, guidance) pair, sampling ``resolution`` px (default: the
    pipeline's own); write a grid per pair into ``output_dir``."""
    results = []
    for guidance_scale in guidance_scales:
        for num_steps in steps:
            images, seconds = generate(pipe, prompts, num_steps, guidance_scale, seed=seed, batch_size=batch_size,
                                       resolution=resolution)
            result = Result(
                model=model,
                num_inference_steps=num_steps,
                guidance_scale=guidance_scale,
                nfe=number_of_function_evaluations(pipe, num_steps, guidance_scale),
                num_samples=len(prompts),
                images_per_s=len(prompts) / seconds,
                seed=seed,
            )
            if scorers.digits is not None:
                scores = scorers.digits.evaluate(images, prompts)
                result.fd_digits, result.prompt_accuracy = scores["fd_digits"], scores["prompt_accuracy"]
                result.train_copy_share = scorers.digits.train_copy_share(images)
            if scorers.inception_weights is not None:
                result.fid = reference_metrics.fid(scorers.fid_reference, images, scorers.inception_weights)
            if scorers.clip_model is not None:
                result.clip_score = reference_metrics.clip_score(images, prompts, scorers.clip_model)
            if output_dir is not None:
                save_grid(images[:100], Path(output_dir) / f"grid_{model}_steps{num_steps}_cfg{guidance_scale:g}.png")
            results.append(result)
    return results


def markdown_table(results: list[Result]) -> str:
    """The results as a markdown table; columns with no value in any row are left out."""
    columns = [c for c in asdict(results[0]) if any(getattr(r, c) is not None for r in results)]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for result in results:
        cells = []
        for column in columns:
            value = getattr(result, column)
            cells.append("" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(results: list[Result], path: Path, **extra) -> None:
    """``results`` (plus any ``extra`` fields, e.g. the real-vs-real floor) as JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**extra, "results": [asdict(r) for r in results]}, indent=2) + "\n")


def are_digit_prompts(prompts: list[str]) -> bool:
    """Whether every prompt names a digit, so the digits metrics apply."""
    return all(digits.label_of(p) is not None for p in prompts)
