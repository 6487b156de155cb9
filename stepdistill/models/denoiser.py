"""The denoiser contract: ``x0, eps = denoiser(x_t, t, condition)`` whatever the network is and predicts.

Every method talks to teacher, student and fake score through :class:`Denoiser`, which wraps a
diffusers network (UNet, SD3 or Flux transformer, through its :mod:`~stepdistill.models.backbones`
adapter) and the teacher's :class:`~stepdistill.diffusion.NoiseProcess`. With LoRA, several denoisers
share one network and differ only in the adapter they switch on (``adapter=None`` means the frozen
base, i.e. the teacher).
"""

from __future__ import annotations

import torch
from torch import nn

from stepdistill import conditioning
from stepdistill.conditioning import Condition
from stepdistill.diffusion import NoiseProcess, Prediction, classifier_free_guidance, guidance_scale_embedding
from stepdistill.models.backbones import adapter_for


def select_adapter(network: nn.Module, adapter: str | None) -> None:
    """Switch a peft network to ``adapter`` alone (``None``: the base weights, adapters off).

    peft's switches also flip ``requires_grad`` (on for the active adapter, off for the rest).
    Autograd reads that flag at backward time, after other denoisers have switched again, so every
    LoRA weight keeps the flag it had: which weights take gradient is the trainer's business (it
    freezes the other role's weights for each update).
    """
    if not getattr(network, "_hf_peft_config_loaded", False):
        return
    lora = [(param, param.requires_grad) for name, param in network.named_parameters() if ".lora_" in name]
    if adapter is None:
        network.disable_adapters()
    else:
        network.enable_adapters()
        network.set_adapter(adapter)
    for param, trainable in lora:
        param.requires_grad_(trainable)


class Denoiser(nn.Module):
    """Wrap a network so it returns (x̂0, ε̂) at (x_t, t, condition), whatever its backbone and prediction
    type; optionally with classifier-free guidance, with a guidance-scale input for UNets built to take
    one (:mod:`~stepdistill.models.guidance_embedding`), or through the network's own guidance input
    (FLUX.1-dev), which then replaces CFG."""

    def __init__(self, network: nn.Module, process: NoiseProcess, adapter: str | None = None) -> None:
        super().__init__()
        self.network = network
        self.process = process
        self.adapter = adapter
        self.backbone = adapter_for(network)

    @property
    def takes_guidance_input(self) -> bool:
        """Whether the network has a guidance input of its own (FLUX.1-dev), which replaces CFG."""
        return self.backbone.takes_guidance(self.network)

    @property
    def takes_guidance_scale(self) -> bool:
        """Whether the UNet has a guidance-scale embedding (then every call needs ``embedded_guidance``)."""
        return getattr(self.network.config, "time_cond_proj_dim", None) is not None

    def forward(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        condition: Condition,
        unconditional: Condition | None = None,
        guidance_scale: float | torch.Tensor = 1.0,
        embedded_guidance: torch.Tensor | None = None,
        step: torch.Tensor | None = None,
    ) -> Prediction:
        """Denoise ``x_t`` at timesteps ``t`` (shape ``(B,)``, the teacher's units) given ``condition``.

        With ``guidance_scale != 1`` the ``unconditional`` condition is required and the network runs
        once on the doubled batch (every condition entry concatenated); CFG is applied to the raw
        prediction (equivalent to applying it to x̂0 or ε̂, which are affine in it at fixed x_t). A
        network with a guidance input of its own (FLUX.1-dev) gets ``guidance_scale`` there instead, in
        one pass (``guidance_scale`` may then be per sample, ``(B,)``). A UNet with a guidance-scale
        embedding needs ``embedded_guidance``, the per-sample scales ``(B,)``. A UNet with a step embedding (a per-step fake score) needs ``step``, the
        generation step of each sample ``(B,)``; it enters through diffusers' class-label input.
        """
        if t.shape != (x_t.shape[0],):
            raise ValueError(f"t must have shape ({x_t.shape[0]},) (got {tuple(t.shape)})")
        guidance = None
        if self.takes_guidance_input:
            guidance = torch.as_tensor(guidance_scale, dtype=torch.float32, device=x_t.device).expand(x_t.shape[0])
            guidance_scale = 1.0
        guided = guidance_scale != 1.0
        if guided and unconditional is None:
            raise ValueError("classifier-free guidance needs the unconditional condition")
        embedding_dim = getattr(self.network.config, "time_cond_proj_dim", None)
        if (embedded_guidance is None) != (embedding_dim is None):
            raise ValueError("a UNet with a guidance-scale input needs embedded_guidance, and only such a UNet takes it")
        embedding = None if embedding_dim is None else guidance_scale_embedding(embedded_guidance, embedding_dim)
        select_adapter(self.network, self.adapter)
        if guided:
            if embedding is not None:
                embedding = torch.cat([embedding, embedding])
            if step is not None:
                step = torch.cat([step, step])
            both = self.backbone(self.network, torch.cat([x_t, x_t]), torch.cat([t, t]),
                                 conditioning.concat(condition, unconditional), timestep_cond=embedding,
                                 class_labels=step)
            conditional, unconditional_prediction = both.chunk(2)
            prediction = classifier_free_guidance(conditional, unconditional_prediction, guidance_scale)
        else:
            prediction = self.backbone(self.network, x_t, t, condition, guidance=guidance, timestep_cond=embedding,
                                       class_labels=step)
        x0, eps = self.process.to_x0_eps(prediction.float(), x_t.float(), t)
        return Prediction(x0=x0, eps=eps)

    def features(
        self, x_t: torch.Tensor, t: torch.Tensor, condition: Condition, step: torch.Tensor | None = None,
        layers: tuple[str, ...] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Feature maps ``(B, C, h, w)`` of ``layers`` by name (default: the backbone's one feature
        layer, a UNet's mid block or a transformer's middle joint block) for discriminator heads; a
        guidance input of the network's own gets 1."""
        select_adapter(self.network, self.adapter)
        guidance = torch.ones(x_t.shape[0], device=x_t.device) if self.takes_guidance_input else None
        return self.backbone.features(self.network, x_t, t, condition, guidance=guidance, class_labels=step,
                                      layers=layers)


def guided(
    denoiser: nn.Module, x_t: torch.Tensor, t: torch.Tensor, condition: Condition, unconditional: Condition,
    scales: torch.Tensor,
) -> Prediction:
    """(x̂0, ε̂) of ``denoiser`` guided at per-sample scales ``scales`` ``(B,)``: CFG of a conditional and
    an unconditional pass combined on x̂0 and ε̂ (both affine in the network output at fixed x_t), or
    one pass through the network's own guidance input where it has one."""
    if getattr(denoiser, "takes_guidance_input", False):
        return denoiser(x_t, t, condition, guidance_scale=scales)
    conditional, unconditional_prediction = denoiser(x_t, t, condition), denoiser(x_t, t, unconditional)
    w = scales.reshape(-1, *([1] * (x_t.ndim - 1)))
    return Prediction(x0=classifier_free_guidance(conditional.x0, unconditional_prediction.x0, w),
                      eps=classifier_free_guidance(conditional.eps, unconditional_prediction.eps, w))
