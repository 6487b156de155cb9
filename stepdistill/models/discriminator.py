"""Discriminators on a frozen or trained network's features: one head per named layer, optionally
conditioned on the prompt and the noise level; and ADD's extractor of a pixel network's features
(:func:`pixel_features`; LADD's is the teacher's :meth:`~stepdistill.models.denoiser.Denoiser.features`).

A head reads one layer's feature map ``(B, C, h, w)`` (a UNet block's output, a transformer block's
image tokens as a grid; :meth:`~stepdistill.models.backbones.Backbone.features`) and gives a logit
per image, from its hidden map pooled over the locations, and the discriminator's logit is the mean
of its heads'; or, ``per_location``, a logit per location of every head (a patch discriminator, as
the projected-GAN heads LADD builds on), ``(B, Σ h·w)``: the losses average over all of them, so
each location of each map must look real on its own and a head weighs as many locations as it has.
A conditioned head is a projection discriminator (Miyato & Koyama, "cGANs with Projection
Discriminator", 2018): with h the head's hidden vector (pooled, or at one location) and c an
embedding of the pooled prompt embedding plus a sinusoidal embedding of the noise level t,
logit = w·h + b + c·h, so the prompt and the noise level change every logit (LADD §3.2 conditions
its heads on both; DMD2's single head on the fake score's middle block takes neither).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from stepdistill.conditioning import Condition
from stepdistill.models.backbones import layer_outputs

FeatureFunction = Callable[[torch.Tensor, torch.Tensor, Condition], dict[str, torch.Tensor]]
"""``features(x, t, condition)`` → feature maps by layer: a discriminator's frozen extractor."""


class DiscriminatorHead(nn.Module):
    """A feature map ``(B, C, h, w)`` → ``(logit (B,), pooled hidden (B, hidden))``: GroupNorm, SiLU,
    3×3 convolution, SiLU, global average pool, linear; ``per_location``, the same layers without the
    pool: ``(logits (B, h·w), hidden (B, h·w, hidden))``."""

    def __init__(self, channels: int, hidden: int = 128, per_location: bool = False) -> None:
        super().__init__()
        groups = 32 if channels % 32 == 0 else 8 if channels % 8 == 0 else 1
        self.layers = nn.Sequential(
            nn.GroupNorm(groups, channels), nn.SiLU(),
            nn.Conv2d(channels, hidden, 3, padding=1), nn.SiLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(hidden, 1),
        )
        self.per_location = per_location

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """In the head's own precision: fp32 weights read bf16 features in fp32; weights a sharded run
        computes in bf16 read them in bf16."""
        features = features.to(self.layers[0].weight.dtype)
        if self.per_location:  # the layers up to the pool; the linear layer reads every location
            hidden = self.layers[:4](features).flatten(2).transpose(1, 2)
        else:
            hidden = self.layers[:-1](features)
        return self.layers[-1](hidden).squeeze(-1), hidden


def noise_level_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal embedding ``(B, dim)`` of the timesteps ``t`` (the teacher's units), as the UNets' own."""
    half = dim // 2
    frequencies = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * frequencies[None]
    return torch.cat([angles.cos(), angles.sin()], dim=1)


class Discriminator(nn.Module):
    """Heads on the feature layers ``channels`` names (layer → channels); with ``condition_dim`` each
    head is conditioned on a pooled prompt embedding of that size and on the noise level.

    ``discriminator(features, pooled=None, t=None)`` → logits ``(B,)``, the mean over heads; with
    ``per_location``, ``(B, L)``: every head's logit at each of its locations."""

    def __init__(self, channels: dict[str, int], condition_dim: int | None = None, hidden: int = 128,
                 per_location: bool = False) -> None:
        super().__init__()
        self.layers = tuple(channels)
        self.per_location = per_location
        self.heads = nn.ModuleList(DiscriminatorHead(c, hidden, per_location) for c in channels.values())
        self.conditioned = condition_dim is not None
        if self.conditioned:
            self.hidden = hidden
            self.prompt_projection = nn.Linear(condition_dim, hidden)
            self.noise_projection = nn.Linear(hidden, hidden)

    @classmethod
    def for_features(cls, features: dict[str, torch.Tensor], condition_dim: int | None = None,
                     per_location: bool = False) -> Discriminator:
        """Heads sized for ``features`` (one extractor output, by layer)."""
        return cls({name: feature.shape[1] for name, feature in features.items()}, condition_dim,
                   per_location=per_location)

    def forward(self, features: dict[str, torch.Tensor], pooled: torch.Tensor | None = None,
                t: torch.Tensor | None = None) -> torch.Tensor:
        if self.conditioned and (pooled is None or t is None):
            raise ValueError("a conditioned discriminator needs the pooled prompt embedding and the noise level")
        embedding = (self.prompt_projection(pooled.float()) + self.noise_projection(noise_level_embedding(t, self.hidden))
                     if self.conditioned else None)
        logits = []
        for name, head in zip(self.layers, self.heads):
            logit, hidden = head(features[name])
            if embedding is not None:
                logit = logit + ((embedding[:, None] if self.per_location else embedding) * hidden).sum(-1)
            logits.append(logit)
        return torch.cat(logits, dim=1) if self.per_location else torch.stack(logits).mean(0)


def pixel_features(decode: Callable[[torch.Tensor], torch.Tensor], network: torch.nn.Module,
                   layers: tuple[str, ...], size: int | None = None) -> FeatureFunction:
    """ADD's extractor: a frozen pixel-space network's feature maps of ``layers`` on decoded latents
    (images in [-1, 1], resized to ``size`` when given; t and the prompt are not its inputs)."""

    def features(x: torch.Tensor, t: torch.Tensor, condition: Condition) -> dict[str, torch.Tensor]:
        images = decode(x)
        if size is not None and images.shape[-1] != size:
            images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
        captured = layer_outputs(network, layers, lambda: network(images))
        return {name: as_feature_map(output) for name, output in captured.items()}

    return features


def as_feature_map(output) -> torch.Tensor:
    """A layer's output as ``(B, C, h, w)``: a tensor (or the first of a tuple / model output); tokens
    ``(B, L, D)`` with L a square (plus one class token) become a D-channel grid."""
    output = output[0] if isinstance(output, (tuple, list)) else getattr(output, "last_hidden_state", output)
    if output.ndim == 3:
        tokens = output[:, 1:] if int((output.shape[1] - 1) ** 0.5) ** 2 == output.shape[1] - 1 else output
        side = int(tokens.shape[1] ** 0.5)
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], side, side)
    return output
