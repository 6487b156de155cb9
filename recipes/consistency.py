"""Consistency distillation (LCM / LCM-LoRA, optionally trajectory-segmented): a student that samples in 1–8 steps.

    accelerate launch recipes/consistency.py                                # LoRA student of the shipped digits teacher
    accelerate launch recipes/consistency.py --num_segments 1              # LCM's single trajectory end
    accelerate launch recipes/consistency.py --use_lora false --guidance_embedding true --guidance_scale_max 3  # w as input
    accelerate launch recipes/consistency.py --skipping_interval 25 --num_segments 4   # Hyper-SD's TSCD, 4 segments
    accelerate launch recipes/consistency.py --config consistency_segments4  # ... sampled by DDIM steps (--sampler ddim)
    accelerate launch recipes/consistency.py --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --train_data_dir images/ --guidance_scale 4 --guidance_scale_max 16 --lora_rank 64 --mixed_precision bf16  # LCM ω = w − 1

Papers: "Latent Consistency Models" (Luo et al. 2023, Alg. 1), "LCM-LoRA" (Luo et al. 2023b) and
"Hyper-SD" (Ren et al. 2024, TSCD). Each training step (the math lives in ``stepdistill.methods.consistency``):

    1. noise a real latent to a point g_n of the teacher's solver grid (spacing k, the skipping interval);
    2. the frozen teacher takes one guided DDIM step g_n → g_{n−1}, w ~ U[guidance_scale, guidance_scale_max];
    3. the target f_θ⁻ (stop-gradient student, or its EMA) maps that point to the end of its
       trajectory segment (two by default, split at t = 499; one segment is LCM's whole trajectory);
       the student f_θ at g_n must agree (pseudo-Huber).

Two segments make a student that samples well at 2 and 4 steps alike (README, Results). On a flow
teacher (SD3, Flux) the solver step is the flow ODE's Euler step and f_θ is x̂0 itself. The student is
exported with diffusers' ``LCMScheduler`` at LCM's boundary scaling (``FlowMatchLCMScheduler`` on a flow
teacher) and scored at 1–8 steps.
"""

from __future__ import annotations

from dataclasses import dataclass

from stepdistill import export, methods, run
from stepdistill.config import ConfigError, field
from stepdistill.models import guidance_embedding, networks


@dataclass
class ConsistencyConfig(run.GuidanceRangeConfig):
    """Distil a text-to-image diffusion model into a few-step consistency model (LCM, LCM-LoRA, TSCD)."""

    output_dir: str = field("outputs/consistency", "where checkpoints, the student and report.json go")
    use_lora: bool = field(True, "train a LoRA adapter on the frozen teacher network (LCM-LoRA); false: full weights")
    num_student_steps: int = field(4, "sampling steps of validation and of the exported metadata (any N ≤ T / k "
                                      "works)", at_least=1)
    learning_rate: float = field(2e-4, "student AdamW learning rate", greater_than=0)
    max_train_steps: int = field(900, "student updates", at_least=1)
    validation_steps: int = field(300, "sample, grid and score the student every N steps (0: off)", at_least=0)
    skipping_interval: int = field(20, "k: timesteps one teacher solver step spans (LCM: 20, a 50-step grid); must "
                                       "divide T", at_least=1)
    num_segments: int = field(2, "trajectory segments (Hyper-SD TSCD; 1: LCM); must divide T / skipping_interval",
                              at_least=1)
    loss_type: str = field("huber", "pseudo-Huber or squared error", choices=methods.consistency.LOSS_TYPES)
    huber_c: float = field(1e-3, "pseudo-Huber constant c", greater_than=0)
    target_ema_decay: float = field(0.0, "EMA decay of the target f_θ⁻ (LCM: 0.95, full weights; 0: stop-gradient "
                                         "student)", at_least=0, below=1)
    guidance_embedding: bool = field(False, "the full-weight UNet student takes w as an input (LCM's w-embedding); "
                                            "scored at --guidance_scale")
    timestep_scaling: float = field(methods.consistency.LCM_TIMESTEP_SCALING, "s in LCM's c_skip(s·t), c_out(s·t) "
                                    "(DDPM-family teachers); exported", greater_than=0)
    eval_steps: tuple[int, ...] = field((1, 2, 4, 8), "student step counts scored in the final report", at_least=1)
    sampler: str = field("lcm", "how the student samples (validation, report, exported scheduler): lcm — LCMScheduler, "
                                "f's x̂0 re-noised with fresh noise at each next step (LCM's multistep sampling); ddim — "
                                "deterministic DDIM steps (Euler on a flow teacher), Hyper-SD's sampler for segmented "
                                "students, landing on the segment starts in --num_segments steps (e.g. 4 with "
                                "--skipping_interval 25; on Flux too, not on SD3, whose few-step σ's differ)",
                         choices=methods.consistency.SAMPLERS)

    @property
    def needs_real_images(self) -> bool:
        return True

    def validate(self) -> None:
        super().validate()
        if self.use_lora and self.guidance_embedding:
            raise ConfigError("--guidance_embedding needs --use_lora false: LoRA cannot add the guidance projection")
        if self.use_lora and self.target_ema_decay > 0:
            raise ConfigError("--target_ema_decay > 0 needs --use_lora false: a LoRA student's target is the student itself")
        if self.prompts_file:
            raise ConfigError("consistency distillation noises real images: give --train_data_dir, not --prompts_file")
        if self.timestep_sampling != "uniform":
            raise ConfigError("--timestep_sampling: consistency distillation walks the teacher's solver grid "
                              "(--skipping_interval, uniformly); it draws no other noise levels")
        if not self.eval_steps:
            raise ConfigError("--eval_steps must name at least one step count")
        self._validate_grid()
        if self.sampler == "ddim":
            self.require_ddim_step_counts("--sampler ddim: a student step count", (self.num_student_steps, *self.eval_steps))

    def validate_teacher(self, teacher) -> None:
        super().validate_teacher(teacher)
        if self.guidance_embedding and not teacher.backbone.has_embedding_slots():
            raise ConfigError(f"--guidance_embedding needs a UNet teacher (its timestep-condition slot); this one is a "
                              f"{type(teacher.network).__name__}")

    def _validate_grid(self) -> None:
        """The checks that need the teacher's T, read from its scheduler config (no model is loaded)."""
        num_train_timesteps = self.teacher_scheduler_config()["num_train_timesteps"]
        try:
            num_solver_steps = methods.consistency.solver_steps(num_train_timesteps, self.skipping_interval)
            methods.consistency.segment_length(num_solver_steps, self.num_segments)
        except ValueError as error:
            raise ConfigError(f"--{error}") from None
        most = max(self.num_student_steps, *self.eval_steps)
        if most > num_solver_steps:
            raise ConfigError(f"student step counts (--num_student_steps, --eval_steps) must be ≤ the {num_solver_steps} "
                              f"solver steps of the grid (got {most})")

