"""The trainer from the shared flags: the loop's settings, validation, the fake-score methods' trainer and the
student-only one."""

from __future__ import annotations

from collections.abc import Callable

from stepdistill.data import digits
from stepdistill.evaluation.digits_metrics import DigitsEvaluator
from stepdistill.evaluation.validation import StudentModel, StudentValidator
from stepdistill.models.networks import Networks
from stepdistill.models.teacher import Teacher
from stepdistill.run.flags import PARALLELISM, RunConfig
from stepdistill.run.setup import Setup, scores_digits
from stepdistill.trainer import Trainer, TrainerConfig


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
        layout=PARALLELISM[cfg.parallelism],
    )


def make_validator(
    cfg: RunConfig, teacher: Teacher, student: StudentModel,
    timesteps: tuple[float, ...] | Callable[[], tuple[float, ...]], prompts: list[str], deterministic: bool = False,
) -> StudentValidator | None:
    """Validation every ``validation_steps``: a grid of ``--validation_prompts`` when given, else
    FD-digits on the digits, else a grid of 16 training prompts (:class:`StudentValidator` says
    what ``timesteps`` and ``deterministic`` may be)."""
    if not cfg.validation_steps:
        return None
    options = dict(seed=cfg.seed, deterministic=deterministic)
    if cfg.validation_prompts:
        return StudentValidator(teacher, student, timesteps, list(cfg.validation_prompts), cfg.output_dir, **options)
    if scores_digits(cfg, teacher):
        return StudentValidator(teacher, student, timesteps, digits.evaluation_prompts(cfg.num_validation_images),
                                cfg.output_dir, evaluator=DigitsEvaluator(), **options)
    return StudentValidator(teacher, student, timesteps, prompts[: min(16, cfg.num_validation_images)], cfg.output_dir,
                            **options)


def critic_trainer(cfg: RunConfig, setup: Setup, nets: Networks, method, critic_learning_rate: float) -> Trainer:
    """The trainer of a student against a critic, validating the student: a fake score (and GAN head) in
    DMD2 and SiD, a discriminator alone in ADD / LADD."""
    return Trainer(
        trainer_config(cfg, critic_learning_rate=critic_learning_rate),
        method,
        generator_modules=[nets.student.network],
        generator_parameters=nets.generator_parameters(),
        critic_modules=[m for m in (nets.fake_score and nets.fake_score.network, nets.discriminator) if m is not None],
        critic_parameters=nets.critic_parameters(),
        next_batch=setup.next_batch,
        accelerator=setup.accelerator,
        validate=make_validator(cfg, setup.teacher, nets.student, method.student_timesteps, setup.prompts),
        frozen_modules=[nets.teacher.network],
    )


def student_trainer(
    trainer_cfg: TrainerConfig, setup: Setup, nets: Networks, method, validate: StudentValidator | None,
    end_stage: Callable[[int], None] | None = None,
) -> Trainer:
    """The trainer of a student alone, with no critic: consistency and progressive distillation."""
    return Trainer(
        trainer_cfg,
        method,
        generator_modules=[nets.student.network],
        generator_parameters=nets.generator_parameters(),
        critic_modules=[],
        critic_parameters=[],
        next_batch=setup.next_batch,
        accelerator=setup.accelerator,
        validate=validate,
        end_stage=end_stage,
        frozen_modules=[nets.teacher.network],
    )
