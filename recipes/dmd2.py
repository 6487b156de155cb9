"""DMD2: distil a diffusion teacher into a 1–4 step student by distribution matching.

    accelerate launch recipes/dmd2.py                                  # the shipped digits teacher, offline
    accelerate launch recipes/dmd2.py --num_student_steps 4 --use_lora true
    accelerate launch recipes/dmd2.py --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --prompts_file prompts.txt --guidance_scale 8 --learning_rate 1e-5 --mixed_precision bf16

Paper: "Improved Distribution Matching Distillation for Fast Image Synthesis" (Yin et al., 2024).
Each training step (Alg. 1 of DMD2, the math lives in ``stepdistill.methods.dmd``):

    1. k critic updates (TTUR): the fake score learns the student's current distribution by
       denoising its samples; the GAN head learns real-vs-student on the fake score's features;
    2. one generator update: the student moves along  x̂0_fake − x̂0_teacher(CFG)  (distribution
       matching), plus the GAN generator term when real images are given;
    3. multi-step students train on their own sampler's intermediate states (backward simulation).

Then the student is exported for plain diffusers (full pipeline, or LoRA weights) and scored.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate.logging import get_logger
from accelerate.tracking import get_available_trackers
from accelerate.utils import LoggerType, set_seed

from stepdistill import config as configs
from stepdistill import export, methods
from stepdistill.assets import DIGITS_TEACHER
from stepdistill.config import ConfigError, field
from stepdistill.data import digits, prompts as user_data
from stepdistill.evaluation import report
from stepdistill.evaluation.digits_metrics import DigitsEvaluator
from stepdistill.evaluation.grid import save_grid
from stepdistill.evaluation.sampling import generate
from stepdistill.evaluation.validation import StudentValidator
from stepdistill.models import networks
from stepdistill.models.loading import PipelineError, load_pipeline
from stepdistill.models.teacher import Teacher, load_teacher
from stepdistill.trainer import (
    Trainer, TrainerConfig, find_checkpoint, make_accelerator, require_data_parallel, set_cpu_threads,
)

logger = get_logger(__name__)


@dataclass
class DMD2Config:
    """Distil a text-to-image diffusion model with DMD2 (distribution matching + GAN + TTUR)."""

    # model
    pretrained_model_name_or_path: str = field(str(DIGITS_TEACHER), "teacher pipeline folder or hub id (default: shipped digits teacher)")
    revision: str | None = field(None, "hub revision of the teacher")
    variant: str | None = field(None, "weight variant of the teacher, e.g. fp16")
    use_lora: bool = field(False, "train LoRA adapters (student and fake score share one frozen UNet)")
    lora_rank: int = field(16, "LoRA rank of student and fake score")
    # data
    prompts_file: str | None = field(None, ".txt / .jsonl prompts (default: the digits captions)")
    train_data_dir: str | None = field(None, "captioned image folder (metadata.jsonl) for the GAN term")
    # method
    num_student_steps: int = field(1, "sampling steps of the student (1-8 typical, at most 50; >1 uses backward simulation)")
    guidance_scale: float = field(1.5, "teacher classifier-free guidance in the distribution-matching loss (1.5 is the digits teacher's best)")
    critic_steps_per_generator_step: int = field(5, "fake-score updates per student update (TTUR)")
    gan_generator_weight: float = field(3e-3, "weight of the GAN term in the student loss (0: off)")
    gan_critic_weight: float = field(1e-2, "weight of the GAN term in the critic loss (0: off)")
    regression_weight: float = field(0.0, "DMD1 regression loss weight (latent MSE to teacher ODE outputs; 0: off)")
    num_regression_pairs: int = field(256, "noise/teacher-output pairs made at start when regression_weight > 0")
    # optimisation
    output_dir: str = field("outputs/dmd2", "where checkpoints, the student and report.json go")
    max_train_steps: int = field(300, "student (generator) updates")
    train_batch_size: int = field(32, "batch size of every update")
    learning_rate: float = field(1e-4, "student AdamW learning rate")
    critic_learning_rate: float | None = field(None, "fake score / discriminator learning rate (default: learning_rate)")
    adam_weight_decay: float = field(0.01, "AdamW weight decay")
    max_grad_norm: float = field(10.0, "gradient-norm clip (0: off)")
    gradient_accumulation_steps: int = field(1, "micro-batches per update")
    mixed_precision: str = field("no", "no | fp16 | bf16")
    gradient_checkpointing: bool = field(False, "trade compute for memory in student and fake score")
    ema_decay: float = field(0.0, "EMA of the student weights that get exported (0: off)")
    seed: int = field(0, "seed of everything")
    num_threads: int = field(0, "CPU threads for torch (0: all cores, shared among processes)")
    checkpointing_steps: int = field(0, "save a resumable checkpoint every N steps (0: off)")
    checkpoints_total_limit: int = field(2, "keep this many checkpoints")
    resume_from_checkpoint: str | None = field(None, "'latest' or a checkpoint folder")
    # monitoring and evaluation
    report_to: str = field("auto", "accelerate tracker (tensorboard, wandb, ...), none, or auto: tensorboard if installed")
    validation_steps: int = field(50, "sample, grid and score the student every N steps (0: off)")
    num_validation_images: int = field(1000, "images per validation (digits: FD-digits + accuracy; else a 16-image grid)")
    eval_num_samples: int = field(1000, "samples for the final FD-digits / accuracy report (digits teacher)")
    teacher_eval_steps: int = field(50, "DDIM steps of the teacher row of the report (0: skip it)")
    dry_run: bool = field(False, "validate the flags and exit")

    def validate(self) -> None:
        """Every check that needs no model, run before anything is loaded."""
        positive = ("lora_rank", "num_student_steps", "critic_steps_per_generator_step", "max_train_steps",
                    "train_batch_size", "gradient_accumulation_steps", "num_regression_pairs", "checkpoints_total_limit",
                    "num_validation_images")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be ≥ 1 (got {getattr(self, name)})")
        for name in ("learning_rate", "critic_learning_rate"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"--{name} must be > 0 (got {value})")
        if self.num_student_steps > 50:
            raise ConfigError(f"--num_student_steps must be ≤ 50, the student scheduler's grid (got {self.num_student_steps})")
        if self.eval_num_samples == 1:
            raise ConfigError("--eval_num_samples must be 0 (no report) or ≥ 2 (FD needs two samples)")
        if self.use_lora and self.gradient_checkpointing:
            raise ConfigError(
                "--use_lora with --gradient_checkpointing is not supported: the recomputed forward would run with "
                "the wrong adapter active; drop one of the two"
            )
        if self.prompts_file and self.train_data_dir:
            raise ConfigError("give --prompts_file or --train_data_dir (whose captions are the prompts), not both")
        for name in ("gan_generator_weight", "gan_critic_weight", "regression_weight", "guidance_scale",
                     "max_grad_norm", "eval_num_samples", "teacher_eval_steps", "checkpointing_steps", "validation_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name} must be ≥ 0 (got {getattr(self, name)})")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"--ema_decay must be in [0, 1) (got {self.ema_decay})")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ConfigError(f"--mixed_precision must be no, fp16 or bf16 (got {self.mixed_precision!r})")
        trackers = ("auto", "none", *(t.value for t in LoggerType if t.value != "all"))
        if self.report_to not in trackers:
            raise ConfigError(f"--report_to must be one of {', '.join(trackers)} (got {self.report_to!r})")
        if self.report_to not in ("auto", "none") and self.report_to not in get_available_trackers():
            raise ConfigError(f"--report_to {self.report_to}: the package is not installed (pip install {self.report_to})")
        if self.prompts_file and not Path(self.prompts_file).is_file():
            raise ConfigError(f"--prompts_file {self.prompts_file} does not exist")
        if self.train_data_dir and not (Path(self.train_data_dir) / "metadata.jsonl").is_file():
            raise ConfigError(f"--train_data_dir {self.train_data_dir} needs a metadata.jsonl (file_name, text per line)")
        configs.require_writable_dir(self.output_dir, "--output_dir")
        if self.resume_from_checkpoint:
            find_checkpoint(self.output_dir, self.resume_from_checkpoint)

    @property
    def uses_digits(self) -> bool:
        """Whether the run trains on the embedded digits data (and so can be scored offline)."""
        return not (self.prompts_file or self.train_data_dir)


def training_data(cfg: DMD2Config, teacher: Teacher) -> tuple[list[str], torch.Tensor | None]:
    """Prompts to train on and, when available, the matching real images' latents (for the GAN)."""
    if cfg.train_data_dir:
        size = teacher.unet.config.sample_size * teacher.pipeline.vae_scale_factor
        images, captions = user_data.read_image_folder(cfg.train_data_dir, size)
        return captions, teacher.encode_images(images)
    if cfg.prompts_file:
        return user_data.read_prompts(cfg.prompts_file), None
    train = digits.load_digits("train")  # the digits default: captions and images of the train split
    return train.prompts, teacher.encode_images(train.images)


