"""Train the embedded digits teachers and their evaluator (the project's offline defaults).

    python recipes/train_teacher.py --output_dir stepdistill/assets                 # the ε teacher + classifier
    python recipes/train_teacher.py --output_dir stepdistill/assets --format sd3    # the flow-matching teacher

On the train split of scikit-learn's digits (see ``stepdistill.data.digits``), in three stages:

1. a digit classifier (the evaluator behind FD-digits and prompt accuracy),
2. an ``AutoencoderKL`` 32×32×3 → 8×8×4 (reconstruction + a small KL term), whose latent scale is
   set so that scaled latents have unit variance, as Stable Diffusion's 0.18215 does,
3. a ``UNet2DConditionModel`` predicting ε on SD's ``scaled_linear`` DDPM schedule, conditioned on a
   frozen random ``CLIPTextModel``; 10 % of captions are dropped to "" so classifier-free guidance
   works; the saved weights are an EMA of the training weights.

It writes ``OUTPUT_DIR/teacher/`` (a ``StableDiffusionPipeline`` folder) and
``OUTPUT_DIR/digits_classifier.safetensors``.

``--format sd3`` trains the SD3-format teacher instead (``OUTPUT_DIR/teacher_sd3/``, a
``StableDiffusion3Pipeline`` folder, see ``stepdistill.models.tiny_sd3``) on the ε teacher's
autoencoder (``--vae_from``), so the two teachers share one latent space and one evaluator:

4. an ``SD3Transformer2DModel`` trained by rectified flow (Liu et al. 2022; Esser et al. 2024, SD3):
   x_σ = (1 − σ) x0 + σ ε, loss ‖v̂ − (ε − x0)‖², σ = shift(u) with u logit-normal (SD3 §3.1) and
   the scheduler's shift of 3, the transformer's timestep input 1000 σ as the pipeline gives it;
   captions dropped to "" as above, EMA weights saved.

Seeded: the same command gives the same files on the same machine and library versions.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler
from torch import nn
from tqdm.auto import tqdm

from stepdistill import config as configs
from stepdistill.assets import DIGITS_TEACHER
from stepdistill.config import ConfigError, field
from stepdistill.data import digits
from stepdistill.diffusion import FlowProcess
from stepdistill.evaluation.classifier import DigitClassifier
from stepdistill.models import tiny_sd, tiny_sd3
from stepdistill.models.backbones import adapter_for
from stepdistill.models.repeated_context import collapse_repeated_context

FORMATS = ("sd", "sd3")


@dataclass
class TeacherConfig:
    """Train the digits ε teacher pipeline and the digit classifier, or (--format sd3) the flow-matching teacher."""

    output_dir: str = field("outputs/train_teacher", "folder for teacher/ and digits_classifier.safetensors "
                                                     "(--format sd3: teacher_sd3/)")
    format: str = field("sd", "sd: the ε-prediction UNet teacher and the classifier; sd3: the flow-matching "
                              "transformer teacher", choices=FORMATS)
    seed: int = field(0, "seed for initialisation, batches and noise")
    classifier_steps: int = field(400, "classifier optimisation steps")
    vae_steps: int = field(600, "autoencoder optimisation steps")
    unet_steps: int = field(2000, "UNet optimisation steps")
    batch_size: int = field(64, "images per optimisation step (all three stages)")
    unet_learning_rate: float = field(1e-3, "peak AdamW learning rate of the UNet (cosine decay)")
    caption_dropout: float = field(0.1, "share of captions replaced by the empty prompt (enables CFG)")
    transformer_steps: int = field(5000, "--format sd3: transformer optimisation steps")
    transformer_learning_rate: float = field(5e-4, "--format sd3: peak AdamW learning rate of the transformer "
                                                   "(cosine decay)")
    vae_from: str = field(str(DIGITS_TEACHER), "--format sd3: the pipeline whose trained autoencoder the "
                                               "teacher uses (default: the shipped ε teacher)")
    ema_decay: float = field(0.999, "EMA decay of the saved UNet / transformer weights")
    num_threads: int = field(0, "torch CPU threads (0: torch's default)")

    def validate(self) -> None:
        for name in ("classifier_steps", "vae_steps", "unet_steps", "transformer_steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be ≥ 1 (got {getattr(self, name)})")
        if not 0 <= self.caption_dropout < 1:
            raise ConfigError(f"--caption_dropout must be in [0, 1) (got {self.caption_dropout})")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"--ema_decay must be in [0, 1) (got {self.ema_decay})")


def batches(n: int, batch_size: int, steps: int, generator: torch.Generator):
    """``steps`` index batches drawn by reshuffling ``range(n)`` each epoch."""
    order = torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        if len(order) < batch_size:
            order = torch.cat([order, torch.randperm(n, generator=generator)])
        yield order[:batch_size]
        order = order[batch_size:]


def jitter(images: torch.Tensor, generator: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Shift each image by up to ``max_shift`` pixels (background-padded) and add faint noise."""
    padded = F.pad(images, (max_shift,) * 4, value=-1.0)
    size = images.shape[-1]
    out = torch.empty_like(images)
    shifts = torch.randint(0, 2 * max_shift + 1, (len(images), 2), generator=generator)
    for i, (dy, dx) in enumerate(shifts.tolist()):
        out[i] = padded[i, :, dy : dy + size, dx : dx + size]
    return out + 0.05 * torch.randn(out.shape, generator=generator)


