"""``python -m stepdistill evaluate``: score any diffusers text-to-image pipeline or exported student.

    python -m stepdistill evaluate --pipeline PATH --num_inference_steps 1,4,50 --guidance_scale 1,2
    python -m stepdistill evaluate --pipeline outputs/consistency/student --num_inference_steps 1,2,4  # LoRA student
    python -m stepdistill evaluate --pipeline lcm-lora/ --pretrained_model_name_or_path BASE --scheduler LCMScheduler
    python -m stepdistill evaluate --scheduler DDPMScheduler --guidance_scale 1.25,1.5   # ancestral sampling

``--pipeline`` takes a pipeline folder or hub id, any student folder a recipe wrote (a LoRA one goes onto
the base recorded at export, or ``--pretrained_model_name_or_path``), or LoRA weights from elsewhere with
``--pretrained_model_name_or_path`` as their base. The report says what was loaded.

An ancestral (stochastic) sampler draws from the distribution that the guided teacher's scores
describe, which is what a distribution-matching student (DMD2, SiD) learns; the deterministic DDIM
sampler at the same guidance scale can score differently. Comparing the two picks the guidance
scale to distil.

Prints a markdown table and writes ``evaluation.json`` and one image grid per setting to
``--output_dir``. On digit prompts (the default) it reports FD-digits against the held-out split,
prompt accuracy and the real-vs-real floor; FID and CLIP score are added when their weights are
given as local paths.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import diffusers
import torch
from diffusers import SchedulerMixin

from stepdistill import config as configs
from stepdistill import export
from stepdistill.assets import DIGITS_TEACHER, pipeline_location
from stepdistill.config import ConfigError, field
from stepdistill.data import digits
from stepdistill.data.prompts import DataError, read_prompts, square_image
from stepdistill.evaluation import reference_metrics, report
from stepdistill.evaluation.digits_metrics import DigitsEvaluator
from stepdistill.models.backbones import backbone_for
from stepdistill.models.loading import PipelineError


DEFAULT_STEPS = 50  # a pipeline's sampling steps when neither the flag nor a student's metadata gives them


@dataclass
class EvaluateConfig:
    """Sample a text-to-image pipeline and score it (FD-digits / prompt accuracy, FID, CLIP score)."""

    pipeline: str = field(str(DIGITS_TEACHER), "pipeline folder, hub id, a recipe's student folder, LoRA weights, or "
                                               "a shipped teacher: digits (the default) or digits-sd3")
    pretrained_model_name_or_path: str | None = field(None, "base model of LoRA weights (default for a recipe's LoRA "
                                                            "student: the base recorded at export)")
    num_inference_steps: tuple[int, ...] | None = field(None, "sampling steps, comma-separated (e.g. 1,2,4,50; "
                                                              "default: a student's recorded steps, else 50)")
    guidance_scale: tuple[float, ...] | None = field(None, "classifier-free guidance scales, comma-separated "
                                                           "(default: a student's recorded scale, else 1)")
    scheduler: str | None = field(None, "diffusers scheduler class to sample with, e.g. DDPMScheduler (default: the pipeline's own)")
    eval_num_samples: int = field(1000, "images per setting (digit prompts cycle 0..9), as the recipes' flag",
                                  aliases=("num_samples",))
    prompts_file: str | None = field(None, ".txt (one prompt a line) or .jsonl prompts, used cyclically (default: digit "
                                            "prompts)")
    seed: int = field(0, "seed of the initial noise (the same for every model)")
    batch_size: int = field(250, "images per pipeline call")
    output_dir: str = field("outputs/evaluate", "where evaluation.json and the grids go")
    inception_weights: str | None = field(None, "FID Inception weights file; enables FID")
    fid_reference_dir: str | None = field(None, "folder of real images for FID")
    clip_model: str | None = field(None, "local CLIP model folder; enables CLIP score")

    def __post_init__(self) -> None:
        self.pipeline = pipeline_location(self.pipeline)
        if self.pretrained_model_name_or_path is not None:
            self.pretrained_model_name_or_path = pipeline_location(self.pretrained_model_name_or_path)

    def validate(self) -> None:
        if self.eval_num_samples < 2:
            raise ConfigError(f"--eval_num_samples must be ≥ 2, as Fréchet distances need two samples (got {self.eval_num_samples})")
        if self.batch_size < 1:
            raise ConfigError(f"--batch_size must be ≥ 1 (got {self.batch_size})")
        steps = self.num_inference_steps
        if steps is not None and (not steps or min(steps) < 1):
            raise ConfigError(f"--num_inference_steps must be ≥ 1 (got {self.num_inference_steps})")
        if self.guidance_scale is not None and (not self.guidance_scale or min(self.guidance_scale) < 0):
            raise ConfigError(f"--guidance_scale must be ≥ 0 (got {self.guidance_scale})")
        if self.prompts_file is not None and not Path(self.prompts_file).is_file():
            raise ConfigError(f"--prompts_file {self.prompts_file} does not exist")
        if (self.inception_weights is None) != (self.fid_reference_dir is None):
            raise ConfigError("FID needs both --inception_weights and --fid_reference_dir")
        if self.fid_reference_dir is not None and not Path(self.fid_reference_dir).is_dir():
            raise ConfigError(f"--fid_reference_dir {self.fid_reference_dir} is not a folder")
        try:
            if self.inception_weights is not None:
                reference_metrics.check_inception_weights(self.inception_weights)
        except reference_metrics.MissingWeightsError as error:
            raise ConfigError(f"--inception_weights: {error}") from None
        try:
            if self.clip_model is not None:
                reference_metrics.check_clip_model(self.clip_model)
        except reference_metrics.MissingWeightsError as error:
            raise ConfigError(f"--clip_model: {error}") from None
        if self.scheduler is not None:
            scheduler_class(self.scheduler)

    def prompts(self) -> list[str]:
        if self.prompts_file is None:
            return digits.evaluation_prompts(self.eval_num_samples)
        lines = read_prompts(self.prompts_file)
        return [lines[i % len(lines)] for i in range(self.eval_num_samples)]


FD_MIN_SAMPLES = 1000  # fewer, and a 128-d Fréchet distance says little beyond its own bias


def scheduler_class(name: str) -> type[SchedulerMixin]:
    """The diffusers scheduler class called ``name``."""
    found = getattr(diffusers, name, None)
    if not (isinstance(found, type) and issubclass(found, SchedulerMixin)):
        raise ConfigError(f"--scheduler {name} is not a diffusers scheduler class (e.g. DDPMScheduler, "
                          "EulerAncestralDiscreteScheduler, DDIMScheduler)")
    return found


def load_image_folder(folder: str, size: int) -> torch.Tensor:
    """All PNG/JPEG/WebP images of a folder as ``(N, 3, size, size)`` in [-1, 1], centre-cropped and
    resized as training images are."""
    import numpy as np

    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
    if not files:
        raise ConfigError(f"--fid_reference_dir {folder} holds no .png/.jpg/.webp images")
    arrays = [square_image(path, size) for path in files]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1


def run(cfg: EvaluateConfig) -> list[report.Result]:
    prompts = cfg.prompts()
    pipe, loaded = export.load_any(cfg.pipeline, cfg.pretrained_model_name_or_path)
    guidance_scales = cfg.guidance_scale or (loaded.get("student_guidance_scale", 1.0),)
    steps = cfg.num_inference_steps or (loaded.get("student_num_inference_steps", DEFAULT_STEPS),)
    if cfg.scheduler is not None:
        pipe.scheduler = scheduler_class(cfg.scheduler).from_config(pipe.scheduler.config)
    image_size = loaded.get("student_resolution") or backbone_for(pipe).default_resolution(pipe)
    use_digits = report.are_digit_prompts(prompts) and image_size == digits.IMAGE_SIZE
    if not use_digits and cfg.inception_weights is None and cfg.clip_model is None:
        raise ConfigError(
            f"the digits metrics need digit prompts and 32×32 images (this pipeline makes {image_size}×{image_size}); "
            "for other models pass --clip_model and/or --inception_weights with --fid_reference_dir"
        )
    scorers = report.Scorers(
        digits=DigitsEvaluator() if use_digits else None,
        inception_weights=cfg.inception_weights,
        fid_reference=load_image_folder(cfg.fid_reference_dir, image_size) if cfg.fid_reference_dir else None,
        clip_model=cfg.clip_model,
    )
    output_dir = Path(cfg.output_dir)
    results = report.evaluate(
        pipe, Path(cfg.pipeline).name or cfg.pipeline, steps, guidance_scales,
        prompts, scorers, output_dir=output_dir, seed=cfg.seed, batch_size=cfg.batch_size, resolution=image_size,
    )
    extra = {"pipeline": cfg.pipeline, **loaded, "scheduler": type(pipe.scheduler).__name__}
    print("scored " + ", ".join(f"{key} {value}" for key, value in extra.items()))
    if scorers.digits is not None:
        extra["real_vs_real_fd_digits"] = scorers.digits.real_floor(cfg.eval_num_samples)
    report.write_report(results, output_dir / "evaluation.json", **extra)
    print(report.markdown_table(results))
    if "real_vs_real_fd_digits" in extra:
        print(f"\nreal-vs-real FD-digits floor at {min(cfg.eval_num_samples, 1347)} samples: {extra['real_vs_real_fd_digits']:.3f}")
        if cfg.eval_num_samples < FD_MIN_SAMPLES:
            print(f"note: below {FD_MIN_SAMPLES:,} samples FD-digits is mostly its finite-sample bias (the features "
                  "have 128 dimensions); compare equal sample counts only, and use 5,000 for decisions")
    print(f"wrote {output_dir / 'evaluation.json'} and image grids")
    return results


def main(argv: list[str] | None = None) -> None:
    cfg = configs.parse(EvaluateConfig, argv, prog="python -m stepdistill evaluate")
    try:
        run(cfg)
    except (ConfigError, PipelineError, DataError) as error:
        raise SystemExit(f"error: {error}") from None
