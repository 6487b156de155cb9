"""What every distillation run does around its method: flags, set-up, data, validation, export, report.

A recipe subclasses :class:`RunConfig` with its method's flags and calls these in order:

    setup = set_up(cfg, "dmd2")     # checked flags, seeds, threads, teacher, data, config.json, batches
    ... build the networks and the method from setup.teacher ...
    trainer = Trainer(trainer_config(cfg), ..., validate=make_validator(cfg, teacher, student, timesteps, prompts))
    student_dir = export_student(cfg, teacher, trainer, student_unet, adapter)
    final_report(cfg, teacher, prompts, student_dir, trainer.summary())
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.tracking import get_available_trackers
from accelerate.utils import LoggerType, set_seed
from diffusers import DDIMScheduler, LCMScheduler
from diffusers.optimization import SchedulerType
from torch import nn

from stepdistill import config as configs
from stepdistill import export
from stepdistill.assets import DIGITS_TEACHER
from stepdistill.config import ConfigError, field
from stepdistill.data import digits, prompts as user_data
from stepdistill.evaluation import plots, report
from stepdistill.evaluation.digits_metrics import DigitsEvaluator
from stepdistill.evaluation.grid import save_grid
from stepdistill.evaluation.sampling import generate
from stepdistill.evaluation.validation import StudentModel, StudentValidator
from stepdistill.methods.base import Batch
from stepdistill.models.denoiser import select_adapter
from stepdistill.models.loading import PipelineError, require_pipeline_location
from stepdistill.models.networks import Networks
from stepdistill.models.teacher import Teacher, load_teacher
from stepdistill.trainer import (
    DivergedError, Trainer, TrainerConfig, find_checkpoint, make_accelerator, require_data_parallel, set_cpu_threads,
)


@dataclass
class RunConfig:
    """Flags every recipe shares; a recipe's config subclasses this and adds its method's flags."""

    # model
    pretrained_model_name_or_path: str = field(str(DIGITS_TEACHER), "teacher pipeline folder or hub id (default: shipped digits teacher)")
    revision: str | None = field(None, "hub revision of the teacher")
    variant: str | None = field(None, "weight variant of the teacher, e.g. fp16")
    use_lora: bool = field(False, "train LoRA adapters on the frozen teacher UNet instead of full copies")
    lora_rank: int = field(16, "LoRA rank")
    # data
    prompts_file: str | None = field(None, ".txt / .jsonl prompts (default: the digits captions)")
    train_data_dir: str | None = field(None, "captioned image folder (metadata.jsonl) of real images")
    # student
    num_student_steps: int = field(1, "sampling steps of the student (1-8 typical, at most 50)")
    guidance_scale: float = field(1.5, "teacher classifier-free guidance distilled into the student (1.5 is the digits teacher's best)")
    # optimisation
    output_dir: str = field("outputs/run", "where checkpoints, the student and report.json go")
    max_train_steps: int = field(300, "student (generator) updates")
    train_batch_size: int = field(32, "batch size of every update")
    learning_rate: float = field(1e-4, "student AdamW learning rate")
    lr_scheduler: str = field("constant", "learning-rate schedule of every optimiser: constant, linear, cosine, ... (diffusers' names)")
    lr_warmup_steps: int = field(0, "warm-up updates of the schedule")
    adam_beta1: float = field(0.9, "AdamW β1 of every optimiser (0 is common for adversarial games: SiD, GANs)")
    adam_beta2: float = field(0.999, "AdamW β2 of every optimiser")
    adam_weight_decay: float = field(0.01, "AdamW weight decay")
    max_grad_norm: float = field(10.0, "gradient-norm clip (0: off)")
    max_consecutive_skips: int = field(10, "stop the run after this many non-finite (skipped) updates in a row")
    gradient_accumulation_steps: int = field(1, "micro-batches per update")
    mixed_precision: str = field("no", "no | fp16 | bf16")
    gradient_checkpointing: bool = field(False, "trade compute for memory in the trained UNets")
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
    eval_num_samples: int = field(1000, "samples for the final FD-digits / accuracy report (digits teacher; 0: none)")
    teacher_eval_steps: int = field(50, "DDIM steps of the teacher row of the report (0: skip it)")
    dry_run: bool = field(False, "validate the flags and exit")

    def validate(self) -> None:
        """Every check that needs no model, run before anything is loaded; recipes extend it."""
        for name in ("lora_rank", "num_student_steps", "max_train_steps", "train_batch_size",
                     "gradient_accumulation_steps", "checkpoints_total_limit", "num_validation_images",
                     "max_consecutive_skips"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be ≥ 1 (got {getattr(self, name)})")
        if not self.learning_rate > 0:
            raise ConfigError(f"--learning_rate must be > 0 (got {self.learning_rate})")
        for name in ("guidance_scale", "max_grad_norm", "eval_num_samples", "teacher_eval_steps", "checkpointing_steps",
                     "validation_steps", "num_threads", "lr_warmup_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name} must be ≥ 0 (got {getattr(self, name)})")
        if self.num_student_steps > 50:
            raise ConfigError(f"--num_student_steps must be ≤ 50, the student scheduler's grid (got {self.num_student_steps})")
        if self.eval_num_samples == 1:
            raise ConfigError("--eval_num_samples must be 0 (no report) or ≥ 2 (FD needs two samples)")
        if self.use_lora and self.gradient_checkpointing:
            raise ConfigError(
                "--use_lora with --gradient_checkpointing is not supported: the recomputed forward would run with "
                "the wrong adapter active; drop one of the two"
            )
        schedules = tuple(s.value for s in SchedulerType if s is not SchedulerType.PIECEWISE_CONSTANT)
        if self.lr_scheduler not in schedules:
            raise ConfigError(f"--lr_scheduler must be one of {', '.join(schedules)} (got {self.lr_scheduler!r})")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be in [0, 1) (got {getattr(self, name)})")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"--ema_decay must be in [0, 1) (got {self.ema_decay})")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ConfigError(f"--mixed_precision must be no, fp16 or bf16 (got {self.mixed_precision!r})")
        trackers = ("auto", "none", *(t.value for t in LoggerType if t.value != "all"))
        if self.report_to not in trackers:
            raise ConfigError(f"--report_to must be one of {', '.join(trackers)} (got {self.report_to!r})")
        if self.report_to not in ("auto", "none") and self.report_to not in get_available_trackers():
            raise ConfigError(f"--report_to {self.report_to}: the package is not installed (pip install {self.report_to})")
        if self.prompts_file and self.train_data_dir:
            raise ConfigError("give --prompts_file or --train_data_dir (whose captions are the prompts), not both")
        if self.prompts_file and not Path(self.prompts_file).is_file():
            raise ConfigError(f"--prompts_file {self.prompts_file} does not exist")
        if self.train_data_dir and not (Path(self.train_data_dir) / "metadata.jsonl").is_file():
            raise ConfigError(f"--train_data_dir {self.train_data_dir} needs a metadata.jsonl (file_name, text per line)")
        configs.require_writable_dir(self.output_dir, "--output_dir")
        if self.resume_from_checkpoint:
            find_checkpoint(self.output_dir, self.resume_from_checkpoint)

    def teacher_scheduler_config(self) -> dict:
        """The teacher's scheduler config, read without loading a model (for checks that need its T)."""
        try:
            require_pipeline_location(self.pretrained_model_name_or_path)
        except PipelineError as error:
            raise ConfigError(f"--pretrained_model_name_or_path: {error}") from None
        try:
            return DDIMScheduler.load_config(self.pretrained_model_name_or_path, subfolder="scheduler", revision=self.revision)
        except (OSError, ValueError) as error:
            raise ConfigError(f"--pretrained_model_name_or_path {self.pretrained_model_name_or_path}: cannot read its "
                              f"scheduler config ({str(error).strip().splitlines()[0]})") from None

    @property
    def uses_digits(self) -> bool:
        """Whether the run trains on the embedded digits data (and so can be scored offline)."""
        return not (self.prompts_file or self.train_data_dir)


