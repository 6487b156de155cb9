"""The denoiser contract: ``x0, eps = denoiser(x_t, t, text)`` whatever the network predicts.

Every method talks to teacher, student and fake score through :class:`Denoiser`, which wraps a
diffusers ``UNet2DConditionModel`` and the teacher's :class:`~stepdistill.diffusion.NoiseProcess`.
With LoRA, several denoisers share one UNet and differ only in the adapter they switch on
(``adapter=None`` means the frozen base, i.e. the teacher).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from stepdistill.diffusion import NoiseProcess, classifier_free_guidance
from stepdistill.models.guidance_embedding import guidance_scale_embedding


def select_adapter(unet: nn.Module, adapter: str | None) -> None:
    """Switch a peft UNet to ``adapter`` alone (``None``: the base weights, adapters off).

    peft's switches also flip ``requires_grad`` (on for the active adapter, off for the rest).
    Autograd reads that flag at backward time, after other denoisers have switched again, so we set
    every LoRA weight back to trainable: which weights an update changes is the optimiser's business.
    """
    if not getattr(unet, "_hf_peft_config_loaded", False):
        return
    if adapter is None:
        unet.disable_adapters()
    else:
        unet.enable_adapters()
        unet.set_adapter(adapter)
    for name, param in unet.named_parameters():
        if ".lora_" in name:
            param.requires_grad_(True)


@dataclass
class Prediction:
    """A denoiser's output: clean sample and noise estimates."""

    x0: torch.Tensor
    eps: torch.Tensor


class _FeaturesReady(Exception):
    """Raised by the mid-block hook to stop a forward pass whose remaining layers are not needed."""


class Denoiser(nn.Module):
    """Wrap a UNet so it returns (x̂0, ε̂); optionally with classifier-free guidance, or with the
    guidance scale as an input for UNets built to take one (:mod:`~stepdistill.models.guidance_embedding`)."""

    def __init__(self, unet: nn.Module, process: NoiseProcess, adapter: str | None = None) -> None:
        super().__init__()
        self.unet = unet
        self.process = process
        self.adapter = adapter

    @property
    def takes_guidance_scale(self) -> bool:
        """Whether the UNet has a guidance-scale input (then every call needs ``embedded_guidance``)."""
        return self.unet.config.time_cond_proj_dim is not None

    def forward(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        text: torch.Tensor,
        uncond: torch.Tensor | None = None,
        guidance_scale: float = 1.0,
        embedded_guidance: torch.Tensor | None = None,
        step: torch.Tensor | None = None,
    ) -> Prediction:
        """Denoise ``x_t`` at integer timesteps ``t`` (shape ``(B,)``) given text embeddings ``(B, L, D)``.

        With ``guidance_scale != 1`` the unconditional embeddings ``uncond`` are required and the
        network runs once on the doubled batch; CFG is applied to the raw prediction (equivalent
        to applying it to x̂0 or ε̂, which are affine in it at fixed x_t). A UNet with a
        guidance-scale input needs ``embedded_guidance``, the per-sample scales ``(B,)``, instead. A UNet
        with a step embedding (a per-step fake score) needs ``step``, the generation step of each sample
        ``(B,)``; it enters through diffusers' class-label input.
        """
        if t.shape != (x_t.shape[0],):
            raise ValueError(f"t must have shape ({x_t.shape[0]},) (got {tuple(t.shape)})")
        guided = guidance_scale != 1.0
        if guided and uncond is None:
            raise ValueError("classifier-free guidance needs unconditional embeddings")
        embedding_dim = self.unet.config.time_cond_proj_dim
        if (embedded_guidance is None) != (embedding_dim is None):
            raise ValueError("a UNet with a guidance-scale input needs embedded_guidance, and only such a UNet takes it")
        condition = None if embedding_dim is None else guidance_scale_embedding(embedded_guidance, embedding_dim)
        select_adapter(self.unet, self.adapter)
        if guided:
            if condition is not None:
                condition = torch.cat([condition, condition])
            if step is not None:
                step = torch.cat([step, step])
            both = self.unet(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([text, uncond]),
                             timestep_cond=condition, class_labels=step).sample
            conditional, unconditional = both.chunk(2)
            prediction = classifier_free_guidance(conditional, unconditional, guidance_scale)
        else:
            prediction = self.unet(x_t, t, text, timestep_cond=condition, class_labels=step).sample
        x0, eps = self.process.to_x0_eps(prediction.float(), x_t.float(), t)
        return Prediction(x0=x0, eps=eps)

    def features(
        self, x_t: torch.Tensor, t: torch.Tensor, text: torch.Tensor, step: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Mid-block features alone: the forward pass stops there (the up path is never run)."""
        captured: list[torch.Tensor] = []

        def stop(module, inputs, output):
            captured.append(output)
            raise _FeaturesReady

        hook = self.unet.mid_block.register_forward_hook(stop)
        try:
            select_adapter(self.unet, self.adapter)
            self.unet(x_t, t, text, class_labels=step)
        except _FeaturesReady:
            return captured[0]
        finally:
            hook.remove()
        raise RuntimeError("the UNet's mid block never ran")

