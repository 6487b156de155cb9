"""The adversarial losses every method with a discriminator uses, and the discriminators' gradient penalties.

Logits d = D(x) of real and generated inputs:

* non-saturating (Goodfellow et al. 2014; DMD2's GAN term): critic softplus(−d_real) + softplus(d_fake),
  generator softplus(−d_fake);
* hinge (Lim & Ye 2017; ADD, LADD): critic relu(1 − d_real) + relu(1 + d_fake), generator −d_fake.

R1 (Mescheder et al., "Which Training Methods for GANs do actually Converge?", 2018) penalises the
critic's gradient on real inputs, E‖∇ₓD(x)‖², by a double backward. The approximate R1 of recent work
(e.g. SANA-Sprint's) needs no double backward, and so works where that is unavailable (sharded or
fused kernels): E(D(x + σε) − D(x))² with ε ~ N(0, I), which for small σ is σ² E(∇ₓD·ε)² = σ² E‖∇ₓD(x)‖²,
R1 times σ². A discriminator with a logit per location (a patch discriminator) gives logits
``(B, L)``: the losses average over all of them, and both penalties take D(x) as each image's mean
logit, so they stay one penalty at two precisions.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from stepdistill import draws

GAN_LOSSES = ("non_saturating", "hinge")


def critic_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor, kind: str = "non_saturating") -> torch.Tensor:
    """The discriminator's loss on real and generated logits (``kind``: non_saturating or hinge)."""
    if kind == "hinge":
        return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()
    if kind == "non_saturating":
        return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()
    raise ValueError(f"kind is one of {GAN_LOSSES} (got {kind!r})")


def generator_loss(fake_logits: torch.Tensor, kind: str = "non_saturating") -> torch.Tensor:
    """The generator's loss: the discriminator should call its samples real."""
    if kind == "hinge":
        return -fake_logits.mean()
    if kind == "non_saturating":
        return F.softplus(-fake_logits).mean()
    raise ValueError(f"kind is one of {GAN_LOSSES} (got {kind!r})")


def per_image(logits: torch.Tensor) -> torch.Tensor:
    """One logit per image: a patch discriminator's ``(B, L)`` averaged over its locations; ``(B,)`` as it is."""
    return logits.reshape(len(logits), -1).mean(1)


def r1_penalty(discriminate: Callable[[torch.Tensor], torch.Tensor], real: torch.Tensor) -> torch.Tensor:
    """E‖∇ₓD(x)‖² over the batch, exact (a double backward: the penalty's gradient reaches D's weights).
    Attention runs in its plain ("math") kernel here: the fused ones have no double backward."""
    real = real.detach().requires_grad_(True)
    with sdpa_kernel(SDPBackend.MATH):
        (gradient,) = torch.autograd.grad(per_image(discriminate(real)).sum(), real, create_graph=True)
    return gradient.square().flatten(1).sum(1).mean()


def approximate_r1_penalty(discriminate: Callable[[torch.Tensor], torch.Tensor], real: torch.Tensor,
                           sigma: float = 0.01) -> torch.Tensor:
    """E(D(x + σε) − D(x))², about σ² times :func:`r1_penalty` for small σ; one extra forward, no double backward."""
    real = real.detach()
    perturbed = per_image(discriminate(real + sigma * draws.randn_like(real)))
    return (perturbed - per_image(discriminate(real))).square().mean()