@dataclass
class FakeScoreConfig(RunConfig):
    """Flags shared by the methods that train a fake score against the student (DMD2, SiD)."""

    critic_learning_rate: float = field(1e-4, "fake score / discriminator AdamW learning rate")
    conditioning_timestep: int = field(625, "timestep of the student's first step from pure noise (SiD's 625; the DMD2 "
                                            "paper's is 999); the export samples there")
    gan_generator_weight: float = field(0.0, "weight of the GAN term in the student loss (0: off; needs real images)")
    gan_critic_weight: float = field(0.0, "weight of the GAN term in the critic loss (0: off; needs real images)")
    gan_max_timestep: int = field(999, "the GAN sees real and student latents noised to t ≤ this (lower: finer detail)")

    def validate(self) -> None:
        super().validate()
        if not self.critic_learning_rate > 0:
            raise ConfigError(f"--critic_learning_rate must be > 0 (got {self.critic_learning_rate})")
        for name in ("gan_generator_weight", "gan_critic_weight", "gan_max_timestep"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name} must be ≥ 0 (got {getattr(self, name)})")
        if self.uses_gan and self.prompts_file:
            raise ConfigError("the GAN term needs real images: give --train_data_dir instead of --prompts_file, "
                              "or set the GAN weights to 0")
        last = self.teacher_scheduler_config()["num_train_timesteps"] - 1
        if not 1 <= self.conditioning_timestep <= last:
            raise ConfigError(f"--conditioning_timestep must be in [1, {last}], the teacher's timesteps "
                              f"(got {self.conditioning_timestep})")
        if self.gan_max_timestep > last:
            raise ConfigError(f"--gan_max_timestep must be ≤ {last}, the teacher's last timestep (got {self.gan_max_timestep})")

    @property
    def uses_gan(self) -> bool:
        """Whether the diffusion-GAN term is on (its real images are then guaranteed by :meth:`validate`)."""
        return self.gan_generator_weight > 0 or self.gan_critic_weight > 0

    def student_scheduler(self, teacher: Teacher) -> LCMScheduler:
        """The exported scheduler; the student's timesteps are read off it (training and sampling agree)."""
        return export.student_scheduler(teacher.pipeline.scheduler, first_timestep=self.conditioning_timestep)


