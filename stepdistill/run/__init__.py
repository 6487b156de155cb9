"""What every distillation run does around its method: flags, set-up, data, validation, export, report.

A recipe subclasses :class:`RunConfig` (or :class:`CriticConfig`, :class:`FakeScoreConfig`) with its method's flags and
calls these in order:

    setup = set_up(cfg, "dmd2")     # checked flags, seeds, threads, teacher, data, config.json, batches
    ... build the networks and the method from setup.teacher ...
    trainer = critic_trainer(cfg, setup, nets, method, cfg.critic_learning_rate)  # or student_trainer(...)
    trainer.fit()
    finish(cfg, setup, trainer, student_network, adapter, scheduler)  # export for plain diffusers, score it, report.json

Modules: :mod:`.flags` (the shared flags), :mod:`.setup`, :mod:`.data` (streamed users' data), :mod:`.training` (trainer and validator
assembly), :mod:`.end` (export and report), :mod:`.cli` (a recipe's ``__main__``).
"""

from stepdistill.run.cli import command_line
from stepdistill.run.end import export_student, final_report, finish
from stepdistill.run.flags import CriticConfig, FakeScoreConfig, GuidanceRangeConfig, RunConfig
from stepdistill.run.setup import (
    Setup, enable_gradient_checkpointing, in_memory_batches, open_output, scores_digits, set_up, start,
    student_scheduler,
)
from stepdistill.run.training import critic_trainer, make_validator, student_trainer, trainer_config

__all__ = [
    "CriticConfig", "FakeScoreConfig", "GuidanceRangeConfig", "RunConfig", "Setup", "command_line", "enable_gradient_checkpointing",
    "in_memory_batches",
    "export_student", "critic_trainer", "final_report", "finish", "make_validator", "open_output",
    "scores_digits", "set_up", "start", "student_scheduler", "student_trainer", "trainer_config",
]
