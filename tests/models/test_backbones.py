"""The backbone adapters: which pipeline gets which adapter, the refusals, features, Flux's packing."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from stepdistill.models.backbones import FluxBackbone, SD3Backbone, UNetBackbone, backbone_for
from stepdistill.models.loading import PipelineError, load_pipeline
from stepdistill.models.teacher import load_teacher


@pytest.mark.parametrize("name, adapter", [("sd", UNetBackbone), ("sdxl", UNetBackbone), ("sd3", SD3Backbone),
                                           ("flux", FluxBackbone)])
def test_each_pipeline_gets_its_adapter_and_conditions(backbone_dirs, name, adapter):
    teacher = load_teacher(str(backbone_dirs[name]), resolution=32)
    assert type(teacher.backbone) is adapter
    condition = teacher.encode_prompts(["a handwritten digit one", "a handwritten digit two", "a"])
    expected = {"sd": {"prompt_embeds"}, "sdxl": {"prompt_embeds", "text_embeds", "time_ids"},
                "sd3": {"prompt_embeds", "pooled_prompt_embeds"}, "flux": {"prompt_embeds", "pooled_prompt_embeds"}}
    assert set(condition) == expected[name] and all(v.shape[0] == 3 for v in condition.values())
    unconditional = teacher.encode_unconditional()
    if name == "sdxl":  # force_zeros_for_empty_prompt, as SDXL's pipeline does
        assert not unconditional["prompt_embeds"].any() and not unconditional["text_embeds"].any()
        assert condition["time_ids"][0].tolist() == [32, 32, 0, 0, 32, 32]
    x = torch.randn((2, *teacher.latent_shape))
    first_block = "down_blocks.0" if adapter is UNetBackbone else "transformer_blocks.0"
    layers = (teacher.backbone.feature_layer, first_block)
    guidance = torch.ones(2) if teacher.backbone.takes_guidance(teacher.network) else None
    seen = {}
    hooks = [teacher.network.get_submodule(name).register_forward_hook(
        lambda module, inputs, output, name=name: seen.setdefault(name, output)) for name in layers]
    features = teacher.backbone.features(teacher.network, x, torch.tensor([500.0, 900.0]),
                                         {k: v[:2] for k, v in condition.items()}, guidance=guidance, layers=layers)
    for hook in hooks:
        hook.remove()
    assert set(features) == set(layers)
    middle = features[teacher.backbone.feature_layer]
    assert middle.ndim == 4 and middle.shape[:2] == (2, teacher.backbone.feature_channels(teacher.network))
    for name in layers:  # the layers' own outputs (image tokens laid out on the latent grid for transformers)
        output = seen[name][1] if adapter is not UNetBackbone else seen[name]
        output = output[0] if isinstance(output, tuple) else output
        flat = features[name].flatten(2).transpose(1, 2) if adapter is not UNetBackbone else features[name]
        assert torch.equal(flat, output)


@pytest.mark.parametrize("name, last", [("sd", "conv_out"), ("sd3", "proj_out")])
def test_features_stop_after_their_last_layer_with_a_full_pass_outputs(backbone_dirs, name, last):
    teacher = load_teacher(str(backbone_dirs[name]), resolution=32)
    condition = teacher.encode_prompts(["a handwritten digit one", "a handwritten digit two"])
    x, t = torch.randn((2, *teacher.latent_shape)), torch.tensor([500.0, 900.0])
    layers = (teacher.backbone.feature_layer,)
    ran, full = [], {}
    hooks = [teacher.network.get_submodule(last).register_forward_hook(lambda *args: ran.append(last)),
             teacher.network.get_submodule(layers[0]).register_forward_hook(
                 lambda module, inputs, output: full.setdefault("output", output))]
    features = teacher.backbone.features(teacher.network, x, t, condition, layers=layers)
    assert ran == []  # the blocks after the feature layer did not run
    full.clear()
    teacher.backbone(teacher.network, x, t, condition)  # a whole pass: the network's output layer runs
    for hook in hooks:
        hook.remove()
    assert ran == [last]
    output = full["output"][1] if name == "sd3" else full["output"]
    assert torch.equal(features[layers[0]].flatten(2).transpose(1, 2) if name == "sd3" else features[layers[0]], output)


def test_flux_packing_round_trips_like_the_pipeline(backbone_dirs):
    teacher = load_teacher(str(backbone_dirs["flux"]), resolution=32)
    latents = torch.randn(2, *teacher.latent_shape)
    packed = teacher.backbone.to_pipeline_latents(latents)
    expected = teacher.pipeline._pack_latents(latents, 2, latents.shape[1], 16, 16)
    assert torch.equal(packed, expected)
    assert torch.equal(teacher.backbone.from_pipeline_latents(packed, teacher.latent_shape), latents)
    assert torch.equal(teacher.backbone.image_ids(16, 16, "cpu", torch.float32),
                       teacher.pipeline._prepare_latent_image_ids(2, 8, 8, "cpu", torch.float32))


def test_sd3_without_t5_loads_and_conditions_on_zeros(backbone_dirs):
    pipe = load_pipeline(backbone_dirs["sd3"])
    assert pipe.text_encoder_3 is None
    teacher = load_teacher(str(backbone_dirs["sd3"]))
    embeddings = teacher.encode_prompts(["a handwritten digit one"])["prompt_embeds"]
    clip_tokens = pipe.tokenizer.model_max_length
    assert embeddings[:, clip_tokens:].abs().sum() == 0 and embeddings[:, :clip_tokens].abs().sum() > 0


def test_unknown_pipelines_and_sizes_are_refused_in_one_line(tmp_path, backbone_dirs):
    unet = UNet2DModel(sample_size=8, block_out_channels=(8, 8), norm_num_groups=8, down_block_types=("DownBlock2D",) * 2,
                       up_block_types=("UpBlock2D",) * 2)
    DDPMPipeline(unet, DDPMScheduler()).save_pretrained(tmp_path)
    with pytest.raises(PipelineError) as error:
        load_teacher(str(tmp_path))
    assert "\n" not in str(error.value)
    with pytest.raises(PipelineError, match="multiple of 4"):
        load_teacher(str(backbone_dirs["flux"]), resolution=30)


def test_refiner_and_image_conditioned_unets_are_refused(backbone_dirs):
    pipe = load_pipeline(backbone_dirs["sdxl"])
    pipe.text_encoder = None  # what an SDXL refiner looks like: only the second, pooled encoder
    with pytest.raises(ValueError, match="refiner"):
        backbone_for(pipe)