def main(cfg: ConsistencyConfig) -> None:
    # 1. checked flags, the frozen teacher and its noise process, captioned real images as latents
    setup = run.set_up(cfg, "consistency")
    if setup is None:  # --dry_run
        return
    teacher, prompts = setup.teacher, setup.prompts

    # 2. the student starts as the teacher (a LoRA adapter on it, or a full copy, optionally with a
    #    zero-initialised guidance-scale input); no critic
    embedding_dim = guidance_embedding.LCM_EMBEDDING_DIM if cfg.guidance_embedding else None
    nets = networks.build_networks(teacher.network, teacher.process, cfg.use_lora, cfg.lora_rank, with_fake_score=False,
                                   guidance_embedding_dim=embedding_dim)
    run.enable_gradient_checkpointing(cfg, nets)
    student = methods.ConsistencyDenoiser(nets.student, cfg.timestep_scaling)  # f_θ = c_skip x + c_out x̂0

    # 3. the method; the exported scheduler samples f_θ on the same grid and boundary scaling
    low, high = cfg.guidance_range
    method = methods.ConsistencyDistillation(
        teacher=nets.teacher,
        student=student,
        process=teacher.process,
        skipping_interval=cfg.skipping_interval,
        num_segments=cfg.num_segments,
        guidance_scale_min=low,
        guidance_scale_max=high,
        loss_type=cfg.loss_type,
        huber_c=cfg.huber_c,
        target_ema_decay=cfg.target_ema_decay,
    )
    deterministic = cfg.sampler == "ddim"
    if deterministic:  # DDIM steps on (f, ε_f): at the segment boundaries each step is a trained jump
        scheduler = export.ddim_scheduler(teacher.pipeline.scheduler, teacher.process)
    else:
        scheduler = export.student_scheduler(teacher.pipeline.scheduler, teacher.process,
                                             timestep_scaling=cfg.timestep_scaling,
                                             original_inference_steps=len(method.grid) - 1)
    timesteps = export.student_timesteps(scheduler, cfg.num_student_steps, teacher.backbone)

    # a guidance-embedded student is validated and scored at w = --guidance_scale
    sampled_guidance = low if cfg.guidance_embedding else 1.0
    sampled = guidance_embedding.AtGuidanceScale(student, low) if cfg.guidance_embedding else student

    # 4. train; an EMA target moves after every student update (method.after_generator_update):
    #    θ⁻ ← μ θ⁻ + (1 − μ) θ, and every checkpoint keeps it (method.state_dict)
    validate = run.make_validator(cfg, teacher, sampled, timesteps, prompts, deterministic=deterministic)
    trainer = run.student_trainer(run.trainer_config(cfg), setup, nets, method, validate)
    trainer.fit()

    # 5. export for plain diffusers (LCMScheduler at the boundary scaling, or DDIM), then score at 1–8 steps
    run.finish(cfg, setup, trainer, nets.student.network, networks.STUDENT, scheduler, sampled_guidance, cfg.eval_steps)


if __name__ == "__main__":
    run.command_line(ConsistencyConfig, main, prog="recipes/consistency.py")
