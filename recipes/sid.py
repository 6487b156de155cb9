"""SiD: distil a diffusion teacher into a 1–4 step student with Score identity Distillation, data-free.

    accelerate launch recipes/sid.py                                   # the shipped digits teacher, offline
    accelerate launch recipes/sid.py --num_student_steps 4             # few-step SiD
    accelerate launch recipes/sid.py --num_student_steps 4 --guidance_scale 1 --lr_scheduler cosine --ema_decay 0.99 \
        --max_train_steps 1000 --gan_generator_weight 5e-2 --gan_critic_weight 1e-2  # 4 steps, tuned (README)
    accelerate launch recipes/sid.py --num_student_steps 4 --per_step_fake_score true  # a fake score per step
    accelerate launch recipes/sid.py --guidance_scale 1 --fake_guidance_scale 0 --fake_guidance_scale_generator 0  # Zero-CFG
    accelerate launch recipes/sid.py --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --prompts_file prompts.txt --guidance_scale 4.5 --fake_guidance_scale_generator 4.5 --learning_rate 1e-6 \\
        --critic_learning_rate 1e-6 --critic_steps_per_generator_step 1 --use_lora true --mixed_precision bf16  # SiD-LSG

Papers: "Score identity Distillation" (Zhou et al. 2024), "Guided Score identity Distillation for
Data-Free One-Step Text-to-Image Generation" (SiD-LSG) and "Few-Step Diffusion via Score identity
Distillation". Each training step (the math lives in ``stepdistill.methods.sid``):

    1. ``--critic_steps_per_generator_step`` fake-score updates (3 by default: with the paper's 1 the
       fake score lags the student here): it denoises detached student samples (at ``--fake_guidance_scale``);
    2. one student update on SiD's loss: teacher (``--guidance_scale``) and fake score
       (``--fake_guidance_scale_generator``) denoise the same noised student sample, and the student
       moves to close the gap between them, through both networks' inputs;
    3. few-step students train on a uniformly drawn step of their own sampler; the fake score learns
       the mixture of all steps' outputs (the paper), or with ``--per_step_fake_score`` each step's apart.

The default guidance is 1.25, not the 1.5 at which the digits teacher's DDIM samples score best: SiD
matches the distribution the guided scores describe, and an ancestral sampler shows that one is best at
1.25 (README, "Which guidance scale to distil"). A few-step student sharpens its samples on its own, so
it does best distilling the unguided teacher (``--guidance_scale 1``; README, Results). No real images
are needed; a GAN weight adds few-step SiD's diffusion-GAN term on real images
(``--train_data_dir``; the digits' train split for the shipped teacher). Zero-CFG is ``--guidance_scale 1 --fake_guidance_scale 0 --fake_guidance_scale_generator 0``
(an unguided teacher, a text-free fake score); Anti-CFG gives the fake score a negative scale in the
student's loss. The student is exported for plain diffusers like every other recipe's, and scored.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from stepdistill import export, methods, run
from stepdistill.assets import DIGITS_ANCESTRAL_BEST_GUIDANCE, DIGITS_TEACHER
from stepdistill.config import field
from stepdistill.models import networks


@dataclass
class SiDConfig(run.FakeScoreConfig):
    """Distil a text-to-image diffusion model with Score identity Distillation (SiD, SiD-LSG, few-step SiD)."""

    output_dir: str = field("outputs/sid", "where checkpoints, the student and report.json go")
    max_train_steps: int = field(400, "student updates", at_least=1)
    learning_rate: float = field(3e-5, "student AdamW learning rate", greater_than=0)
    guidance_scale: float | None = field(None, "the teacher's CFG scale in the student loss (default: 1.25 on the "
                                               "digits teacher, where its guided scores describe its best "
                                               "distribution; else the teacher's best)", at_least=0)
    critic_steps_per_generator_step: int = field(3, "fake-score updates per student update (the paper's 1 lags here)",
                                                 at_least=1)
    ema_decay: float = field(0.98, "EMA of the student weights that get exported (0: off)", at_least=0, below=1)
    alpha: float = field(methods.sid.SID_ALPHA, "SiD's α: weight of −‖f_teacher − f_fake‖² in the student loss",
                         at_least=0)
    fake_guidance_scale: float | None = field(None, "the fake score's CFG scale while it is trained (0: text-free; "
                                                    "default: --guidance_scale, as SiD-LSG)", at_least=0)
    fake_guidance_scale_generator: float | None = field(None, "the fake score's CFG scale in the student loss "
                                                              "(< 0: Anti-CFG; default: --guidance_scale)")

    def default_guidance_scale(self) -> float:
        if Path(self.pretrained_model_name_or_path).expanduser().resolve() == DIGITS_TEACHER:
            return DIGITS_ANCESTRAL_BEST_GUIDANCE
        return super().default_guidance_scale()


def main(cfg: SiDConfig) -> None:
    # 1. checked flags, the frozen teacher and its noise process, the prompts with cached text embeddings
    setup = run.set_up(cfg, "sid")
    if setup is None:  # --dry_run
        return
    teacher = setup.teacher

    # 2. student and fake score start as the teacher (full copies, or two LoRA adapters on it)
    nets = networks.build_networks(teacher.network, teacher.process, cfg.use_lora, cfg.lora_rank,
                                   with_discriminator=cfg.uses_gan, fake_score_steps=cfg.fake_score_steps)
    run.enable_gradient_checkpointing(cfg, nets)

    # 3. the method: SiD's loss on the student's timesteps, read off the exported scheduler
    scheduler = run.student_scheduler(cfg, teacher)
    method = methods.SiD(
        nets=nets,
        process=teacher.process,
        student_timesteps=export.student_timesteps(scheduler, cfg.num_student_steps, teacher.backbone),
        latent_shape=teacher.latent_shape,
        alpha=cfg.alpha,
        critic_steps_per_generator_step=cfg.critic_steps_per_generator_step,
        teacher_guidance_scale=cfg.guidance_scale,
        fake_guidance_scale=cfg.guidance_scale if cfg.fake_guidance_scale is None else cfg.fake_guidance_scale,
        fake_guidance_scale_generator=(
            cfg.guidance_scale if cfg.fake_guidance_scale_generator is None else cfg.fake_guidance_scale_generator
        ),
        gan_generator_weight=cfg.gan_generator_weight,
        gan_critic_weight=cfg.gan_critic_weight,
        gan_max_timestep=cfg.gan_max_timestep,
    )

    # 4. train: a fake-score update, then a student update, every step; validate now and then
    trainer = run.critic_trainer(cfg, setup, nets, method, cfg.critic_learning_rate)
    trainer.fit()

    # 5. export for plain diffusers (EMA weights if kept), then score the export
    run.finish(cfg, setup, trainer, nets.student.network, networks.STUDENT, scheduler)

if __name__ == "__main__":
    run.command_line(SiDConfig, main, prog="recipes/sid.py")