def regression_pairs(teacher: Teacher, text: torch.Tensor, cfg: DMD2Config):
    """(noise, text, teacher 50-step DDIM latent) triples for DMD's regression loss (DMD eq. 9)."""
    count = cfg.num_regression_pairs
    pick = torch.randint(len(text), (count,))
    noise = torch.randn((count, *teacher.latent_shape))
    uncond = teacher.encode_prompts([""]).expand(count, -1, -1)
    with torch.no_grad():
        output = teacher.pipeline(
            prompt_embeds=text[pick], negative_prompt_embeds=uncond, latents=noise, num_inference_steps=50,
            guidance_scale=cfg.guidance_scale, output_type="latent",
        ).images
    return noise, text[pick], output


def is_digits_sized(teacher: Teacher) -> bool:
    """Whether the teacher makes 32×32 images, the size the offline digits metrics score."""
    return teacher.unet.config.sample_size * teacher.pipeline.vae_scale_factor == digits.IMAGE_SIZE


def final_report(
    cfg: DMD2Config, teacher: Teacher, prompts: list[str], student_dir: Path, output_dir: Path, training_seconds: float
) -> dict:
    """Score the exported student (as plain diffusers loads it) and the teacher on the same noise."""
    if cfg.eval_num_samples == 0:
        return {}
    if cfg.use_lora:
        student = export.load_lora_student(cfg.pretrained_model_name_or_path, student_dir, cfg.revision, cfg.variant)
    else:
        student = load_pipeline(student_dir)
    if not cfg.uses_digits or not is_digits_sized(teacher):  # no offline metric: a grid of the training prompts
        images, _ = generate(student, prompts[:16], cfg.num_student_steps, 1.0, seed=cfg.seed)
        save_grid(images, output_dir / "student_grid.png", num_columns=4)
        return {}
    eval_prompts = digits.evaluation_prompts(cfg.eval_num_samples)
    scorers = report.Scorers(digits=DigitsEvaluator())
    steps = tuple(sorted({1, cfg.num_student_steps}))
    results = report.evaluate(student, "student", steps, (1.0,), eval_prompts, scorers, output_dir, seed=cfg.seed)
    if cfg.teacher_eval_steps:
        results += report.evaluate(teacher.pipeline, "teacher", (cfg.teacher_eval_steps,), (cfg.guidance_scale,),
                                   eval_prompts, scorers, output_dir, seed=cfg.seed)
    floor = scorers.digits.real_floor(cfg.eval_num_samples)
    report.write_report(
        results, output_dir / "report.json", real_vs_real_fd_digits=floor, training_seconds=training_seconds, config=vars(cfg)
    )
    print(report.markdown_table(results))
    print(f"\nreal-vs-real FD-digits floor at {cfg.eval_num_samples} samples: {floor:.3f}")
    return {"results": results, "floor": floor}