def command_line(config_cls: type, main: Callable, prog: str) -> None:
    """A recipe's ``__main__``: parse the flags into ``config_cls``, run ``main``; bad input ends
    with one ``error:`` line (exit status 1) instead of a traceback, and so does a diverged run."""
    cfg = configs.parse(config_cls, prog=prog)
    try:
        main(cfg)
    except (PipelineError, ConfigError, DivergedError) as error:
        raise SystemExit(f"error: {error}") from None


def start(cfg: RunConfig) -> Accelerator:
    """Logging (stepdistill's info lines on stderr), accelerator, threads and seed; nothing is written yet."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("stepdistill").setLevel(logging.INFO)
    accelerator = make_accelerator(cfg.mixed_precision, cfg.report_to, cfg.output_dir)
    require_data_parallel(accelerator)
    set_cpu_threads(accelerator, cfg.num_threads)
    set_seed(cfg.seed)
    return accelerator


def open_output(cfg: RunConfig, accelerator: Accelerator, name: str) -> None:
    """Create the output folder with ``config.json`` and start the trackers: call once the teacher
    and data have loaded, so that a run refused for bad input leaves nothing behind."""
    if accelerator.is_main_process:
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
        configs.save(cfg, Path(cfg.output_dir) / "config.json")
    accelerator.init_trackers(f"stepdistill-{name}", config={k: str(v) if v is None else v for k, v in vars(cfg).items()})


@dataclass
class Setup:
    """What a recipe starts from: the device, the frozen teacher, the prompts (and real latents), batches."""

    accelerator: Accelerator
    teacher: Teacher
    prompts: list[str]
    real_latents: torch.Tensor | None
    next_batch: Callable[[], Batch]


def set_up(cfg: RunConfig, name: str) -> Setup | None:
    """Check the flags (``None`` on ``--dry_run``), then :func:`start`, load the teacher and the data,
    :func:`open_output` and make the batch sampler. Any bad input fails before a file is written."""
    cfg.validate()
    if cfg.dry_run:
        print("flags are valid; --dry_run set, exiting before loading any model")
        return None
    accelerator = start(cfg)
    teacher = load_teacher(cfg.pretrained_model_name_or_path, cfg.revision, cfg.variant)
    teacher.pipeline.to(accelerator.device)
    prompts, real_latents = training_data(cfg, teacher)
    open_output(cfg, accelerator, name)
    next_batch = batch_sampler(cfg, teacher, prompts, real_latents, accelerator.device)
    return Setup(accelerator, teacher, prompts, real_latents, next_batch)


def training_data(cfg: RunConfig, teacher: Teacher) -> tuple[list[str], torch.Tensor | None]:
    """Prompts to train on and, when available, the matching real images' latents."""
    if cfg.train_data_dir:
        images, captions = user_data.read_image_folder(cfg.train_data_dir, image_size(teacher))
        return captions, teacher.encode_images(images)
    if cfg.prompts_file:
        return user_data.read_prompts(cfg.prompts_file), None
    train = digits.load_digits("train")  # the digits default: captions and images of the train split
    return train.prompts, teacher.encode_images(train.images)


