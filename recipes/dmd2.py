"""DMD2: distil a diffusion teacher into a 1–4 step student by distribution matching.

    accelerate launch recipes/dmd2.py                                  # the shipped digits teacher, offline
    accelerate launch recipes/dmd2.py --num_student_steps 4 --use_lora true
    accelerate launch recipes/dmd2.py --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --prompts_file prompts.txt --gan_generator_weight 0 --gan_critic_weight 0 --guidance_scale 8 \
        --learning_rate 1e-5 --mixed_precision bf16

Paper: "Improved Distribution Matching Distillation for Fast Image Synthesis" (Yin et al., 2024).
On a DDPM-family teacher the student reads pure noise as the noisy sample of timestep t0
(``--conditioning_timestep``: 625 by default, SiD's choice, where x0 = (x − σ ε̂) / α amplifies the
student's ε̂ 2.7× rather than 14.6× at DMD2's 999); on a flow teacher it starts at σ = 1, where
x0 = x − σ v̂ divides by nothing.
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

import torch

from stepdistill import conditioning, export, methods, run
from stepdistill.config import field
from stepdistill.models import networks
from stepdistill.models.teacher import Teacher


@dataclass
class DMD2Config(run.FakeScoreConfig):
    """Distil a text-to-image diffusion model with DMD2 (distribution matching + GAN + TTUR)."""

    output_dir: str = field("outputs/dmd2", "where checkpoints, the student and report.json go")
    max_train_steps: int = field(200, "student (generator) updates", at_least=1)
    learning_rate: float = field(3e-5, "student AdamW learning rate", greater_than=0)
    critic_steps_per_generator_step: int = field(5, "fake-score updates per student update (TTUR; DMD2 uses 5-10)",
                                                 at_least=1)
    gan_generator_weight: float = field(3e-3, "weight of the GAN term in the student loss (0: off; needs real images)",
                                        at_least=0)
    gan_critic_weight: float = field(1e-2, "weight of the GAN term in the critic loss (0: off; needs real images)",
                                     at_least=0)
    regression_weight: float = field(0.0, "DMD1 regression loss weight (latent MSE to teacher ODE outputs; 0: off)",
                                     at_least=0)
    num_regression_pairs: int = field(256, "noise/teacher-output pairs made at start when regression_weight > 0",
                                      at_least=1)


def regression_pairs(teacher: Teacher, prompts: list[str], cfg: DMD2Config):
    """(noise, condition, teacher 50-step latent) triples for DMD's regression loss (DMD eq. 9)."""
    count = cfg.num_regression_pairs
    condition = teacher.encode_prompts(prompts)
    pick = torch.randint(conditioning.batch_size(condition), (count,))
    noise = torch.randn((count, *teacher.latent_shape))
    condition = conditioning.select(condition, pick)
    unconditional = conditioning.expand(teacher.encode_unconditional(), count)
    with torch.no_grad():
        output = teacher.pipeline(
            **teacher.backbone.pipeline_inputs(condition, unconditional),
            latents=teacher.backbone.to_pipeline_latents(noise), num_inference_steps=50,
            guidance_scale=cfg.guidance_scale, output_type="latent", height=teacher.resolution, width=teacher.resolution,
        ).images
    return noise, condition, teacher.backbone.from_pipeline_latents(output, teacher.latent_shape)


def main(cfg: DMD2Config) -> None:
    # 1. checked flags, the frozen teacher and its noise process, the prompts (and real images'
    #    latents for the GAN) with cached text embeddings
    setup = run.set_up(cfg, "dmd2")
    if setup is None:  # --dry_run
        return
    teacher, prompts = setup.teacher, setup.prompts

    # 2. student and fake score start as the teacher (full copies, or two LoRA adapters on it), and
    #    the GAN head on the fake score's features when real images are given (the digits by default)
    nets = networks.build_networks(teacher.network, teacher.process, cfg.use_lora, cfg.lora_rank,
                                   with_discriminator=cfg.uses_gan, fake_score_steps=cfg.fake_score_steps)
    run.enable_gradient_checkpointing(cfg, nets)

    # 3. the method: DMD2's losses on the student's timesteps, read off the exported scheduler
    scheduler = run.student_scheduler(cfg, teacher)
    method = methods.DMD2(
        nets=nets,
        process=teacher.process,
        student_timesteps=export.student_timesteps(scheduler, cfg.num_student_steps, teacher.backbone),
        latent_shape=teacher.latent_shape,
        guidance_scale=cfg.guidance_scale,
        critic_steps_per_generator_step=cfg.critic_steps_per_generator_step,
        gan_generator_weight=cfg.gan_generator_weight,
        gan_critic_weight=cfg.gan_critic_weight,
        gan_max_timestep=cfg.gan_max_timestep,
        regression_weight=cfg.regression_weight,
        regression_pairs=regression_pairs(teacher, prompts, cfg) if cfg.regression_weight else None,
    )

    # 4. train: TTUR critic updates, then a generator update, every step; validate now and then
    trainer = run.critic_trainer(cfg, setup, nets, method, cfg.critic_learning_rate)
    trainer.fit()

    # 5. export for plain diffusers (EMA weights if kept), then score the export
    run.finish(cfg, setup, trainer, nets.student.network, networks.STUDENT, scheduler)

if __name__ == "__main__":
    run.command_line(DMD2Config, main, prog="recipes/dmd2.py")