def main(cfg: DMD2Config) -> None:
    cfg.validate()
    if cfg.dry_run:
        print("flags are valid; --dry_run set, exiting before loading any model")
        return
    accelerator = make_accelerator(cfg.mixed_precision, cfg.report_to, cfg.output_dir)
    require_data_parallel(accelerator)
    set_cpu_threads(accelerator, cfg.num_threads)
    set_seed(cfg.seed)

    # 1. the frozen teacher, its noise process and cached text embeddings
    teacher = load_teacher(cfg.pretrained_model_name_or_path, cfg.revision, cfg.variant)
    teacher.pipeline.to(accelerator.device)
    output_dir = Path(cfg.output_dir)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        configs.save(cfg, output_dir / "config.json")
    accelerator.init_trackers("stepdistill-dmd2", config={k: str(v) if v is None else v for k, v in vars(cfg).items()})
    prompts, real_latents = training_data(cfg, teacher)
    text = teacher.encode_prompts(prompts)
    uncond = teacher.encode_prompts([""]).expand(cfg.train_batch_size, -1, -1)

    # 2. student and fake score start as the teacher (full copies, or two LoRA adapters on it)
    with_gan = real_latents is not None and (cfg.gan_generator_weight > 0 or cfg.gan_critic_weight > 0)
    if real_latents is None and (cfg.gan_generator_weight > 0 or cfg.gan_critic_weight > 0):
        logger.warning("no real images (--train_data_dir), so the GAN term is off; distribution matching only")
    nets = networks.build_networks(teacher.unet, teacher.process, cfg.use_lora, cfg.lora_rank, with_discriminator=with_gan)
    if cfg.gradient_checkpointing:
        for unet in {id(n.unet): n.unet for n in (nets.student, nets.fake_score)}.values():
            unet.enable_gradient_checkpointing()

    # 3. the method: DMD2's losses on the student's timesteps, read off the exported scheduler
    scheduler = export.student_scheduler(teacher.pipeline.scheduler)
    method = methods.DMD2(
        nets=nets,
        process=teacher.process,
        student_timesteps=export.student_timesteps(scheduler, cfg.num_student_steps),
        latent_shape=teacher.latent_shape,
        guidance_scale=cfg.guidance_scale,
        critic_steps_per_generator_step=cfg.critic_steps_per_generator_step,
        gan_generator_weight=cfg.gan_generator_weight if with_gan else 0.0,
        gan_critic_weight=cfg.gan_critic_weight if with_gan else 0.0,
        regression_weight=cfg.regression_weight,
        regression_pairs=regression_pairs(teacher, text, cfg) if cfg.regression_weight else None,
    )

    def next_batch() -> methods.Batch:
        pick = torch.randint(len(text), (cfg.train_batch_size,))
        return methods.Batch(
            text=text[pick].to(accelerator.device),
            uncond=uncond.to(accelerator.device),
            real_latents=real_latents[pick].to(accelerator.device) if real_latents is not None else None,
        )

    # 4. train: TTUR critic updates, then a generator update, every step; validate now and then
    validation_prompts = (
        digits.evaluation_prompts(cfg.num_validation_images) if cfg.uses_digits else prompts[: min(16, cfg.num_validation_images)]
    )
    validator = StudentValidator(
        teacher, nets.student, method.student_timesteps, validation_prompts, output_dir,
        evaluator=DigitsEvaluator() if cfg.uses_digits and is_digits_sized(teacher) else None, seed=cfg.seed,
    )
    trainer = Trainer(
        TrainerConfig(
            output_dir=cfg.output_dir, max_train_steps=cfg.max_train_steps, learning_rate=cfg.learning_rate,
            critic_learning_rate=cfg.critic_learning_rate or cfg.learning_rate, adam_weight_decay=cfg.adam_weight_decay,
            max_grad_norm=cfg.max_grad_norm, gradient_accumulation_steps=cfg.gradient_accumulation_steps,
            mixed_precision=cfg.mixed_precision, ema_decay=cfg.ema_decay, checkpointing_steps=cfg.checkpointing_steps,
            checkpoints_total_limit=cfg.checkpoints_total_limit, resume_from_checkpoint=cfg.resume_from_checkpoint,
            validation_steps=cfg.validation_steps, seed=cfg.seed,
        ),
        method,
        generator_modules=[nets.student.unet],
        generator_parameters=nets.generator_parameters(),
        critic_modules=[m for m in (nets.fake_score.unet, nets.discriminator) if m is not None],
        critic_parameters=nets.critic_parameters(),
        next_batch=next_batch,
        accelerator=accelerator,
        validate=validator if cfg.validation_steps else None,
    )
    progress = trainer.fit()
    accelerator.end_training()

    # 5. export for plain diffusers (EMA weights if kept), then score the export
    if not accelerator.is_main_process:
        return
    if trainer.ema is not None:
        trainer.ema.copy_to_parameters()
    student_unet = accelerator.unwrap_model(nets.student.unet)
    student_dir = output_dir / "student"
    if cfg.use_lora:
        export.export_lora(teacher.pipeline, student_unet, networks.STUDENT, student_dir, cfg.num_student_steps)
    else:
        export.export_full(teacher.pipeline, student_unet, student_dir, cfg.num_student_steps)
    print(f"trained {cfg.max_train_steps} steps in {progress.seconds / 60:.1f} min; student written to {student_dir}")
    final_report(cfg, teacher, prompts, student_dir, output_dir, progress.seconds)


if __name__ == "__main__":
    config = configs.parse(DMD2Config, prog="recipes/dmd2.py")
    try:
        main(config)
    except (PipelineError, ConfigError) as error:
        raise SystemExit(f"error: {error}") from None
