"""The flags every recipe shares: :class:`RunConfig`, and :class:`FakeScoreConfig` for the methods with a fake score."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate.tracking import get_available_trackers
from accelerate.utils import LoggerType
from diffusers import DDIMScheduler  # any scheduler class reads any scheduler config
from diffusers.optimization import SchedulerType

from stepdistill import config as configs
from stepdistill.assets import DIGITS_TEACHER, pipeline_location, shipped_best_guidance
from stepdistill.config import ConfigError, field
from stepdistill.data import sources
from stepdistill.data.cache import MANIFEST
from stepdistill.data.loader import BAD_IMAGE_CHOICES
from stepdistill.diffusion import TIMESTEP_SAMPLINGS
from stepdistill.models.loading import PipelineError, require_pipeline_location
from stepdistill.checkpoints import CheckpointError, find_checkpoint
from stepdistill.trainer import FP16_ON_CPU


DEFAULT_GUIDANCE_SCALE = 1.5  # the distilled CFG scale on a teacher that is not shipped (the digits teacher's best)
PARALLELISM = {"auto": "auto", "data": "replicate", "fsdp": "shard"}  # --parallelism → the trainer's layout
LR_SCHEDULES = tuple(s.value for s in SchedulerType if s is not SchedulerType.PIECEWISE_CONSTANT)
TRACKERS = ("auto", "none", *(t.value for t in LoggerType if t.value != "all"))


# The data flags that shape streamed data only, at their defaults (set on the in-memory digits: refused).
STREAMED_DATA_DEFAULTS = {"image_column": "image", "caption_column": "text", "center_crop": True, "random_flip": False,
                          "on_bad_image": "stop", "dataloader_num_workers": 0}


@dataclass
class TeacherDataConfig:
    """The teacher and the data it reads: the flags a recipe and ``python -m stepdistill cache`` share."""

    pretrained_model_name_or_path: str = field(str(DIGITS_TEACHER), "teacher pipeline folder or hub id, or a shipped "
                                                                     "teacher: digits (ε UNet, the default) or "
                                                                     "digits-sd3 (flow-matching MMDiT)")
    revision: str | None = field(None, "hub revision of the teacher")
    variant: str | None = field(None, "weight variant of the teacher, e.g. fp16")
    resolution: int | None = field(None, "image side in px (default: the teacher's own; a multiple of its VAE and "
                                         "patch size)", at_least=8)
    prompts_file: str | None = field(None, ".txt / .jsonl prompts, read lazily (default: the digits captions)")
    train_data_dir: str | None = field(None, "captioned real images: a folder with metadata.jsonl, a datasets folder "
                                             "(save_to_disk) or Parquet files, or tar shards 'shards/{00000..00099}.tar'")
    image_column: str = field("image", "image column of a datasets --train_data_dir")
    caption_column: str = field("text", "caption column of a datasets --train_data_dir")
    center_crop: bool = field(True, "crop images to their centre square (false: a random square)")
    on_bad_image: str = field("stop", "an unreadable training image: stop the run naming it, or skip it (each "
                                      "skip is logged with its file)", choices=BAD_IMAGE_CHOICES)
    dataloader_num_workers: int = field(0, "processes reading and cropping images ahead of training (0: the main "
                                           "process)", at_least=0)

    def __post_init__(self) -> None:
        self.pretrained_model_name_or_path = pipeline_location(self.pretrained_model_name_or_path)

    def validate_data(self) -> None:
        """The data flags' checks that read nothing but the folder layout."""
        if self.prompts_file and self.train_data_dir:
            raise ConfigError("give --prompts_file or --train_data_dir (whose captions are the prompts), not both")
        if self.prompts_file and not Path(self.prompts_file).is_file():
            raise ConfigError(f"--prompts_file {self.prompts_file} does not exist")
        problem = sources.layout_problem(self.train_data_dir) if self.train_data_dir else None
        if problem:
            raise ConfigError(f"--train_data_dir {problem}")


