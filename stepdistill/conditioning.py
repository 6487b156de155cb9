"""Conditioning as data: what a denoiser is conditioned on, as named tensors with the batch first.

Which entries a condition holds is the backbone's business (:mod:`stepdistill.models.backbones`):

    SD 1.x / 2.x   prompt_embeds (B, L, D)
    SDXL           prompt_embeds (B, L, D₁ + D₂), text_embeds (B, P) pooled, time_ids (B, 6) micro-conditioning
    SD3            prompt_embeds (B, L, D) joint CLIP (+ T5, or zeros without it), pooled_prompt_embeds (B, P)
    Flux           prompt_embeds (B, L, D) T5, pooled_prompt_embeds (B, P) CLIP

Methods never name an entry: they pass conditions through, and classifier-free guidance concatenates
every entry of the conditional and unconditional halves (:func:`concat`).
"""

from __future__ import annotations

import torch

Condition = dict[str, torch.Tensor]


def batch_size(condition: Condition) -> int:
    """The number of samples a condition describes (every entry's first dimension)."""
    sizes = {value.shape[0] for value in condition.values()}
    if len(sizes) != 1:
        raise ValueError(f"the entries of a condition disagree on the batch size ({sorted(sizes)})")
    return sizes.pop()


def concat(*conditions: Condition) -> Condition:
    """Entry-wise concatenation along the batch (CFG runs conditional and unconditional halves at once)."""
    return {name: torch.cat([c[name] for c in conditions]) for name in conditions[0]}


def select(condition: Condition, index: torch.Tensor | slice) -> Condition:
    """The samples ``index`` of every entry."""
    return {name: value[index] for name, value in condition.items()}


def expand(condition: Condition, size: int) -> Condition:
    """A one-sample condition repeated ``size`` times (a view, as ``Tensor.expand``)."""
    return {name: value.expand(size, *value.shape[1:]) for name, value in condition.items()}


def to(condition: Condition, device: torch.device | str) -> Condition:
    return {name: value.to(device) for name, value in condition.items()}


def split(condition: Condition, chunk: int) -> list[Condition]:
    """Consecutive chunks of ``chunk`` samples."""
    size = batch_size(condition)
    return [select(condition, slice(start, start + chunk)) for start in range(0, size, chunk)]