def train_classifier(cfg: TeacherConfig, data: digits.DigitsSplit, generator: torch.Generator) -> DigitClassifier:
    torch.manual_seed(cfg.seed)  # importing diffusers leaves torch's global generator unseeded
    classifier = DigitClassifier()
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=cfg.classifier_steps)
    for idx in tqdm(batches(len(data), cfg.batch_size, cfg.classifier_steps, generator), total=cfg.classifier_steps, desc="1/3 classifier"):
        loss = F.cross_entropy(classifier(jitter(data.images[idx], generator)), data.labels[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    return classifier.eval().requires_grad_(False)


def train_vae(cfg: TeacherConfig, vae, data: digits.DigitsSplit, generator: torch.Generator) -> float:
    """Fit the autoencoder; return the final reconstruction MSE on the train split."""
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-3, total_steps=cfg.vae_steps)
    for idx in tqdm(batches(len(data), cfg.batch_size, cfg.vae_steps, generator), total=cfg.vae_steps, desc="2/3 autoencoder"):
        images = data.images[idx]
        posterior = vae.encode(images).latent_dist
        latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        reconstruction = vae.decode(latents).sample
        loss = F.mse_loss(reconstruction, images) + 1e-5 * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        return F.mse_loss(vae.decode(vae.encode(data.images).latent_dist.mean).sample, data.images).item()


def fit(network: nn.Module, losses: Iterator[torch.Tensor], steps: int, learning_rate: float, ema_decay: float,
        desc: str) -> nn.Module:
    """Minimise the losses ``losses`` yields (each computed from ``network``) with AdamW, a one-cycle
    cosine learning rate (5 % warm-up) and gradients clipped at norm 1; returns the EMA of the weights."""
    ema = copy.deepcopy(network).requires_grad_(False)
    optimizer = torch.optim.AdamW(network.parameters(), lr=learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=learning_rate, total_steps=steps, pct_start=0.05)
    progress = tqdm(losses, total=steps, desc=desc)
    for step, loss in enumerate(progress):
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(network.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), network.parameters()):
                p_ema.lerp_(p, 1 - decay)
        if step % 50 == 0:
            progress.set_postfix(loss=f"{loss.item():.4f}")
    return ema.eval()


def dropped_captions(labels: torch.Tensor, dropout: float, generator: torch.Generator) -> torch.Tensor:
    """Caption rows: the digit, or 10 (the empty prompt) for a ``dropout`` share."""
    caption = labels.clone()
    caption[torch.rand(len(labels), generator=generator) < dropout] = 10
    return caption


def train_unet(cfg: TeacherConfig, pipe, data: digits.DigitsSplit, generator: torch.Generator):
    """ε-prediction on SD's DDPM schedule with caption dropout; returns the EMA UNet."""
    with torch.no_grad():
        posterior = pipe.vae.encode(data.images).latent_dist
        latent_mean, latent_std = posterior.mean, posterior.std
        scale = 1.0 / float(latent_mean.std())
        pipe.vae.register_to_config(scaling_factor=scale)
        captions = [digits.prompt_for(k) for k in range(10)] + [""]
        tokens = pipe.tokenizer(captions, padding="max_length", max_length=pipe.tokenizer.model_max_length, return_tensors="pt")
        caption_embeddings = pipe.text_encoder(tokens.input_ids)[0]  # (11, L, D); row 10 is ""
    noise_schedule = DDPMScheduler(**{k: v for k, v in tiny_sd.scheduler_config().items() if k != "set_alpha_to_one"})
    unet = pipe.unet.train()

    def losses():
        for idx in batches(len(data), cfg.batch_size, cfg.unet_steps, generator):
            latents = (latent_mean[idx] + latent_std[idx] * torch.randn(latent_mean[idx].shape, generator=generator)) * scale
            noise = torch.randn(latents.shape, generator=generator)
            t = torch.randint(0, noise_schedule.config.num_train_timesteps, (len(idx),), generator=generator)
            caption = dropped_captions(data.labels[idx], cfg.caption_dropout, generator)
            prediction = unet(noise_schedule.add_noise(latents, noise, t), t, caption_embeddings[caption]).sample
            yield F.mse_loss(prediction, noise)

    return fit(unet, losses(), cfg.unet_steps, cfg.unet_learning_rate, cfg.ema_decay, "3/3 unet")


