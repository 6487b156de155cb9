"""Train the embedded digits teacher and its evaluator (the project's offline default).

    python recipes/train_teacher.py --output_dir stepdistill/assets   # rebuilds the shipped files

On the train split of scikit-learn's digits (see ``stepdistill.data.digits``), in three stages:

1. a digit classifier (the evaluator behind FD-digits and prompt accuracy),
2. an ``AutoencoderKL`` 32×32×3 → 8×8×4 (reconstruction + a small KL term), whose latent scale is
   set so that scaled latents have unit variance, as Stable Diffusion's 0.18215 does,
3. a ``UNet2DConditionModel`` predicting ε on SD's ``scaled_linear`` DDPM schedule, conditioned on a
   frozen random ``CLIPTextModel``; 10 % of captions are dropped to "" so classifier-free guidance
   works; the saved weights are an EMA of the training weights.

It writes ``OUTPUT_DIR/teacher/`` (a ``StableDiffusionPipeline`` folder) and
``OUTPUT_DIR/digits_classifier.safetensors``. Seeded: the same command gives the same files on
the same machine and library versions.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from tqdm.auto import tqdm

from stepdistill import config as configs
from stepdistill.config import ConfigError, field
from stepdistill.data import digits
from stepdistill.evaluation.classifier import DigitClassifier
from stepdistill.models import tiny_sd


@dataclass
class TeacherConfig:
    """Train the digits teacher pipeline and the digit classifier."""

    output_dir: str = field("outputs/train_teacher", "folder for teacher/ and digits_classifier.safetensors")
    seed: int = field(0, "seed for initialisation, batches and noise")
    classifier_steps: int = field(400, "classifier optimisation steps")
    vae_steps: int = field(600, "autoencoder optimisation steps")
    unet_steps: int = field(2000, "UNet optimisation steps")
    batch_size: int = field(64, "images per optimisation step (all three stages)")
    unet_learning_rate: float = field(1e-3, "peak AdamW learning rate of the UNet (cosine decay)")
    caption_dropout: float = field(0.1, "share of captions replaced by the empty prompt (enables CFG)")
    ema_decay: float = field(0.999, "EMA decay of the saved UNet weights")
    num_threads: int = field(0, "torch CPU threads (0: torch's default)")

    def validate(self) -> None:
        for name in ("classifier_steps", "vae_steps", "unet_steps", "batch_size"):
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
    ema = copy.deepcopy(unet).requires_grad_(False)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=cfg.unet_learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.unet_learning_rate, total_steps=cfg.unet_steps, pct_start=0.05)
    progress = tqdm(batches(len(data), cfg.batch_size, cfg.unet_steps, generator), total=cfg.unet_steps, desc="3/3 unet")
    for step, idx in enumerate(progress):
        latents = (latent_mean[idx] + latent_std[idx] * torch.randn(latent_mean[idx].shape, generator=generator)) * scale
        noise = torch.randn(latents.shape, generator=generator)
        t = torch.randint(0, noise_schedule.config.num_train_timesteps, (len(idx),), generator=generator)
        caption = data.labels[idx].clone()
        caption[torch.rand(len(idx), generator=generator) < cfg.caption_dropout] = 10
        prediction = unet(noise_schedule.add_noise(latents, noise, t), t, caption_embeddings[caption]).sample
        loss = F.mse_loss(prediction, noise)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), unet.parameters()):
                p_ema.lerp_(p, 1 - decay)
        if step % 50 == 0:
            progress.set_postfix(loss=f"{loss.item():.4f}")
    return ema.eval()


def main(cfg: TeacherConfig) -> None:
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(cfg.seed)
    train = digits.load_digits("train")
    started = time.perf_counter()

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
    log = {
        "config": vars(cfg),
        "classifier_heldout_accuracy": accuracy,
        "vae_train_reconstruction_mse": reconstruction_mse,
        "vae_scaling_factor": pipe.vae.config.scaling_factor,
        "wall_time_s": time.perf_counter() - started,
        "torch_threads": torch.get_num_threads(),
    }
    (output_dir / "train_log.json").write_text(json.dumps(log, indent=2) + "\n")
    print(json.dumps({k: v for k, v in log.items() if k != "config"}, indent=2))


if __name__ == "__main__":
    main(configs.parse(TeacherConfig))
