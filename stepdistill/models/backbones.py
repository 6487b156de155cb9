"""Backbone adapters: everything that differs between the networks of SD 1.x/2.x, SDXL, SD3 and Flux.

An adapter maps (x_t, t, condition) to the network's raw output whatever the network is, so the
denoiser contract above it (:class:`~stepdistill.models.denoiser.Denoiser`) is one for all:

* **the call**: the UNet takes ``encoder_hidden_states`` (+ SDXL's ``added_cond_kwargs``); SD3's
  MMDiT takes joint and pooled embeddings and t = 1000σ; Flux takes 2×2-packed latents with
  positional ids, σ itself, and (FLUX.1-dev) the guidance scale as an input;
* **the condition**: which text-encoder outputs the network reads (:mod:`stepdistill.conditioning`),
  computed once through the pipeline's own ``encode_prompt``;
* **the latent layout**: methods always see ``(B, C, h, w)``; Flux's packing happens here;
* **LoRA target modules** and **features of named layers** for discriminators (by default one
  middle layer; LADD's heads read several), captured by forward hooks while the forward pass runs to
  its end (no hook aborts it), and the pooled prompt embedding the heads may be conditioned on.

Adapters hold no weights: student, fake score and teacher are different networks of one family.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import numpy as np
import torch
from diffusers import (
    DiffusionPipeline, FluxPipeline, FluxTransformer2DModel, SD3Transformer2DModel, StableDiffusion3Pipeline,
    StableDiffusionXLPipeline, UNet2DConditionModel,
)
from diffusers.utils.torch_utils import randn_tensor
from torch import nn
from torch.distributed.fsdp import FSDPModule

from stepdistill.conditioning import Condition
from stepdistill.models.loading import PipelineError

UNET_LORA_TARGETS = (
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj",
)
TRANSFORMER_LORA_TARGETS = (  # joint attention of both streams, their feed-forwards, Flux's single-stream MLPs
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp",
)


FLUX_MAX_SEQUENCE_LENGTH = 512  # T5 tokens, FluxPipeline's default: training conditions must be the ones it samples with


class _LayersCaptured(Exception):
    """Ends a forward pass of :func:`layer_outputs` once every layer asked for has given its output."""


def layer_outputs(network: nn.Module, layers: tuple[str, ...], forward: Callable[[], object]) -> dict[str, object]:
    """The outputs of the submodules ``layers`` of ``network`` while ``forward()`` runs, by name (forward
    hooks, removed afterwards). The pass stops once all of them have run: features of a UNet's down and
    middle blocks skip its up blocks (LADD on the digits: 1.74x faster per step). A network laid out by
    FSDP runs to its end, as its units gather and free their weights in hooks that a pass must complete."""
    captured: dict[str, object] = {}
    wanted = set(layers)
    stop_early = not isinstance(network, FSDPModule)

    def keep(module: nn.Module, inputs, output, name: str) -> None:
        captured.setdefault(name, output)
        if stop_early and captured.keys() == wanted:
            raise _LayersCaptured

    hooks = [network.get_submodule(name).register_forward_hook(partial(keep, name=name)) for name in wanted]
    try:
        forward()
    except _LayersCaptured:
        pass
    finally:
        for hook in hooks:
            hook.remove()
    return captured


class BackboneError(PipelineError):
    """A pipeline or request no adapter can serve; the message says what is supported."""


class Backbone:
    """One family's adapter. ``component`` names the network in the pipeline (``unet``/``transformer``)."""

    component = "unet"
    lora_target_modules: tuple[str, ...] = UNET_LORA_TARGETS
    feature_layer = "mid_block"

    # -- the network call ------------------------------------------------------------------------
    def __call__(
        self, network: nn.Module, x_t: torch.Tensor, t: torch.Tensor, condition: Condition,
        guidance: torch.Tensor | None = None, timestep_cond: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The network's raw prediction for ``x_t`` ``(B, C, h, w)`` at timesteps ``t`` ``(B,)``."""
        raise NotImplementedError

    def takes_guidance(self, network: nn.Module) -> bool:
        """Whether the network has a guidance-scale input of its own (FLUX.1-dev), used instead of CFG."""
        return False

    def guidance_is_possible(self, network: nn.Module) -> bool:
        """Whether a guidance scale ≠ 1 means anything: CFG (trained with empty captions), or a guidance input."""
        return True

    def pipeline_runs_cfg(self, network: nn.Module) -> bool:
        """Whether the pipeline turns ``guidance_scale`` > 1 into two network calls per step (CFG)."""
        return getattr(network.config, "time_cond_proj_dim", None) is None

    def features(
        self, network: nn.Module, x_t: torch.Tensor, t: torch.Tensor, condition: Condition,
        guidance: torch.Tensor | None = None, class_labels: torch.Tensor | None = None,
        layers: tuple[str, ...] | None = None,
    ) -> dict[str, torch.Tensor]:
        """The outputs of ``layers`` (default: :attr:`feature_layer`), each as a map ``(B, C, h, w)``,
        by module name; the pass stops after the last of them (:func:`layer_outputs`)."""
        captured = layer_outputs(network, layers or (self.feature_layer,),
                                 lambda: self(network, x_t, t, condition, guidance=guidance, class_labels=class_labels))
        return {name: self.feature_map(output, x_t) for name, output in captured.items()}

    def feature_map(self, output, x_t: torch.Tensor) -> torch.Tensor:
        """A UNet block's output (its hidden states come first where a block returns more)."""
        return output[0] if isinstance(output, tuple) else output

    def discriminator_layers(self, network: nn.Module) -> tuple[str, ...]:
        """The layers LADD's heads read, from fine to coarse: a UNet's down blocks and its middle block."""
        return tuple(f"down_blocks.{i}" for i in range(len(network.down_blocks))) + ("mid_block",)

    def pooled(self, condition: Condition) -> torch.Tensor:
        """One vector ``(B, D)`` per prompt, for discriminator heads conditioned on it: the pooled text
        embedding where the backbone has one, else the token embeddings' mean."""
        return condition["prompt_embeds"].mean(1)

    def feature_channels(self, network: nn.Module) -> int:
        raise NotImplementedError

    # -- conditions ------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, pipeline: DiffusionPipeline, prompts: list[str], resolution: int) -> Condition:
        """The condition of each prompt."""
        raise NotImplementedError

    @torch.no_grad()
    def encode_unconditional(self, pipeline: DiffusionPipeline, resolution: int) -> Condition:
        """The unconditional condition (one sample) that the pipeline's CFG uses: the empty prompt's."""
        return self.encode(pipeline, [""], resolution)

    def pipeline_inputs(self, condition: Condition, unconditional: Condition) -> dict:
        """The pipeline-call arguments that pass precomputed conditions instead of prompts."""
        return {"prompt_embeds": condition["prompt_embeds"], "negative_prompt_embeds": unconditional["prompt_embeds"]}

    # -- latents ---------------------------------------------------------------------------------
    def default_resolution(self, pipeline: DiffusionPipeline) -> int:
        return self.network(pipeline).config.sample_size * pipeline.vae_scale_factor

    def latent_shape(self, pipeline: DiffusionPipeline, resolution: int) -> tuple[int, int, int]:
        """``(C, h, w)`` of one latent, unpacked, at ``resolution`` px."""
        size = resolution // pipeline.vae_scale_factor
        return (self.latent_channels(pipeline), size, size)

    def latent_channels(self, pipeline: DiffusionPipeline) -> int:
        return self.network(pipeline).config.in_channels

    def resolution_multiple(self, pipeline: DiffusionPipeline) -> int:
        """Image sides must be multiples of this: of the VAE's downsampling, and of 8, as the SD and SDXL
        pipelines refuse other sizes."""
        return math.lcm(pipeline.vae_scale_factor, 8)

    def image_seq_len(self, latent_shape: tuple[int, int, int]) -> int:
        """The image's token count (what a dynamic timestep shift depends on): latent pixels for a UNet."""
        _, h, w = latent_shape
        return h * w

    def to_pipeline_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """What the pipeline's ``latents=`` argument takes for these ``(B, C, h, w)`` latents."""
        return latents

    def from_pipeline_latents(self, latents: torch.Tensor, latent_shape: tuple[int, int, int]) -> torch.Tensor:
        """The inverse of :meth:`to_pipeline_latents`."""
        return latents

    def draw_noise(self, shape, generator=None, device=None, dtype=None) -> torch.Tensor:
        """Standard normal ``(B, C, h, w)`` latents drawn in the layout the pipeline's scheduler draws them."""
        return randn_tensor(shape, generator=generator, device=device, dtype=dtype)

    def scheduler_sigmas(self, num_steps: int) -> np.ndarray | None:
        """The ``sigmas`` the pipeline passes to its scheduler's ``set_timesteps`` (None: it passes none)."""
        return None

    # -- weights ---------------------------------------------------------------------------------
    def network(self, pipeline: DiffusionPipeline) -> nn.Module:
        return getattr(pipeline, self.component)

    def save_lora_weights(self, pipeline: DiffusionPipeline, folder, state: dict) -> None:
        """Write diffusers LoRA weights that ``pipeline.load_lora_weights(folder)`` loads."""
        type(pipeline).save_lora_weights(folder, **{f"{self.component}_lora_layers": state}, safe_serialization=True)

    def has_embedding_slots(self) -> bool:
        """Whether the network has a UNet's class-label and timestep-condition slots, which the per-step
        fake score and the guidance-scale embedding use."""
        return False


class UNetBackbone(Backbone):
    """SD 1.x / 2.x (text embeddings) and SDXL (two encoders' embeddings, pooled embeddings, time ids)."""

    def __init__(self, network: nn.Module) -> None:
        self.added_conditioning = network.config.addition_embed_type == "text_time"

    def __call__(self, network, x_t, t, condition, guidance=None, timestep_cond=None, class_labels=None):
        if guidance is not None:
            raise BackboneError("a UNet has no guidance-scale input of its own")
        added = ({"text_embeds": condition["text_embeds"], "time_ids": condition["time_ids"]}
                 if self.added_conditioning else None)
        return network(x_t, t, condition["prompt_embeds"], timestep_cond=timestep_cond, class_labels=class_labels,
                       added_cond_kwargs=added).sample

    def feature_channels(self, network):
        return network.config.block_out_channels[-1]

    def pooled(self, condition):
        return condition["text_embeds"] if self.added_conditioning else super().pooled(condition)

    def has_embedding_slots(self) -> bool:
        return True

    @torch.no_grad()
    def encode(self, pipeline, prompts, resolution):
        device = pipeline.unet.device
        if not self.added_conditioning:
            embeddings, _ = pipeline.encode_prompt(prompts, device=device, num_images_per_prompt=1,
                                                   do_classifier_free_guidance=False)
            return {"prompt_embeds": embeddings}
        embeddings, _, pooled, _ = pipeline.encode_prompt(prompts, device=device, num_images_per_prompt=1,
                                                          do_classifier_free_guidance=False)
        return {"prompt_embeds": embeddings, "text_embeds": pooled,
                "time_ids": self.time_ids(pipeline, resolution).to(device).expand(len(prompts), -1)}

    @torch.no_grad()
    def encode_unconditional(self, pipeline, resolution):
        condition = self.encode(pipeline, [""], resolution)
        if self.added_conditioning and pipeline.config.get("force_zeros_for_empty_prompt", False):
            # SDXL's pipelines use zero embeddings, not the empty prompt's, when no negative prompt is given
            condition["prompt_embeds"] = torch.zeros_like(condition["prompt_embeds"])
            condition["text_embeds"] = torch.zeros_like(condition["text_embeds"])
        return condition

    @staticmethod
    def time_ids(pipeline, resolution: int) -> torch.Tensor:
        """SDXL's micro-conditioning as its pipeline makes it for a square image: original size, crop
        (0, 0), target size."""
        size = (resolution, resolution)
        projection_dim = pipeline.text_encoder_2.config.projection_dim
        return pipeline._get_add_time_ids(size, (0, 0), size, dtype=torch.float32,
                                          text_encoder_projection_dim=projection_dim)

    def pipeline_inputs(self, condition, unconditional):
        inputs = super().pipeline_inputs(condition, unconditional)
        if self.added_conditioning:
            inputs.update(pooled_prompt_embeds=condition["text_embeds"],
                          negative_pooled_prompt_embeds=unconditional["text_embeds"])
        return inputs


class TransformerBackbone(Backbone):
    """What the patch-based transformers share: LoRA targets, a middle double-stream block's image
    tokens as the feature map, sizes in whole patches."""

    component = "transformer"
    lora_target_modules = TRANSFORMER_LORA_TARGETS
    patch_size = 2

    def __init__(self, network):
        self.feature_layer = f"transformer_blocks.{len(network.transformer_blocks) // 2}"

    def feature_map(self, output, x_t):
        tokens = output[1]  # a block returns (text tokens, image tokens)
        h, w = x_t.shape[-2] // self.patch_size, x_t.shape[-1] // self.patch_size
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w)

    def feature_channels(self, network):
        return network.inner_dim

    def discriminator_layers(self, network):
        depth = len(network.transformer_blocks)
        return tuple(f"transformer_blocks.{i}" for i in sorted({depth // 4, depth // 2, (3 * depth) // 4}))

    def pooled(self, condition):
        return condition["pooled_prompt_embeds"]

    def resolution_multiple(self, pipeline):
        return pipeline.vae_scale_factor * self.patch_size

    def image_seq_len(self, latent_shape):
        _, h, w = latent_shape
        return (h // self.patch_size) * (w // self.patch_size)


class SD3Backbone(TransformerBackbone):
    """SD3 / SD3.5: an MMDiT on joint (CLIP ⊕ T5) and pooled CLIP embeddings, timestep input 1000σ.
    Without its T5 encoder (``text_encoder_3=None``) the pipeline fills T5's part with zeros, and so do we."""

    def __init__(self, network):
        super().__init__(network)
        self.patch_size = network.config.patch_size

    def __call__(self, network, x_t, t, condition, guidance=None, timestep_cond=None, class_labels=None):
        if guidance is not None or timestep_cond is not None or class_labels is not None:
            raise BackboneError("SD3's transformer has no guidance, guidance-embedding or class input")
        return network(hidden_states=x_t, timestep=t, encoder_hidden_states=condition["prompt_embeds"],
                       pooled_projections=condition["pooled_prompt_embeds"], return_dict=False)[0]

    @torch.no_grad()
    def encode(self, pipeline, prompts, resolution):
        embeddings, _, pooled, _ = pipeline.encode_prompt(
            prompts, prompt_2=None, prompt_3=None, device=pipeline.transformer.device, num_images_per_prompt=1,
            do_classifier_free_guidance=False)
        return {"prompt_embeds": embeddings, "pooled_prompt_embeds": pooled}

    def pipeline_inputs(self, condition, unconditional):
        return {**super().pipeline_inputs(condition, unconditional),
                "pooled_prompt_embeds": condition["pooled_prompt_embeds"],
                "negative_pooled_prompt_embeds": unconditional["pooled_prompt_embeds"]}


class FluxBackbone(TransformerBackbone):
    """Flux: a double/single-stream transformer on 2×2-packed latents with positional ids, T5 embeddings
    and pooled CLIP, the timestep input σ (it scales by 1000 itself), and FLUX.1-dev's guidance input."""

    def takes_guidance(self, network):
        return bool(network.config.guidance_embeds)

    def guidance_is_possible(self, network):
        return self.takes_guidance(network)  # FLUX.1-schnell: timestep-distilled, no guidance input, no CFG

    def pipeline_runs_cfg(self, network):
        return False  # FluxPipeline's guidance_scale feeds the guidance input; CFG needs true_cfg_scale

    def __call__(self, network, x_t, t, condition, guidance=None, timestep_cond=None, class_labels=None):
        if timestep_cond is not None or class_labels is not None:
            raise BackboneError("Flux's transformer has no guidance-embedding or class input")
        if (guidance is not None) != self.takes_guidance(network):
            raise BackboneError("FLUX.1-dev-style transformers need their guidance input, and only they take one")
        batch, _, h, w = x_t.shape
        text = condition["prompt_embeds"]
        packed = network(
            hidden_states=self.to_pipeline_latents(x_t), timestep=t.to(x_t.dtype) / 1000, guidance=guidance,
            pooled_projections=condition["pooled_prompt_embeds"], encoder_hidden_states=text,
            txt_ids=torch.zeros(text.shape[1], 3, device=x_t.device, dtype=text.dtype),
            img_ids=self.image_ids(h, w, x_t.device, x_t.dtype), return_dict=False,
        )[0]
        return self.from_pipeline_latents(packed, (x_t.shape[1], h, w))

    @staticmethod
    def image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
        """Positional ids ``(h/2 · w/2, 3)`` of the packed tokens: (0, row, column), as Flux's pipeline makes them."""
        ids = torch.zeros(h // 2, w // 2, 3)
        ids[..., 1] += torch.arange(h // 2)[:, None]
        ids[..., 2] += torch.arange(w // 2)[None, :]
        return ids.reshape(-1, 3).to(device=device, dtype=dtype)

    def default_resolution(self, pipeline):
        return pipeline.default_sample_size * pipeline.vae_scale_factor

    def latent_channels(self, pipeline):
        return pipeline.transformer.config.in_channels // 4

    def to_pipeline_latents(self, latents):
        """(B, C, h, w) → (B, h/2 · w/2, 4C): each 2×2 patch becomes one token."""
        b, c, h, w = latents.shape
        return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)

    def from_pipeline_latents(self, latents, latent_shape):
        c, h, w = latent_shape
        b = latents.shape[0]
        return latents.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)

    def scheduler_sigmas(self, num_steps):
        return np.linspace(1.0, 1 / num_steps, num_steps)

    def draw_noise(self, shape, generator=None, device=None, dtype=None):
        """Drawn packed, as Flux's scheduler steps see the latents, then unpacked."""
        b, c, h, w = shape
        packed = randn_tensor((b, (h // 2) * (w // 2), c * 4), generator=generator, device=device, dtype=dtype)
        return self.from_pipeline_latents(packed, (c, h, w))

    @torch.no_grad()
    def encode(self, pipeline, prompts, resolution):
        embeddings, pooled, _ = pipeline.encode_prompt(
            prompts, prompt_2=None, device=pipeline.transformer.device, num_images_per_prompt=1,
            max_sequence_length=FLUX_MAX_SEQUENCE_LENGTH)
        return {"prompt_embeds": embeddings, "pooled_prompt_embeds": pooled}

    def pipeline_inputs(self, condition, unconditional):
        return {"prompt_embeds": condition["prompt_embeds"], "pooled_prompt_embeds": condition["pooled_prompt_embeds"]}


def backbone_for(pipeline: DiffusionPipeline) -> Backbone:
    """The adapter of a text-to-image pipeline's network, or a one-line refusal that says what is supported."""
    name = type(pipeline).__name__
    network = getattr(pipeline, "unet", None) or getattr(pipeline, "transformer", None)
    if isinstance(pipeline, StableDiffusionXLPipeline) or (
            isinstance(network, UNet2DConditionModel) and getattr(pipeline, "text_encoder_2", None) is not None):
        if getattr(pipeline, "text_encoder", None) is None:
            raise BackboneError(f"{name} has no first text encoder: an SDXL refiner is image-conditioned; "
                                "distil the SDXL base model (stabilityai/stable-diffusion-xl-base-1.0)")
        if not isinstance(pipeline, StableDiffusionXLPipeline):
            raise BackboneError(f"{name} is not a text-to-image pipeline; load the base model with StableDiffusionXLPipeline")
        return UNetBackbone(network)
    if isinstance(network, UNet2DConditionModel) and hasattr(pipeline, "encode_prompt"):
        if network.config.addition_embed_type is not None or network.config.encoder_hid_dim_type is not None:
            raise BackboneError(f"{name}'s UNet needs added conditioning ({network.config.addition_embed_type}) that "
                                "only SDXL's pipeline provides; supported: SD 1.x/2.x, SDXL base, SD3, Flux")
        if network.config.in_channels != pipeline.vae.config.latent_channels:
            raise BackboneError(f"{name}'s UNet takes {network.config.in_channels} input channels, not the VAE's "
                                f"{pipeline.vae.config.latent_channels}: image-conditioned (inpainting, depth) models "
                                "are not supported; use a text-to-image model")
        return UNetBackbone(network)
    if isinstance(pipeline, StableDiffusion3Pipeline) and isinstance(network, SD3Transformer2DModel):
        return SD3Backbone(network)
    if isinstance(pipeline, FluxPipeline) and isinstance(network, FluxTransformer2DModel):
        return FluxBackbone(network)
    raise BackboneError(f"{name} is not a pipeline stepdistill can distil; supported: StableDiffusionPipeline "
                        "(SD 1.x/2.x), StableDiffusionXLPipeline (SDXL base), StableDiffusion3Pipeline, FluxPipeline")



def adapter_for(network: nn.Module) -> Backbone:
    """The adapter of a bare network (a student or fake-score copy): chosen by the network's class."""
    if isinstance(network, UNet2DConditionModel):
        return UNetBackbone(network)
    if isinstance(network, SD3Transformer2DModel):
        return SD3Backbone(network)
    if isinstance(network, FluxTransformer2DModel):
        return FluxBackbone(network)
    raise BackboneError(f"no backbone adapter for a {type(network).__name__}; supported: UNet2DConditionModel, "
                        "SD3Transformer2DModel, FluxTransformer2DModel")