def train_transformer(cfg: TeacherConfig, pipe, data: digits.DigitsSplit, generator: torch.Generator):
    """Rectified flow on SD3's shifted logit-normal σ's with caption dropout; sets the autoencoder's SD3
    latent normalisation (shift = latent mean, scale = 1 / latent std) and returns the EMA transformer."""
    with torch.no_grad():
        posterior = pipe.vae.encode(data.images).latent_dist
        latent_mean, latent_std = posterior.mean, posterior.std
        shift, scale = float(latent_mean.mean()), 1.0 / float(latent_mean.std())
        pipe.vae.register_to_config(shift_factor=shift, scaling_factor=scale)
        backbone = adapter_for(pipe.transformer)
        captions = [digits.prompt_for(k) for k in range(10)] + [""]
        condition = backbone.encode(pipe, captions, data.images.shape[-1])  # 11 rows; row 10 is ""
    process = FlowProcess(shift=pipe.scheduler.config.shift, timestep_sampling="logit_normal")
    transformer = pipe.transformer.train()
    collapse_repeated_context(transformer)  # T5's 256 zero tokens, computed once
    torch.manual_seed(cfg.seed)  # the process draws σ from torch's global generator

    def losses():
        for idx in batches(len(data), cfg.batch_size, cfg.transformer_steps, generator):
            x0 = (latent_mean[idx] + latent_std[idx] * torch.randn(latent_mean[idx].shape, generator=generator) - shift) * scale
            noise = torch.randn(x0.shape, generator=generator)
            t = process.sample_timesteps(len(idx), 0.0, process.max_timestep)
            caption = dropped_captions(data.labels[idx], cfg.caption_dropout, generator)
            prediction = backbone(transformer, process.add_noise(x0, noise, t), t,
                                  {name: value[caption] for name, value in condition.items()})
            yield F.mse_loss(prediction, process.prediction_from(x0, noise, t))

    return fit(transformer, losses(), cfg.transformer_steps, cfg.transformer_learning_rate, cfg.ema_decay,
               "transformer")


def train_sd(cfg: TeacherConfig, output_dir: Path, train: digits.DigitsSplit, generator: torch.Generator) -> dict:
    """Stages 1–3: the classifier, the autoencoder and the ε UNet; returns the log's figures."""
    classifier = train_classifier(cfg, train, generator)
    with torch.no_grad():
        heldout = digits.load_digits("heldout")
        accuracy = (classifier(heldout.images).argmax(1) == heldout.labels).float().mean().item()

    pipe = tiny_sd.build_pipeline(output_dir / "teacher", seed=cfg.seed)
    reconstruction_mse = train_vae(cfg, pipe.vae, train, generator)
    pipe.unet = train_unet(cfg, pipe, train, generator)
    pipe.register_modules(unet=pipe.unet)

    pipe.save_pretrained(output_dir / "teacher", safe_serialization=True)
    classifier.save(output_dir / "digits_classifier.safetensors")
    return {
        "classifier_heldout_accuracy": accuracy,
        "vae_train_reconstruction_mse": reconstruction_mse,
        "vae_scaling_factor": pipe.vae.config.scaling_factor,
    }


def train_sd3(cfg: TeacherConfig, output_dir: Path, train: digits.DigitsSplit, generator: torch.Generator) -> dict:
    """Stage 4: the flow-matching transformer on ``--vae_from``'s autoencoder; returns the log's figures."""
    vae = AutoencoderKL.from_pretrained(cfg.vae_from, subfolder="vae").requires_grad_(False).eval()
    pipe = tiny_sd3.build_pipeline(output_dir / "teacher_sd3", vae, seed=cfg.seed)
    pipe.transformer = train_transformer(cfg, pipe, train, generator)
    pipe.register_modules(transformer=pipe.transformer)
    pipe.save_pretrained(output_dir / "teacher_sd3", safe_serialization=True)
    return {
        "transformer_parameters": sum(p.numel() for p in pipe.transformer.parameters()),
        "vae_scaling_factor": pipe.vae.config.scaling_factor,
        "vae_shift_factor": pipe.vae.config.shift_factor,
    }


def main(cfg: TeacherConfig) -> None:
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(cfg.seed)
    train = digits.load_digits("train")
    started = time.perf_counter()
    figures = (train_sd if cfg.format == "sd" else train_sd3)(cfg, output_dir, train, generator)
    log = {
        "config": vars(cfg),
        **figures,
        "wall_time_s": time.perf_counter() - started,
        "torch_threads": torch.get_num_threads(),
    }
    name = "train_log.json" if cfg.format == "sd" else f"train_log_{cfg.format}.json"
    (output_dir / name).write_text(json.dumps(log, indent=2) + "\n")
    print(json.dumps({k: v for k, v in log.items() if k != "config"}, indent=2))


if __name__ == "__main__":
    main(configs.parse(TeacherConfig))
