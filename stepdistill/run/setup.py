"""Before training: checked flags, logging, accelerator, seed, teacher, data, the output folder and batches."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from diffusers.schedulers.scheduling_utils import SchedulerMixin

from stepdistill import conditioning, draws, export
from stepdistill import config as configs
from stepdistill.config import ConfigError
from stepdistill.data import digits
from stepdistill.diffusion import FlowProcess
from stepdistill.methods.base import Batch
from stepdistill.models.networks import Networks
from stepdistill.models.teacher import Teacher, load_teacher
from stepdistill.run import data
from stepdistill.run.flags import CriticConfig, RunConfig
from stepdistill.trainer import make_accelerator, require_supported_engine, set_cpu_threads

logger = logging.getLogger(__name__)


def start(cfg: RunConfig) -> Accelerator:
    """Logging (stepdistill's info lines on stderr), accelerator, threads and seed; nothing is written
    yet (``config.json`` keeps ``--mixed_precision`` as given; the run's summary records what ran)."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("stepdistill").setLevel(logging.INFO)
    accelerator = make_accelerator(cfg.mixed_precision, cfg.report_to, cfg.output_dir, cfg.logging_dir)
    if cfg.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    require_supported_engine(accelerator)
    set_cpu_threads(accelerator, cfg.num_threads)
    set_seed(cfg.seed)
    return accelerator


# Flags a resumed run may change without changing what its checkpoints continue.
RESUMABLE_CHANGES = frozenset({
    "resume_from_checkpoint", "max_train_steps", "output_dir", "dry_run", "num_threads", "checkpointing_steps",
    "checkpoints_total_limit", "report_to", "tracker_project_name", "logging_dir", "validation_steps",
    "validation_prompts", "num_validation_images", "eval_num_samples", "teacher_eval_steps",
    "teacher_eval_guidance_scale", "allow_tf32",
})


def open_output(cfg: RunConfig, accelerator: Accelerator, name: str) -> None:
    """Create the output folder with ``config.json`` and start the trackers: call once the teacher
    and data have loaded, so that a run refused for bad input leaves nothing behind. A resumed run
    whose flags differ from the ``config.json`` it continues says which, in one warning line."""
    path = Path(cfg.output_dir) / "config.json"
    if accelerator.is_main_process:
        if cfg.resume_from_checkpoint and path.is_file():
            before, now = json.loads(path.read_text()), configs.as_json(cfg)
            changed = [f"--{key} {before.get(key)} → {value}" for key, value in now.items()
                       if key not in RESUMABLE_CHANGES and before.get(key) != value]
            if changed:
                logger.warning("resuming with flags other than those of the run it continues: " + ", ".join(changed))
        try:
            Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ConfigError(f"--output_dir {cfg.output_dir} cannot be created ({error.strerror})") from None
        configs.save(cfg, path)
    tracked = {key: str(value) if value is None else value for key, value in vars(cfg).items()}
    accelerator.init_trackers(cfg.tracker_project_name or f"stepdistill-{name}", config=tracked)


@dataclass
class Setup:
    """What a recipe starts from: the device, the frozen teacher, training prompts (all of the digits',
    a sample of up to 1,024 of streamed data) and ``next_batch``."""

    accelerator: Accelerator
    teacher: Teacher
    prompts: list[str]
    next_batch: Callable[[], Batch]


def set_up(cfg: RunConfig, name: str) -> Setup | None:
    """Check the flags (``None`` on ``--dry_run``), then :func:`start`, load the teacher, open the data,
    :func:`open_output` and make the batches. Any bad input fails before a file is written."""
    cfg.validate()
    if cfg.dry_run:
        print("flags are valid; --dry_run set, exiting before loading any model")
        return None
    accelerator = start(cfg)
    teacher = load_teacher(cfg.pretrained_model_name_or_path, cfg.revision, cfg.variant, cfg.resolution,
                           cfg.timestep_sampling, cfg.logit_mean, cfg.logit_std, cfg.timestep_shift)
    cfg.validate_teacher(teacher)
    cfg.resolve_defaults(teacher)
    teacher.pipeline.to(accelerator.device)
    if cfg.uses_digits:
        prompts, next_batch = in_memory_batches(cfg, teacher, accelerator.device)
    else:
        prompts, next_batch, has_images = data.batch_stream(cfg, teacher, accelerator)
        if cfg.needs_real_images and not has_images:
            raise ConfigError(f"--cache_dir {cfg.cache_dir} holds prompts only, and this run trains on real images: "
                              "cache a --train_data_dir")
    open_output(cfg, accelerator, name)
    return Setup(accelerator, teacher, prompts, next_batch)


def in_memory_batches(cfg: RunConfig, teacher: Teacher, device: torch.device) -> tuple[list[str], Callable[[], Batch]]:
    """The embedded digits' train split, encoded up front, and ``next_batch()``: ``train_batch_size``
    random examples' cached conditions and latents (drawn with replacement from torch's generator,
    which checkpoints keep), with the unconditional condition."""
    train = digits.load_digits("train")
    condition, real_latents = teacher.encode_prompts(train.prompts), teacher.encode_images(train.images)
    unconditional = conditioning.to(conditioning.expand(teacher.encode_unconditional(), cfg.train_batch_size), device)

    def next_batch() -> Batch:
        pick = draws.randint(0, conditioning.batch_size(condition), (cfg.train_batch_size,))
        return Batch(condition=conditioning.to(conditioning.select(condition, pick), device), unconditional=unconditional,
                     real_latents=real_latents[pick].to(device))

    return train.prompts, next_batch


def student_scheduler(cfg: CriticConfig, teacher: Teacher) -> SchedulerMixin:
    """The scheduler a critic method's student (DMD2, SiD, ADD) is exported with; its timesteps are read off it
    (training and sampling agree). On a DDPM-family teacher it starts at ``cfg.first_timestep``."""
    first = None if isinstance(teacher.process, FlowProcess) else cfg.first_timestep
    return export.student_scheduler(teacher.pipeline.scheduler, teacher.process, first_timestep=first)


def scores_digits(cfg: RunConfig, teacher: Teacher) -> bool:
    """Whether the offline digits metrics apply: digit prompts and 32×32 images."""
    return cfg.uses_digits and teacher.resolution == digits.IMAGE_SIZE


def enable_gradient_checkpointing(cfg: RunConfig, nets: Networks) -> None:
    """``--gradient_checkpointing``: recompute activations in every trained network (each shared one once)."""
    if cfg.gradient_checkpointing:
        trained = (n for n in (nets.student, nets.fake_score) if n is not None)
        for network in {id(n.network): n.network for n in trained}.values():
            network.enable_gradient_checkpointing()