@dataclass
class RunConfig(TeacherDataConfig):
    """Flags every recipe shares; a recipe's config subclasses this and adds its method's flags."""

    # model
    use_lora: bool = field(False, "train LoRA adapters on the frozen teacher network instead of full copies")
    lora_rank: int = field(16, "LoRA rank", at_least=1)
    timestep_sampling: str = field("uniform", "how training noise levels are drawn: uniform, or logit_normal "
                                              "(flow-matching teachers: σ = shift(sigmoid(z)), z ~ N(m, s²), SD3's)",
                                   choices=TIMESTEP_SAMPLINGS)
    logit_mean: float = field(0.0, "m of --timestep_sampling logit_normal")
    logit_std: float = field(1.0, "s of --timestep_sampling logit_normal", greater_than=0)
    timestep_shift: float | None = field(None, "flow-matching teachers: the σ shift (default: the scheduler's; Flux's "
                                               "dynamic shift at --resolution)", greater_than=0)
    # data (beside the teacher's and the data's flags above)
    cache_dir: str | None = field(None, "latents and text-encoder outputs written by python -m stepdistill cache, "
                                        "instead of --train_data_dir / --prompts_file")
    random_flip: bool = field(False, "flip training images left-right at random")
    # student
    num_student_steps: int = field(1, "sampling steps of the student (1-8 typical, at most 50)", at_least=1)
    guidance_scale: float | None = field(None, "teacher classifier-free guidance distilled into the student (default: "
                                               "a shipped teacher's best, 1.5 for digits, 1 for digits-sd3; 1.5 for "
                                               "other teachers)", at_least=0)
    # optimisation
    output_dir: str = field("outputs/run", "where checkpoints, the student and report.json go")
    max_train_steps: int = field(300, "student (generator) updates", at_least=1)
    train_batch_size: int = field(32, "batch size of every update", at_least=1)
    learning_rate: float = field(1e-4, "student AdamW learning rate", greater_than=0)
    lr_scheduler: str = field("constant", "learning-rate schedule of every optimiser (diffusers' names)",
                              choices=LR_SCHEDULES)
    lr_warmup_steps: int = field(0, "warm-up updates of the schedule", at_least=0)
    adam_beta1: float = field(0.9, "AdamW β1 of every optimiser (0 is common for adversarial games: SiD, GANs)",
                              at_least=0, below=1)
    adam_beta2: float = field(0.999, "AdamW β2 of every optimiser", at_least=0, below=1)
    adam_weight_decay: float = field(0.01, "AdamW weight decay")
    max_grad_norm: float = field(10.0, "gradient-norm clip (0: off)", at_least=0)
    max_consecutive_skips: int = field(10, "stop the run after this many non-finite (skipped) updates in a row",
                                       at_least=1)
    gradient_accumulation_steps: int = field(1, "micro-batches per update", at_least=1)
    mixed_precision: str | None = field(None, "autocast precision of the forward passes (default: accelerate's config or "
                                              "`accelerate launch --mixed_precision`, else no); fp16 needs a GPU",
                                        choices=("no", "fp16", "bf16"))
    gradient_checkpointing: bool = field(False, "trade compute for memory in the trained networks")
    parallelism: str = field("auto", "on several processes: data (every process holds all weights, gradients "
                                     "averaged) or fsdp (weights, gradients and AdamW state of every network split "
                                     "over the processes, FSDP2); auto: fsdp when accelerate is configured for FSDP",
                             choices=tuple(PARALLELISM))
    ema_decay: float = field(0.0, "EMA of the student weights that get exported (0: off)", at_least=0, below=1)
    seed: int = field(0, "seed of everything")
    num_threads: int = field(0, "CPU threads for torch (0: all cores, shared among processes)", at_least=0)
    checkpointing_steps: int = field(0, "save a resumable checkpoint every N steps (0: off)", at_least=0)
    checkpoints_total_limit: int = field(2, "keep this many checkpoints", at_least=1)
    resume_from_checkpoint: str | None = field(None, "'latest' (the newest intact checkpoint in --output_dir; none yet: "
                                                     "a fresh start), a checkpoint folder, or its name in --output_dir")
    allow_tf32: bool = field(False, "let Ampere+ GPUs run fp32 matmuls and convolutions in TF32 (faster, ~3 digits)")
    # monitoring and evaluation
    report_to: str = field("auto", "accelerate tracker, none, or auto: tensorboard if installed", choices=TRACKERS)
    tracker_project_name: str | None = field(None, "the trackers' project / run name (default: stepdistill-<recipe>)")
    logging_dir: str = field("logs", "where the trackers write (TensorBoard), relative to --output_dir")
    validation_steps: int = field(50, "sample, grid and score the student every N steps (0: off)", at_least=0)
    validation_prompts: tuple[str, ...] | None = field(None, "prompts of the validation grid, one quoted argument "
                                                           "each (none: the scored digit prompts, or 16 training "
                                                           "prompts)", one_per_argument=True)
    num_validation_images: int = field(1000, "images per validation (digits: FD-digits + accuracy; else a grid of "
                                             "at most 16 training prompts; not with --validation_prompts)",
                                       at_least=1)
    eval_num_samples: int = field(1000, "samples for the final FD-digits / accuracy report (digits teacher; 0: none)",
                                  at_least=0)
    teacher_eval_steps: int = field(50, "DDIM steps of the teacher row of the report (0: skip it)", at_least=0)
    teacher_eval_guidance_scale: float | None = field(None, "CFG scale of the report's teacher row (default: a shipped "
                                                            "teacher's best; another teacher's --guidance_scale)",
                                                      at_least=0)
    dry_run: bool = field(False, "validate the flags and exit")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.guidance_scale is None:
            self.guidance_scale = self.default_guidance_scale()

    def default_guidance_scale(self) -> float:
        """The distilled CFG scale when the flag is not given: the shipped teacher's best, else 1.5."""
        best = shipped_best_guidance(self.pretrained_model_name_or_path)
        return DEFAULT_GUIDANCE_SCALE if best is None else best

    def validate(self) -> None:
        """Every check that needs no model, run before anything is loaded: the declared ranges, then the
        checks between flags; recipes extend it."""
        configs.check_ranges(self)
        if self.timestep_sampling == "uniform" and (self.logit_mean, self.logit_std) != (0.0, 1.0):
            raise ConfigError("--logit_mean and --logit_std shape --timestep_sampling logit_normal; the sampling is "
                              "uniform")
        if (self.timestep_sampling != "uniform" or self.timestep_shift is not None) and not self.teacher_is_flow_matching():
            raise ConfigError(f"--timestep_sampling logit_normal and --timestep_shift are for flow-matching teachers "
                              f"(SD3, Flux); this teacher's scheduler is {self.teacher_scheduler_config().get('_class_name', '')}")
        if self.num_student_steps > 50:
            raise ConfigError(f"--num_student_steps must be ≤ 50, the student scheduler's grid (got {self.num_student_steps})")
        if self.eval_num_samples == 1:
            raise ConfigError("--eval_num_samples must be 0 (no report) or ≥ 2 (FD needs two samples)")
        if self.use_lora and self.gradient_checkpointing:
            raise ConfigError(
                "--gradient_checkpointing needs full weights (--use_lora false): with LoRA adapters the recomputed "
                "forward would run with the wrong adapter active"
            )
        if self.mixed_precision == "fp16" and not torch.cuda.is_available():
            raise ConfigError(FP16_ON_CPU)
        if self.report_to not in ("auto", "none") and self.report_to not in get_available_trackers():
            raise ConfigError(f"--report_to {self.report_to}: the package is not installed (pip install {self.report_to})")
        self.validate_data()
        streamed_only = [f"--{name}" for name, default in STREAMED_DATA_DEFAULTS.items() if getattr(self, name) != default]
        if self.uses_digits and streamed_only:
            raise ConfigError(f"{', '.join(streamed_only)}: for streamed data (--train_data_dir, --prompts_file, "
                              "--cache_dir); the embedded digits are read in memory")
        if self.cache_dir and (self.prompts_file or self.train_data_dir):
            raise ConfigError("--cache_dir holds the data it was made from: drop --prompts_file / --train_data_dir")
        if self.cache_dir and not (Path(self.cache_dir) / MANIFEST).is_file():
            raise ConfigError(f"--cache_dir {self.cache_dir} is not a finished cache (no {MANIFEST}): write it with "
                              "python -m stepdistill cache")
        if self.cache_dir and self.random_flip:
            raise ConfigError("--random_flip needs images, and --cache_dir holds their latents: cache without it")
        configs.require_writable_dir(self.output_dir, "--output_dir")
        if self.resume_from_checkpoint:  # resolved again, with warnings, when the run resumes
            try:
                find_checkpoint(self.output_dir, self.resume_from_checkpoint, warn=False)
            except CheckpointError as error:
                raise ConfigError(f"--resume_from_checkpoint {self.resume_from_checkpoint}: {error}") from None

    def validate_teacher(self, teacher) -> None:
        """The checks that need the loaded teacher (its backbone), run before anything is written."""
        if self.guidance_scale != 1 and not teacher.backbone.guidance_is_possible(teacher.network):
            raise ConfigError(f"--guidance_scale {self.guidance_scale}: this {type(teacher.network).__name__} has "
                              "neither a guidance input nor unconditional training (FLUX.1-schnell); pass "
                              "--guidance_scale 1")

    def resolve_defaults(self, teacher) -> None:
        """Write the teacher's own value into the flags left at "the teacher's" (the flow σ shift, static
        or Flux's dynamic one at --resolution), so that ``config.json`` records what the run used."""
        if self.timestep_shift is None and teacher.process.prediction_type == "flow":
            self.timestep_shift = teacher.process.shift

    def teacher_is_flow_matching(self) -> bool:
        """Whether the teacher's scheduler is a flow-matching one (SD3, Flux), read off its config."""
        return "FlowMatch" in self.teacher_scheduler_config().get("_class_name", "")

    def require_ddim_step_counts(self, flag: str, counts: tuple[int, ...]) -> None:
        """A deterministic student exported with diffusers' DDIMScheduler steps t → t − T // N, which lands
        on DDIM's own next timestep (the trainer's sampler) only when N divides T; a flow teacher's Euler
        scheduler takes any N."""
        if self.teacher_is_flow_matching():
            return
        num_train_timesteps = self.teacher_scheduler_config()["num_train_timesteps"]
        for count in counts:
            if num_train_timesteps % count:
                raise ConfigError(f"{flag} {count} must divide the teacher's {num_train_timesteps} timesteps: diffusers' "
                                  f"DDIM steps by T // N (e.g. 1, 2, 4, 8)")

    def teacher_scheduler_config(self) -> dict:
        """The teacher's scheduler config, read without loading a model (for checks that need its T)."""
        try:
            require_pipeline_location(self.pretrained_model_name_or_path, self.revision)
        except PipelineError as error:
            raise ConfigError(f"--pretrained_model_name_or_path: {error}") from None
        try:
            return DDIMScheduler.load_config(self.pretrained_model_name_or_path, subfolder="scheduler", revision=self.revision)
        except (OSError, ValueError) as error:
            raise ConfigError(f"--pretrained_model_name_or_path {self.pretrained_model_name_or_path}: cannot read its "
                              f"scheduler config ({str(error).strip().splitlines()[0]})") from None

    @property
    def teacher_report_guidance_scale(self) -> float:
        """The CFG scale of the report's teacher row: the flag's, else the shipped teacher's best, else
        the distilled scale."""
        if self.teacher_eval_guidance_scale is not None:
            return self.teacher_eval_guidance_scale
        best = shipped_best_guidance(self.pretrained_model_name_or_path)
        return self.guidance_scale if best is None else best

    @property
    def needs_real_images(self) -> bool:
        """Whether the method trains on real images (recipes whose method noises them say so)."""
        return False

    @property
    def uses_digits(self) -> bool:
        """Whether the run trains on the embedded digits data (and so can be scored offline)."""
        return not (self.prompts_file or self.train_data_dir or self.cache_dir)


