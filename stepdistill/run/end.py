"""After training: export the student for plain diffusers, score it and write ``report.json``."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

from diffusers.schedulers.scheduling_utils import SchedulerMixin
from torch import nn

from stepdistill import export, sharding
from stepdistill.data import digits
from stepdistill.evaluation import plots, report
from stepdistill.evaluation.digits_metrics import DigitsEvaluator
from stepdistill.evaluation.grid import save_grid
from stepdistill.evaluation.sampling import generate
from stepdistill.models import networks
from stepdistill.models.denoiser import select_adapter
from stepdistill.models.teacher import Teacher
from stepdistill.run.flags import RunConfig
from stepdistill.run.setup import Setup, scores_digits
from stepdistill.trainer import Trainer


def finish(
    cfg: RunConfig, setup: Setup, trainer: Trainer, student_network: nn.Module, adapter: str | None,
    scheduler: SchedulerMixin, guidance_scale: float = 1.0, student_steps: tuple[int, ...] = (),
    earlier_students: dict[str, tuple[Path, int]] | None = None,
) -> None:
    """After training: export the student (:func:`export_student`), end the trackers and, on the main
    process, score the export (:func:`final_report`; ``earlier_students`` are scored beside it). After a
    multi-process run the teacher is gathered whole first, for the report."""
    training = trainer.summary()  # before the export and the report add to the peak memory
    teacher_network = whole(trainer, setup.teacher.network)  # the report samples the teacher on one process
    student_dir = export_student(cfg, setup.teacher, trainer, student_network, adapter, scheduler, guidance_scale)
    setup.accelerator.wait_for_everyone()  # several processes part together, once the export is written (a
    setup.accelerator.end_training()       # process leaving the group early aborted gloo); trackers flush
    if setup.accelerator.is_main_process:
        setattr(setup.teacher.pipeline, setup.teacher.backbone.component, teacher_network)
        final_report(cfg, setup.teacher, setup.prompts, student_dir, training, student_steps, guidance_scale,
                     earlier_students)


def whole(trainer: Trainer, network: nn.Module) -> nn.Module | None:
    """``network`` as one plain module with all its weights: itself on one process; after a multi-process
    run a copy gathered from every process's part (collective: all call it), on the main process only
    (``None`` on the others)."""
    if trainer.sharding is None:
        return trainer.accelerator.unwrap_model(network)
    state = sharding.gather(network)
    return networks.plain_copy(network, state) if trainer.accelerator.is_main_process else None


def export_student(
    cfg: RunConfig, teacher: Teacher, trainer: Trainer, student_network: nn.Module, adapter: str | None,
    scheduler: SchedulerMixin, guidance_scale: float = 1.0, folder: str = "student", num_steps: int | None = None,
) -> Path:
    """Write ``output_dir/<folder>`` for plain diffusers (EMA weights if kept): LoRA or a full pipeline,
    with the student ``scheduler`` (:func:`export.student_scheduler`) set to ``num_steps`` (default
    ``--num_student_steps``); ``guidance_scale`` is the one to sample at (1, unless the student takes
    it as an input). Every process calls it after a multi-process run (the weights are gathered); the
    main process writes."""
    student_dir = Path(cfg.output_dir) / folder
    num_steps = num_steps or cfg.num_student_steps
    with trainer.ema.swapped_in() if trainer.ema is not None else nullcontext():
        student_network = whole(trainer, student_network)
        if not trainer.accelerator.is_main_process:
            return student_dir
        if cfg.use_lora:
            export.export_lora(teacher.pipeline, student_network, adapter, student_dir, num_steps, scheduler,
                               teacher.resolution)
        else:
            export.export_full(teacher.pipeline, student_network, student_dir, num_steps, scheduler, guidance_scale,
                               teacher.resolution)
    steps = trainer.progress.step
    print(f"student written to {student_dir} after {steps} training step{'' if steps == 1 else 's'} "
          f"({trainer.progress.seconds / 60:.1f} min of training, resumed runs' earlier steps included)")
    return student_dir


def final_report(
    cfg: RunConfig, teacher: Teacher, prompts: list[str], student_dir: Path, training: dict,
    student_steps: tuple[int, ...] = (), student_guidance_scale: float = 1.0,
    earlier_students: dict[str, tuple[Path, int]] | None = None,
) -> list[report.Result]:
    """Score the exported student (as plain diffusers loads it) and the teacher on the same noise,
    and write ``report.json``: the run's cost (``training``, from :meth:`Trainer.summary`), its
    flags and the scores.

    On the digits: FD-digits and prompt accuracy at 1 and N student steps (and ``student_steps``)
    and for the teacher (at ``cfg.teacher_report_guidance_scale``), with grids; otherwise a grid of
    the first 16 training prompts; ``--eval_num_samples 0`` scores nothing. ``earlier_students``
    (a staged run's: name → (exported folder, its step count)) are scored on the digits beside it.
    ``validation_curve.png``: the validations' FD-digits against steps, whenever the run validated on
    the digits. Students sample at
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
        for name, (folder, num_steps) in (earlier_students or {}).items():
            earlier, _ = export.load_student(folder, cfg.pretrained_model_name_or_path, cfg.revision, cfg.variant)
            results += report.evaluate(earlier, name, (num_steps,), (student_guidance_scale,), eval_prompts, scorers,
                                       output_dir, seed=cfg.seed)
        if cfg.teacher_eval_steps:
            select_adapter(teacher.network, None)  # with --use_lora the student's adapters live on the teacher's network
            results += report.evaluate(teacher.pipeline, "teacher", (cfg.teacher_eval_steps,),
                                       (cfg.teacher_report_guidance_scale,), eval_prompts, scorers, output_dir, seed=cfg.seed)
        extra["real_vs_real_fd_digits"] = floor = scorers.digits.real_floor(cfg.eval_num_samples)
        print(report.markdown_table(results))
        print(f"\nreal-vs-real FD-digits floor at {cfg.eval_num_samples} samples: {floor:.3f}")
    elif cfg.eval_num_samples:
        student, _ = export.load_student(student_dir, cfg.pretrained_model_name_or_path, cfg.revision, cfg.variant)
        images, _ = generate(student, prompts[:16], cfg.num_student_steps, student_guidance_scale, seed=cfg.seed,
                             resolution=teacher.resolution)
        save_grid(images, output_dir / "student_grid.png", num_columns=4)
        print(f"no scores: the digits metrics need digit prompts at 32×32 (this run: {teacher.resolution} px); wrote "
              f"{output_dir / 'student_grid.png'} (score other models with python -m stepdistill evaluate --clip_model "
              "/ --inception_weights)")
    plots.plot_validation_curve(  # nothing without digits validations; teacher and floor lines when scored
        output_dir / "train_log.jsonl", output_dir / "validation_curve.png",
        next((r.fd_digits for r in results if r.model == "teacher"), None), extra.get("real_vs_real_fd_digits"),
        label=f"student, {cfg.num_student_steps} step{'s' if cfg.num_student_steps > 1 else ''}",
        teacher_label=f"teacher, {cfg.teacher_eval_steps} steps", num_samples=cfg.num_validation_images,
    )
    report.write_report(results, output_dir / "report.json", **extra, training=training, config=vars(cfg))
    return results