def batch_sampler(
    cfg: RunConfig, teacher: Teacher, prompts: list[str], real_latents: torch.Tensor | None, device: torch.device
) -> Callable[[], Batch]:
    """``next_batch()``: ``train_batch_size`` random prompts' cached text embeddings, the empty
    prompt's, and the matching real latents (when there are any)."""
    text = teacher.encode_prompts(prompts)
    uncond = teacher.encode_prompts([""]).expand(cfg.train_batch_size, -1, -1).to(device)

    def next_batch() -> Batch:
        pick = torch.randint(len(text), (cfg.train_batch_size,))
        return Batch(
            text=text[pick].to(device), uncond=uncond,
            real_latents=real_latents[pick].to(device) if real_latents is not None else None,
        )

    return next_batch


def image_size(teacher: Teacher) -> int:
    return teacher.unet.config.sample_size * teacher.pipeline.vae_scale_factor


def scores_digits(cfg: RunConfig, teacher: Teacher) -> bool:
    """Whether the offline digits metrics apply: digit prompts and 32×32 images."""
    return cfg.uses_digits and image_size(teacher) == digits.IMAGE_SIZE


def enable_gradient_checkpointing(cfg: RunConfig, nets: Networks) -> None:
    """``--gradient_checkpointing``: recompute activations in every trained UNet (each shared one once)."""
    if cfg.gradient_checkpointing:
        trained = (n for n in (nets.student, nets.fake_score) if n is not None)
        for unet in {id(n.unet): n.unet for n in trained}.values():
            unet.enable_gradient_checkpointing()


def trainer_config(cfg: RunConfig, critic_learning_rate: float | None = None) -> TrainerConfig:
    """The loop's settings from the shared flags (the critic learns at ``learning_rate`` unless given)."""
    return TrainerConfig(
        output_dir=cfg.output_dir, max_train_steps=cfg.max_train_steps, learning_rate=cfg.learning_rate,
        critic_learning_rate=critic_learning_rate or cfg.learning_rate, adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2, adam_weight_decay=cfg.adam_weight_decay,
        max_grad_norm=cfg.max_grad_norm, gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        mixed_precision=cfg.mixed_precision, lr_scheduler=cfg.lr_scheduler, lr_warmup_steps=cfg.lr_warmup_steps,
        ema_decay=cfg.ema_decay, checkpointing_steps=cfg.checkpointing_steps,
        checkpoints_total_limit=cfg.checkpoints_total_limit, resume_from_checkpoint=cfg.resume_from_checkpoint,
        validation_steps=cfg.validation_steps, max_consecutive_skips=cfg.max_consecutive_skips, seed=cfg.seed,
    )


def make_validator(
    cfg: RunConfig, teacher: Teacher, student: StudentModel, timesteps: tuple[int, ...], prompts: list[str]
) -> StudentValidator | None:
    """Validation every ``validation_steps``: FD-digits on the digits, a 16-prompt grid otherwise."""
    if not cfg.validation_steps:
        return None
    if scores_digits(cfg, teacher):
        return StudentValidator(teacher, student, timesteps, digits.evaluation_prompts(cfg.num_validation_images),
                                cfg.output_dir, evaluator=DigitsEvaluator(), seed=cfg.seed)
    return StudentValidator(teacher, student, timesteps, prompts[: min(16, cfg.num_validation_images)], cfg.output_dir,
                            seed=cfg.seed)


def fake_score_trainer(cfg: RunConfig, setup: Setup, nets: Networks, method, critic_learning_rate: float) -> Trainer:
    """The trainer of a student against a fake score (and discriminator), validating the student: DMD2, SiD."""
    return Trainer(
        trainer_config(cfg, critic_learning_rate=critic_learning_rate),
        method,
        generator_modules=[nets.student.unet],
        generator_parameters=nets.generator_parameters(),
        critic_modules=[m for m in (nets.fake_score.unet, nets.discriminator) if m is not None],
        critic_parameters=nets.critic_parameters(),
        next_batch=setup.next_batch,
        accelerator=setup.accelerator,
        validate=make_validator(cfg, setup.teacher, nets.student, method.student_timesteps, setup.prompts),
    )


def finish(
    cfg: RunConfig, setup: Setup, trainer: Trainer, student_unet: nn.Module, adapter: str | None,
    scheduler: LCMScheduler | None = None, guidance_scale: float = 1.0, student_steps: tuple[int, ...] = (),
) -> None:
    """After training: end the trackers; on the main process export the student and score the export
    (:func:`export_student`, :func:`final_report`)."""
    setup.accelerator.end_training()
    training = trainer.summary()  # before the export and the report add to the peak memory
    if setup.accelerator.is_main_process:
        student_dir = export_student(cfg, setup.teacher, trainer, student_unet, adapter, scheduler, guidance_scale)
        final_report(cfg, setup.teacher, setup.prompts, student_dir, training, student_steps, guidance_scale)