DEFAULT_CONDITIONING_TIMESTEP = 625  # SiD's initial timestep on SD's 1,000-step schedule


@dataclass
class CriticConfig(RunConfig):
    """Flags of the methods that train a critic against a few-step student from pure noise: a fake score
    (DMD2, SiD) or a discriminator (ADD, LADD)."""

    critic_learning_rate: float = field(1e-4, "fake score / discriminator AdamW learning rate", greater_than=0)
    critic_steps_per_generator_step: int = field(1, "critic updates per student update (TTUR)", at_least=1)
    conditioning_timestep: int | None = field(None, "DDPM-family teachers: timestep of the student's first step from "
                                                    "pure noise (default 625, SiD's; the DMD2 paper's is 999); the "
                                                    "export samples there. Flow students start at σ = 1")

    def validate(self) -> None:
        super().validate()
        last = self.last_timestep
        if last is None and self.conditioning_timestep is not None:
            raise ConfigError("--conditioning_timestep is for DDPM-family teachers: a flow-matching student "
                              "starts from pure noise at σ = 1")
        if last is not None and not 1 <= self.first_timestep <= last:
            raise ConfigError(f"--conditioning_timestep must be in [1, {last}], the teacher's timesteps "
                              f"(got {self.conditioning_timestep})")

    @property
    def last_timestep(self) -> int | None:
        """A DDPM-family teacher's last timestep (T − 1), read off its scheduler config; ``None`` on a flow."""
        if self.teacher_is_flow_matching():
            return None
        return self.teacher_scheduler_config()["num_train_timesteps"] - 1

    @property
    def first_timestep(self) -> int:
        """The student's first timestep on a DDPM-family teacher (--conditioning_timestep, default 625)."""
        return DEFAULT_CONDITIONING_TIMESTEP if self.conditioning_timestep is None else self.conditioning_timestep


