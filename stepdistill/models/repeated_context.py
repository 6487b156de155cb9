"""SD3 joint attention that computes a run of identical context tokens once — exactly.

SD3's pipeline without its T5 encoder (``text_encoder_3=None``) fills T5's share of the context with
``max_sequence_length`` (256) rows of zeros after the CLIP tokens. Identical context tokens stay
identical through every MMDiT block: each operation on context tokens is token-wise (the context
embedder, adaLN, the MLP) except joint attention, where identical tokens have identical queries, keys
and values. And n identical keys k with value v weigh in softmax attention exactly as one key whose
logit is raised by log n:

    Σ_j e^{q·k_j} v_j + n e^{q·k} v = Σ_j e^{q·k_j} v_j + e^{q·k + log n} v   (and likewise in the normaliser).

So :func:`collapse_repeated_context` keeps one token of a trailing run of n identical context tokens
and gives its key an additive log n bias in every joint attention: the transformer's output is the
same up to float rounding, for a fraction of the work when the run dominates the sequence (the
digits SD3 teacher: 16 CLIP tokens and 256 zeros beside 16 image tokens, 33 tokens instead of 288).
The saved model is untouched; diffusers loads it with its own attention and samples the same images.

Only the transformer's output is kept exact: the gradient reaching the dropped copies of the
context is lost, which is nothing for the frozen text encoders of distillation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers import SD3Transformer2DModel
from diffusers.models.attention_processor import Attention, JointAttnProcessor2_0
from torch import nn


def repeated_suffix_length(context: torch.Tensor) -> int:
    """How many trailing tokens of ``context`` (B, L, D) equal each row's last token, in every row."""
    same = (context == context[:, -1:]).all(dim=-1).all(dim=0)  # (L,)
    return int(same.flip(0).int().cumprod(0).sum())


class RepeatedContextJointAttention:
    """SD3's joint attention (image and context tokens attend to both), where the last context token
    may stand for ``context_repeats`` identical ones (its key's logit raised by log n)."""

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        context_repeats: int = 1,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if attention_mask is not None:
            raise ValueError("SD3's joint attention takes no attention mask")

        def heads(tokens: torch.Tensor, to_q, to_k, to_v, norm_q, norm_k):
            query, key, value = (f(tokens).unflatten(-1, (attn.heads, -1)).transpose(1, 2) for f in (to_q, to_k, to_v))
            return (norm_q(query) if norm_q is not None else query), (norm_k(key) if norm_k is not None else key), value

        image = heads(hidden_states, attn.to_q, attn.to_k, attn.to_v, attn.norm_q, attn.norm_k)
        context = heads(encoder_hidden_states, attn.add_q_proj, attn.add_k_proj, attn.add_v_proj,
                        attn.norm_added_q, attn.norm_added_k)
        query, key, value = (torch.cat(pair, dim=2) for pair in zip(image, context))
        bias = None
        if context_repeats > 1:
            bias = torch.zeros(1, key.shape[2], dtype=query.dtype, device=query.device)  # broadcast over queries
            bias[0, -1] = math.log(context_repeats)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias).transpose(1, 2).flatten(2)
        image_out, context_out = out[:, : hidden_states.shape[1]], out[:, hidden_states.shape[1] :]
        image_out = attn.to_out[1](attn.to_out[0](image_out))
        return image_out, (context_out if attn.context_pre_only else attn.to_add_out(context_out))


def _collapse_context(transformer: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook: a trailing run of identical context tokens becomes one, and the blocks are told how many."""
    context = kwargs.get("encoder_hidden_states")
    if context is None or kwargs.get("joint_attention_kwargs") is not None:
        return None
    repeats = repeated_suffix_length(context)
    if repeats < 2:
        return None
    kept = context[:, : context.shape[1] - repeats + 1]
    return args, {**kwargs, "encoder_hidden_states": kept, "joint_attention_kwargs": {"context_repeats": repeats}}


def collapse_repeated_context(transformer: nn.Module) -> bool:
    """Compute trailing runs of identical context tokens once in ``transformer`` (an SD3 MMDiT with
    diffusers' own joint attention and no SD3.5 dual-attention layers); returns whether it did.
    Calls that pass the context by position or give ``joint_attention_kwargs`` run unchanged."""
    if not isinstance(transformer, SD3Transformer2DModel) or transformer.config.dual_attention_layers:
        return False
    attentions = [block.attn for block in transformer.transformer_blocks]
    if any(isinstance(attn.processor, RepeatedContextJointAttention) for attn in attentions):
        return True
    if not all(isinstance(attn.processor, JointAttnProcessor2_0) for attn in attentions):
        return False
    for attn in attentions:
        attn.set_processor(RepeatedContextJointAttention())
    transformer.register_forward_pre_hook(_collapse_context, with_kwargs=True)
    return True
