"""ADD and LADD: distil a diffusion teacher into a 1–4 step student adversarially.

    accelerate launch recipes/add.py                                   # LADD on the shipped digits teacher, offline
    accelerate launch recipes/add.py --method add                      # ADD: a pixel-space discriminator + distillation
    accelerate launch recipes/add.py --num_student_steps 4 --use_lora true
    accelerate launch recipes/add.py --pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0 \\
        --train_data_dir images/ --resolution 1024 --use_lora true --mixed_precision bf16

Papers: "Adversarial Diffusion Distillation" (Sauer et al., 2023) and "Fast High-Resolution Image
Synthesis with Latent Adversarial Diffusion Distillation" (Sauer et al., 2024); the math lives in
``stepdistill.methods.adversarial``. Each training step:

    1. k critic updates: the discriminator's heads learn real latents from student outputs on a frozen
       extractor's features (LADD: the teacher's blocks on both re-noised at t̂; ADD: a pixel network
       on both decoded), hinge loss plus an R1 penalty on the real side;
    2. one generator update: the student, fed real latents noised at one of its timesteps, is pushed
       to make the discriminator call its x̂0 real, plus λ ᾱ_t ‖x̂0 − x̂0_teacher‖² (ADD's term, λ = 2.5 for
       both methods by default; LADD's paper drops it).

The student starts from pure noise at its first timestep as DMD2's does (``--conditioning_timestep``)
and is exported for plain diffusers (full pipeline, or LoRA weights) and scored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stepdistill import export, methods, run
from stepdistill.config import ConfigError, field
from stepdistill.methods import adversarial
from stepdistill.models import networks
from stepdistill.models import discriminator as discriminators
from stepdistill.models.discriminator import Discriminator

ADD_DISTILLATION_WEIGHT = 2.5  # λ of ADD eq. 5


@dataclass
class AddConfig(run.CriticConfig):
    """Distil a text-to-image diffusion model adversarially: LADD (teacher-feature discriminator) or ADD."""

    output_dir: str = field("outputs/add", "where checkpoints, the student and report.json go")
    method: str = field("ladd", "ladd: heads on the frozen teacher's features of re-noised latents; add: heads on a "
                                "pixel network's features of decoded images, plus the distillation term (the flag "
                                "is not --variant: that is the teacher's weight variant, as in diffusers)",
                        choices=adversarial.VARIANTS)
    max_train_steps: int = field(300, "student (generator) updates", at_least=1)
    learning_rate: float = field(5e-5, "student AdamW learning rate", greater_than=0)
    critic_learning_rate: float = field(5e-4, "discriminator heads' AdamW learning rate", greater_than=0)
    adam_beta1: float = field(0.0, "AdamW β1 of every optimiser (0, as GANs use)", at_least=0, below=1)
    critic_steps_per_generator_step: int = field(10, "discriminator updates per student update (1-step FD-digits on "
                                                     "the digits, 1,000 samples: 0.72 at 1, 0.57 at 5, 0.24 at 10)",
                                                 at_least=1)
    distillation_weight: float = field(ADD_DISTILLATION_WEIGHT, "λ of the distillation term, both methods (ADD's "
                                                                "2.5; LADD's paper uses 0, but the digits' 1-step LADD "
                                                                "student scores 1.56x / 1.56x the teacher with it, "
                                                                "1.61x / 1.65x without)", at_least=0)
    r1_weight: float = field(1e-5, "weight of the R1 penalty on real inputs (ADD's γ)", at_least=0)
    r1_kind: str = field("approximate", "exact (double backward) or approximate (E(D(x+σε)−D(x))²/σ²: no double "
                                        "backward)", choices=adversarial.R1_KINDS)
    r1_sigma: float = field(0.01, "σ of the approximate R1's perturbation", greater_than=0)
    discriminator_logit_mean: float = field(0.0, "ladd: m of t̂ = T·sigmoid(m + s z) (m > 0: biased to high noise, "
                                                 "LADD's choice at 1024 px; 0 measured better on the digits)")
    discriminator_logit_std: float = field(1.0, "ladd: s of t̂'s logit-normal draw", greater_than=0)
    discriminator_per_location: bool = field(True, "a logit per location of every head's feature map (a patch "
                                                   "discriminator; the losses average them); false: one logit per "
                                                   "image (1-step on the digits: 1.77x / 1.91x the teacher, patch "
                                                   "heads 1.61x / 1.65x)")
    feature_network: str = field("vae", "add: the pixel feature network: vae (the teacher's VAE encoder, offline) "
                                        "or a local transformers vision model folder (e.g. DINOv2)")

    @property
    def needs_real_images(self) -> bool:
        return True

    def validate(self) -> None:
        super().validate()
        if self.prompts_file:
            raise ConfigError("adversarial distillation noises real images: give --train_data_dir, not "
                              "--prompts_file (data-free LADD on teacher samples is not built yet)")
        if self.method == "ladd" and self.feature_network != "vae":
            raise ConfigError("--feature_network is ADD's pixel network; LADD's features are the teacher's")


def feature_extractor(cfg: AddConfig, teacher, nets: networks.Networks) -> discriminators.FeatureFunction:
    """LADD: the frozen teacher's blocks; ADD: the teacher's VAE encoder, or a local vision model, on decoded latents."""
    if cfg.method == "ladd":
        return adversarial.teacher_features(nets, teacher.backbone.discriminator_layers(teacher.network))
    if cfg.feature_network == "vae":
        encoder = teacher.pipeline.vae.encoder
        layers = tuple(f"down_blocks.{i}" for i in range(len(encoder.down_blocks)))
        return discriminators.pixel_features(teacher.decode, encoder, layers)
    from transformers import AutoModel

    model = AutoModel.from_pretrained(cfg.feature_network).requires_grad_(False).eval().to(teacher.network.device)
    depth = model.config.num_hidden_layers
    layers = tuple(f"encoder.layer.{i}" for i in sorted({depth // 4, depth // 2, depth - 1}))
    return discriminators.pixel_features(teacher.decode, model, layers, size=model.config.image_size)


def main(cfg: AddConfig) -> None:
    # 1. checked flags, the frozen teacher and its noise process, real images' latents and prompts
    setup = run.set_up(cfg, "add")
    if setup is None:  # --dry_run
        return
    teacher = setup.teacher

    # 2. the student starts as the teacher (a full copy or a LoRA adapter); no fake score
    nets = networks.build_networks(teacher.network, teacher.process, cfg.use_lora, cfg.lora_rank, with_fake_score=False)
    run.enable_gradient_checkpointing(cfg, nets)

    # 3. the discriminator: heads on the frozen extractor's layers, conditioned on the pooled prompt and t̂
    features = feature_extractor(cfg, teacher, nets)
    unconditional = teacher.encode_unconditional()
    with torch.no_grad():
        probe = features(torch.zeros(1, *teacher.latent_shape, device=setup.accelerator.device),
                         torch.full((1,), 500.0, device=setup.accelerator.device), unconditional)
    discriminator = Discriminator.for_features(probe, teacher.backbone.pooled(unconditional).shape[-1],
                                               per_location=cfg.discriminator_per_location)
    nets = networks.Networks(nets.teacher, nets.student, None, discriminator.to(setup.accelerator.device))

    # 4. the method, on the student's timesteps read off the exported scheduler
    scheduler = run.student_scheduler(cfg, teacher)
    method = methods.AdversarialDistillation(
        nets=nets, process=teacher.process,
        student_timesteps=export.student_timesteps(scheduler, cfg.num_student_steps, teacher.backbone),
        features=features, pooled=teacher.backbone.pooled, variant=cfg.method,
        distillation_weight=cfg.distillation_weight,
        guidance_scale=cfg.guidance_scale, r1_weight=cfg.r1_weight, r1_kind=cfg.r1_kind, r1_sigma=cfg.r1_sigma,
        logit_mean=cfg.discriminator_logit_mean, logit_std=cfg.discriminator_logit_std,
        critic_steps_per_generator_step=cfg.critic_steps_per_generator_step,
    )

    # 5. train: critic updates, then a student update, every step; validate now and then
    trainer = run.critic_trainer(cfg, setup, nets, method, cfg.critic_learning_rate)
    trainer.fit()

    # 6. export for plain diffusers (EMA weights if kept), then score the export
    run.finish(cfg, setup, trainer, nets.student.network, networks.STUDENT, scheduler)


if __name__ == "__main__":
    run.command_line(AddConfig, main, prog="recipes/add.py")