@dataclass
class FakeScoreConfig(CriticConfig):
    """Flags shared by the methods that train a fake score against the student (DMD2, SiD)."""

    gan_generator_weight: float = field(0.0, "weight of the GAN term in the student loss (0: off; needs real images)",
                                       at_least=0)
    gan_critic_weight: float = field(0.0, "weight of the GAN term in the critic loss (0: off; needs real images)",
                                     at_least=0)
    gan_max_timestep: int = field(999, "the GAN sees real and student latents noised to t ≤ this (lower: finer "
                                       "detail)", at_least=0)
    per_step_fake_score: bool = field(False, "few-step students: tell the fake score which step made each sample, so "
                                             "it learns each step's outputs apart, not their mixture (not in the "
                                             "papers; full weights only; the step embedding learns at 10× "
                                             "--critic_learning_rate)")

    @property
    def needs_real_images(self) -> bool:
        return self.uses_gan

    def validate(self) -> None:
        super().validate()
        if self.uses_gan and self.prompts_file:
            raise ConfigError("the GAN term needs real images: give --train_data_dir instead of --prompts_file, "
                              "or --gan_generator_weight 0 --gan_critic_weight 0")
        last = self.last_timestep
        last = 1000 if last is None else last  # a flow teacher's timesteps are 1000σ, σ ∈ [0, 1]
        if self.per_step_fake_score and (self.use_lora or self.num_student_steps == 1):
            raise ConfigError("--per_step_fake_score needs --num_student_steps > 1 and a full-weight fake score "
                              "(--use_lora false): LoRA shares the UNet with the teacher, which has no step input")
        if self.gan_max_timestep > last:
            raise ConfigError(f"--gan_max_timestep must be ≤ {last}, the teacher's last timestep (got {self.gan_max_timestep})")

    def validate_teacher(self, teacher) -> None:
        super().validate_teacher(teacher)
        if self.per_step_fake_score and not teacher.backbone.has_embedding_slots():
            raise ConfigError(f"--per_step_fake_score needs a UNet teacher (its class-label slot); this one is a "
                              f"{type(teacher.network).__name__}")

    @property
    def uses_gan(self) -> bool:
        """Whether the diffusion-GAN term is on (its real images are then guaranteed by :meth:`validate`)."""
        return self.gan_generator_weight > 0 or self.gan_critic_weight > 0

    @property
    def fake_score_steps(self) -> int:
        """How many generation steps the fake score tells apart (1: it learns their mixture)."""
        return self.num_student_steps if self.per_step_fake_score else 1


@dataclass
class GuidanceRangeConfig(RunConfig):
    """Flags of the methods that may draw the teacher's guidance scale from a range (consistency,
    guidance distillation): w ~ U[--guidance_scale, --guidance_scale_max]."""

    guidance_scale_max: float | None = field(None, "teacher CFG range's upper end, w ~ U[guidance_scale, this] "
                                                   "(default: fixed)")

    @property
    def guidance_range(self) -> tuple[float, float]:
        return self.guidance_scale, self.guidance_scale if self.guidance_scale_max is None else self.guidance_scale_max

    def validate(self) -> None:
        super().validate()
        low, high = self.guidance_range
        if high < low:
            raise ConfigError(f"--guidance_scale_max ({high}) must be ≥ --guidance_scale ({low}), the lower end")
