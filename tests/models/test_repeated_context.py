"""The SD3 transformer that computes a trailing run of identical context tokens once gives diffusers' output."""

import copy

import pytest
import torch
from diffusers import DiffusionPipeline, SD3Transformer2DModel

from stepdistill.models.loading import load_pipeline
from stepdistill.models.repeated_context import (
    RepeatedContextJointAttention,
    collapse_repeated_context,
    repeated_suffix_length,
)

PROMPTS = ["a handwritten digit three", "a handwritten digit seven"]


def transformer(**overrides) -> SD3Transformer2DModel:
    torch.manual_seed(0)
    config = dict(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=3, attention_head_dim=8,
                  num_attention_heads=2, joint_attention_dim=24, caption_projection_dim=16, pooled_projection_dim=12,
                  pos_embed_max_size=8)
    return SD3Transformer2DModel(**{**config, **overrides})


def inputs(context: torch.Tensor) -> dict:
    generator = torch.Generator().manual_seed(1)
    batch = context.shape[0]
    return dict(hidden_states=torch.randn(batch, 4, 8, 8, generator=generator),
                timestep=torch.tensor([980.0, 40.0])[:batch], encoder_hidden_states=context,
                pooled_projections=torch.randn(batch, 12, generator=generator))


def clip_then_zeros(batch: int = 2, clip_tokens: int = 5, zeros: int = 40) -> torch.Tensor:
    context = torch.zeros(batch, clip_tokens + zeros, 24)
    context[:, :clip_tokens] = torch.randn(batch, clip_tokens, 24, generator=torch.Generator().manual_seed(2))
    return context


def test_the_repeated_suffix_is_the_trailing_run_shared_by_every_row():
    context = clip_then_zeros(clip_tokens=3, zeros=6)
    assert repeated_suffix_length(context) == 6
    context[1, 5] = 1.0  # one row breaks the run two tokens earlier for the whole batch
    assert repeated_suffix_length(context) == 3
    assert repeated_suffix_length(torch.randn(2, 4, 3)) == 1


@pytest.mark.parametrize("qk_norm", [None, "rms_norm"])
def test_collapsing_the_zero_run_leaves_output_and_gradients_unchanged(qk_norm):
    plain = transformer(qk_norm=qk_norm)
    fast = copy.deepcopy(plain)
    assert collapse_repeated_context(fast)
    assert all(isinstance(block.attn.processor, RepeatedContextJointAttention) for block in fast.transformer_blocks)
    given = inputs(clip_then_zeros())

    seen = []  # the context length the blocks receive
    fast.transformer_blocks[0].register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["encoder_hidden_states"].shape[1]), with_kwargs=True)
    outputs = [model(**given).sample for model in (plain, fast)]
    assert seen == [6]  # 5 CLIP tokens and one zero token in place of 40
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=1e-5)

    target = torch.randn(outputs[0].shape, generator=torch.Generator().manual_seed(3))
    for model, output in zip((plain, fast), outputs):
        (output - target).pow(2).mean().backward()
    for (name, p_plain), p_fast in zip(plain.named_parameters(), fast.parameters()):
        torch.testing.assert_close(p_fast.grad, p_plain.grad, rtol=1e-4, atol=1e-7, msg=name)


def test_a_context_without_a_run_and_explicit_attention_kwargs_pass_unchanged():
    plain = transformer()
    fast = copy.deepcopy(plain)
    collapse_repeated_context(fast)
    given = inputs(torch.randn(2, 7, 24, generator=torch.Generator().manual_seed(4)))
    torch.testing.assert_close(fast(**given).sample, plain(**given).sample, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="no attention mask"):
        fast(**inputs(clip_then_zeros()), joint_attention_kwargs={"attention_mask": torch.zeros(1, 1)})


def test_only_diffusers_own_sd3_joint_attention_is_replaced():
    assert not collapse_repeated_context(transformer(dual_attention_layers=(0,)))  # SD3.5's extra image attention
    assert not collapse_repeated_context(torch.nn.Linear(2, 2))
    assert not collapse_repeated_context(None)
    network = transformer()
    assert collapse_repeated_context(network) and collapse_repeated_context(network)  # installing twice is once
    assert len(network._forward_pre_hooks) == 1


def test_a_loaded_sd3_pipeline_samples_what_diffusers_samples(backbone_dirs):
    folder = backbone_dirs["sd3"]
    ours = load_pipeline(folder)
    theirs = DiffusionPipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)
    assert isinstance(ours.transformer.transformer_blocks[0].attn.processor, RepeatedContextJointAttention)
    assert not isinstance(theirs.transformer.transformer_blocks[0].attn.processor, RepeatedContextJointAttention)
    images = []
    for pipe in (ours, theirs):
        pipe.set_progress_bar_config(disable=True)
        images.append(pipe(prompt=PROMPTS, num_inference_steps=3, guidance_scale=2.0, output_type="pt",
                           generator=torch.Generator().manual_seed(0)).images)
    torch.testing.assert_close(images[0], images[1], rtol=0, atol=1e-5)
