"""Progressive distillation, after guidance distillation: a deterministic student that samples in 1–8 DDIM steps.

    accelerate launch recipes/progressive.py                               # the shipped digits teacher, 32 → 4 steps
    accelerate launch recipes/progressive.py --num_student_steps 1         # on down to one step (two more stages)
    accelerate launch recipes/progressive.py --guidance_distillation false # CFG distilled in the first halving stage
    accelerate launch recipes/progressive.py --guidance_scale 1 --guidance_scale_max 3  # samples at any w in [1, 3]
    accelerate launch recipes/progressive.py --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --train_data_dir images/ --resolution 512 --guidance_scale 7.5 --start_steps 64 --num_student_steps 4 \\
        --max_train_steps 2000 --mixed_precision bf16

Papers: "Progressive Distillation for Fast Sampling of Diffusion Models" (Salimans & Ho 2022) and
"On Distillation of Guided Diffusion Models" (Meng et al. 2023). The run is a sequence of stages of
``--max_train_steps`` updates each (the math lives in ``stepdistill.methods.progressive``):

    0. guidance distillation (--guidance_distillation): the student, given w as an input, matches the
       teacher's classifier-free guided prediction at w in one network call, at every noise level;
    1. …K. halving stages, --start_steps → --start_steps / 2 → … → --num_student_steps: the student learns
       to take in one DDIM step the two DDIM steps of its teacher (the frozen student of the stage before).

The halving stages' student predicts v on a DDPM-family teacher (x̂0 = α z − σ v̂ stays finite at the
noisiest step, where ε-prediction breaks) and the flow's velocity on a flow teacher; the guidance
stage's keeps the teacher's parameterisation (it only learns guidance). Every stage's student is exported for
plain diffusers where its grid is the one diffusers' DDIM samples (``output_dir/stages/``; 16 and 32 steps
do not divide 1,000 and are only validated), the final one to ``output_dir/student``, all scored.
Without a guidance-scale input (LoRA students, SD3, Flux) one fixed w is distilled.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from stepdistill import export, methods, run
from stepdistill.config import ConfigError, field
from stepdistill.methods import progressive
from stepdistill.models import guidance_embedding, networks


@dataclass
class ProgressiveConfig(run.GuidanceRangeConfig):
    """Distil a text-to-image diffusion model into a few-step deterministic student by progressive distillation."""

    output_dir: str = field("outputs/progressive", "where checkpoints, the students and report.json go")
    num_student_steps: int = field(4, "the final student's DDIM steps (DDPM-family teachers: must divide T)",
                                   at_least=1, aliases=("end_steps",))
    start_steps: int = field(32, "the first halving stage's teacher steps: --num_student_steps times a power of two",
                             at_least=2)
    guidance_distillation: bool = field(True, "a first stage that distils CFG into one network call (a full-weight "
                                              "UNet student takes w as an input)")
    max_train_steps: int = field(1000, "student updates per stage", at_least=1)
    learning_rate: float = field(1e-4, "student AdamW learning rate (every stage starts its schedule afresh)",
                                 greater_than=0)
    lr_scheduler: str = field("linear", "learning-rate schedule of each stage (diffusers' names; linear: down to 0 "
                                        "at the stage's end)", choices=run.flags.LR_SCHEDULES)
    validation_steps: int = field(1000, "sample, grid and score the current student every N steps (0: off; the "
                                        "default validates each stage's last)", at_least=0)

    @property
    def num_stages(self) -> int:
        return len(progressive.halving_stages(self.start_steps, self.num_student_steps)) + self.guidance_distillation

    @property
    def needs_real_images(self) -> bool:
        return True

    def validate(self) -> None:
        super().validate()
        if self.prompts_file:
            raise ConfigError("progressive distillation noises real images: give --train_data_dir, not --prompts_file")
        if self.ema_decay > 0:
            raise ConfigError("--ema_decay: each stage hands its student over as it is; no EMA is kept across stages")
        try:
            progressive.halving_stages(self.start_steps, self.num_student_steps)
        except ValueError:
            raise ConfigError(f"--start_steps ({self.start_steps}) must be --num_student_steps "
                              f"({self.num_student_steps}) times 2, 4, 8, …: every stage halves the steps") from None
        self.require_ddim_step_counts("--num_student_steps", (self.num_student_steps,))
        if not self.teacher_is_flow_matching():
            num_train_timesteps = self.teacher_scheduler_config()["num_train_timesteps"]
            if self.start_steps > num_train_timesteps // 2:
                raise ConfigError(f"--start_steps must be ≤ {num_train_timesteps // 2}: each stage's grid needs "
                                  "distinct integer timesteps")

    def validate_teacher(self, teacher) -> None:
        super().validate_teacher(teacher)
        if self.guidance_range[0] != self.guidance_range[1] and not self.takes_guidance_scale(teacher):
            raise ConfigError("--guidance_scale_max: a range of w needs a student that takes w as an input: "
                              "--guidance_distillation with full weights (--use_lora false) on a UNet teacher")

    def takes_guidance_scale(self, teacher) -> bool:
        """Whether the student gets a guidance-scale input (else one fixed w is distilled)."""
        return self.guidance_distillation and not self.use_lora and teacher.backbone.has_embedding_slots()


def main(cfg: ProgressiveConfig) -> None:
    # 1. checked flags, the frozen teacher and its noise process, captioned real images as latents
    setup = run.set_up(cfg, "progressive")
    if setup is None:  # --dry_run
        return
    teacher, prompts = setup.teacher, setup.prompts

    # 2. the student starts as the teacher (full copy, optionally with a zero-initialised w input, or a LoRA
    #    adapter); its frozen copy will teach each next stage
    embeds = cfg.takes_guidance_scale(teacher)
    nets = networks.build_networks(teacher.network, teacher.process, cfg.use_lora, cfg.lora_rank, with_fake_score=False,
                                   guidance_embedding_dim=guidance_embedding.LCM_EMBEDDING_DIM if embeds else None)
    run.enable_gradient_checkpointing(cfg, nets)

    # 3. the method, on the grid the exported DDIM scheduler samples the final student on; the student
    #    predicts in the teacher's parameterisation in the guidance stage, then in v (the flow's velocity)
    scheduler = export.ddim_scheduler(teacher.pipeline.scheduler, teacher.process.for_few_steps())
    low, high = cfg.guidance_range
    method = methods.ProgressiveDistillation(
        teacher=nets.teacher,
        student=nets.student,
        stage_teacher=networks.StageTeacher(nets.student),
        final_grid=export.sampling_grid(scheduler, cfg.num_student_steps, teacher.backbone),
        start_steps=cfg.start_steps,
        guidance_distillation=cfg.guidance_distillation,
        guidance_scale_min=low,
        guidance_scale_max=high,
    )
    sampled_guidance = low if embeds else 1.0  # a w-input student is validated and scored at --guidance_scale
    sampled = guidance_embedding.AtGuidanceScale(nets.student, low) if embeds else nets.student

    # 4. train the stages; at each hand-over the finished stage's student is exported for diffusers
    #    (where diffusers' DDIM steps on its grid), then becomes the frozen teacher of the next
    def stage_student(stage: int) -> tuple[str | None, int]:
        """The folder a finished stage's student goes to (None: not exported) and its step count."""
        steps = method.stages[stage]
        if steps == progressive.GUIDANCE_STAGE:  # a diffusion model still: DDIM samples it at any step count
            return "stages/guidance", cfg.start_steps
        exact = export.steps_on(scheduler, method.grids[steps], teacher.backbone)
        return (f"stages/{steps}-step" if exact else None), steps

    def export_stage_student(stage: int) -> None:
        folder, steps = stage_student(stage)
        if folder is None:
            print(f"stage {stage}'s {steps}-step student is not exported: diffusers' DDIM does not step on its grid "
                  "(its validation scores it)")
        else:
            stage_scheduler = export.ddim_scheduler(teacher.pipeline.scheduler, method.process_of(stage))
            run.export_student(cfg, teacher, trainer, nets.student.network, networks.STUDENT, stage_scheduler,
                               sampled_guidance, folder=folder, num_steps=steps)

    stages = replace(run.trainer_config(cfg), max_train_steps=cfg.num_stages * cfg.max_train_steps,
                     stage_steps=cfg.max_train_steps)
    validate = run.make_validator(cfg, teacher, sampled, lambda: method.student_timesteps, prompts, deterministic=True)
    trainer = run.student_trainer(stages, setup, nets, method, validate, end_stage=export_stage_student)
    trainer.fit()

    # 5. export the final student (DDIM, "trailing", v-prediction) and score it beside every stage's export
    earlier = {}
    for stage in range(len(method.stages) - 1):
        folder, steps = stage_student(stage)
        if folder is not None and (Path(cfg.output_dir) / folder).is_dir():
            earlier[f"stage{stage}_student"] = (Path(cfg.output_dir) / folder, steps)
    run.finish(cfg, setup, trainer, nets.student.network, networks.STUDENT, scheduler, sampled_guidance,
               (cfg.num_student_steps,), earlier)


if __name__ == "__main__":
    run.command_line(ProgressiveConfig, main, prog="recipes/progressive.py")