def export_student(
    cfg: RunConfig, teacher: Teacher, trainer: Trainer, student_unet: nn.Module, adapter: str | None,
    scheduler: LCMScheduler | None = None, guidance_scale: float = 1.0,
) -> Path:
    """Write ``output_dir/student`` for plain diffusers (EMA weights if kept): LoRA or a full pipeline,
    with ``scheduler`` (default: :func:`export.student_scheduler` of the teacher's); ``guidance_scale``
    is the one to sample at (1, unless the student takes it as an input)."""
    if trainer.ema is not None:
        trainer.ema.copy_to_parameters()
    student_unet = trainer.accelerator.unwrap_model(student_unet)
    student_dir = Path(cfg.output_dir) / "student"
    if cfg.use_lora:
        export.export_lora(teacher.pipeline, student_unet, adapter, student_dir, cfg.num_student_steps, scheduler)
    else:
        export.export_full(teacher.pipeline, student_unet, student_dir, cfg.num_student_steps, scheduler, guidance_scale)
    steps = trainer.progress.step
    print(f"trained {steps} step{'' if steps == 1 else 's'} in {trainer.progress.seconds / 60:.1f} min; student written to {student_dir}")
    return student_dir


def final_report(
    cfg: RunConfig, teacher: Teacher, prompts: list[str], student_dir: Path, training: dict,
    student_steps: tuple[int, ...] = (), student_guidance_scale: float = 1.0,
) -> list[report.Result]:
    """Score the exported student (as plain diffusers loads it) and the teacher on the same noise,
    and write ``report.json``: the run's cost (``training``, from :meth:`Trainer.summary`), its
    flags and the scores.

    On the digits: FD-digits and prompt accuracy at 1 and N student steps (and ``student_steps``)
    and for the teacher, with grids; otherwise a grid of the first 16 training prompts;
    ``--eval_num_samples 0`` scores nothing. ``validation_curve.png``: the validations' FD-digits
    against steps, whenever the run validated on the digits. Students sample at
    ``student_guidance_scale`` (1: distilled in; else a guidance-scale input's value).
    """
    output_dir = Path(cfg.output_dir)
    results: list[report.Result] = []
    extra: dict = {}
    if cfg.eval_num_samples and scores_digits(cfg, teacher):
        student, _ = export.load_student(student_dir, cfg.pretrained_model_name_or_path, cfg.revision, cfg.variant)
        eval_prompts = digits.evaluation_prompts(cfg.eval_num_samples)
        scorers = report.Scorers(digits=DigitsEvaluator())
        steps = tuple(sorted({1, cfg.num_student_steps, *student_steps}))
        results = report.evaluate(student, "student", steps, (student_guidance_scale,), eval_prompts, scorers,
                                  output_dir, seed=cfg.seed)
        if cfg.teacher_eval_steps:
            select_adapter(teacher.unet, None)  # with --use_lora the student's adapters live on the teacher's UNet
            results += report.evaluate(teacher.pipeline, "teacher", (cfg.teacher_eval_steps,), (cfg.guidance_scale,),
                                       eval_prompts, scorers, output_dir, seed=cfg.seed)
        extra["real_vs_real_fd_digits"] = floor = scorers.digits.real_floor(cfg.eval_num_samples)
        print(report.markdown_table(results))
        print(f"\nreal-vs-real FD-digits floor at {cfg.eval_num_samples} samples: {floor:.3f}")
    elif cfg.eval_num_samples:
        student, _ = export.load_student(student_dir, cfg.pretrained_model_name_or_path, cfg.revision, cfg.variant)
        images, _ = generate(student, prompts[:16], cfg.num_student_steps, student_guidance_scale, seed=cfg.seed)
        save_grid(images, output_dir / "student_grid.png", num_columns=4)
    plots.plot_validation_curve(  # nothing without digits validations; teacher and floor lines when scored
        output_dir / "train_log.jsonl", output_dir / "validation_curve.png",
        next((r.fd_digits for r in results if r.model == "teacher"), None), extra.get("real_vs_real_fd_digits"),
        label=f"student, {cfg.num_student_steps} step{'s' if cfg.num_student_steps > 1 else ''}",
        teacher_label=f"teacher, {cfg.teacher_eval_steps} steps", num_samples=cfg.num_validation_images,
    )
    report.write_report(results, output_dir / "report.json", **extra, training=training, config=vars(cfg))
    return results
