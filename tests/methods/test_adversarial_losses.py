"""The adversarial parts: both losses' signs and values on hand-set logits, R1 against a hand-computed gradient,
the approximate R1's limit, and conditioned discriminator heads that see the prompt and the noise level."""

from __future__ import annotations

import math

import pytest
import torch

from stepdistill.methods.adversarial_losses import approximate_r1_penalty, critic_loss, generator_loss, r1_penalty
from stepdistill.models.discriminator import Discriminator


@pytest.mark.parametrize("kind", ["non_saturating", "hinge"])
def test_the_losses_push_the_right_way(kind):
    real, fake = torch.zeros(4, requires_grad=True), torch.zeros(4, requires_grad=True)
    critic_loss(real, fake, kind).backward()
    assert (real.grad < 0).all() and (fake.grad > 0).all()  # the critic pushes real logits up, fake ones down
    fake_for_generator = torch.zeros(4, requires_grad=True)
    generator_loss(fake_for_generator, kind).backward()
    assert (fake_for_generator.grad < 0).all()  # the generator pushes its logits up
    confident, fooled = critic_loss(torch.full((4,), 5.0), torch.full((4,), -5.0), kind), critic_loss(
        torch.full((4,), -5.0), torch.full((4,), 5.0), kind)
    assert confident < fooled


def test_the_losses_values_on_hand_set_logits():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-3.0, 0.0, 0.5])
    # hinge: mean relu(1 − real) = (0 + 0.5 + 2) / 3, mean relu(1 + fake) = (0 + 1 + 1.5) / 3
    assert math.isclose(critic_loss(real, fake, "hinge").item(), 2.5 / 3 + 2.5 / 3, rel_tol=1e-6)
    assert math.isclose(generator_loss(fake, "hinge").item(), 2.5 / 3, rel_tol=1e-6)
    # non-saturating at chance: 2 log 2 and log 2
    assert math.isclose(critic_loss(torch.zeros(4), torch.zeros(4)).item(), 2 * math.log(2), rel_tol=1e-6)
    assert math.isclose(generator_loss(torch.zeros(4)).item(), math.log(2), rel_tol=1e-6)
    with pytest.raises(ValueError, match="kind is one of"):
        critic_loss(real, fake, "wasserstein")


def quadratic_discriminator(seed: int = 0):
    """D(x) = ½ xᵀAx + bᵀx per sample: ∇D = Ax + b, known in closed form."""
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(3, 3, generator=generator)
    a = (a + a.T) / 2
    b = torch.randn(3, generator=generator)
    return (lambda x: 0.5 * torch.einsum("bi,ij,bj->b", x, a, x) + x @ b), a, b


def test_r1_is_the_mean_squared_gradient_norm_and_trains_the_discriminator():
    discriminate, a, b = quadratic_discriminator()
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(1))
    expected = (x @ a + b).square().sum(1).mean()
    torch.testing.assert_close(r1_penalty(discriminate, x), expected)
    weight = torch.tensor(2.0, requires_grad=True)  # a weight of D: D_w(x) = w · D(x), R1 = w² · R1
    r1_penalty(lambda y: weight * discriminate(y), x).backward()
    torch.testing.assert_close(weight.grad, 2 * 2.0 * expected)


def test_the_approximate_r1_tends_to_sigma_squared_r1():
    discriminate, _, _ = quadratic_discriminator()
    x = torch.randn(20_000, 3, generator=torch.Generator().manual_seed(2))
    exact = r1_penalty(discriminate, x).item()
    torch.manual_seed(0)
    ratios = [approximate_r1_penalty(discriminate, x, sigma).item() / sigma**2 for sigma in (0.3, 0.03, 0.003)]
    assert abs(ratios[-1] / exact - 1) < 0.03
    assert abs(ratios[-1] / exact - 1) < abs(ratios[0] / exact - 1)


def test_a_patch_discriminators_penalties_are_those_of_its_mean_logit_at_both_precisions():
    (first, a1, b1), (second, a2, b2) = quadratic_discriminator(0), quadratic_discriminator(1)

    def patches(x: torch.Tensor) -> torch.Tensor:
        return torch.stack([first(x), second(x)], dim=1)  # (B, 2): a logit per location

    x = torch.randn(20_000, 3, generator=torch.Generator().manual_seed(2))
    expected = (x @ (a1 + a2) / 2 + (b1 + b2) / 2).square().sum(1).mean()  # ∇ of the mean logit, in closed form
    torch.testing.assert_close(r1_penalty(patches, x), expected)
    torch.manual_seed(0)
    assert abs(approximate_r1_penalty(patches, x, 0.003).item() / 0.003**2 / expected.item() - 1) < 0.03


def test_conditioned_heads_see_the_prompt_and_the_noise_level():
    torch.manual_seed(0)
    discriminator = Discriminator({"a": 8, "b": 16}, condition_dim=6, hidden=16)
    features = {"a": torch.randn(2, 8, 4, 4), "b": torch.randn(2, 16, 2, 2)}
    pooled, t = torch.randn(2, 6), torch.tensor([100.0, 800.0])
    logits = discriminator(features, pooled, t)
    assert logits.shape == (2,)
    assert not torch.allclose(logits, discriminator(features, pooled.flip(0), t))  # another prompt, another logit
    assert not torch.allclose(logits, discriminator(features, pooled, t.flip(0)))  # another noise level, too
    with pytest.raises(ValueError, match="needs the pooled prompt embedding"):
        discriminator(features)
    logits.sum().backward()
    assert all(p.grad is not None for p in discriminator.parameters())  # every head and projection is trained


def test_per_location_heads_give_a_logit_per_location_that_averages_to_the_pooled_one():
    torch.manual_seed(0)
    pooled_heads = Discriminator({"a": 8, "b": 16}, condition_dim=6, hidden=16)
    patch_heads = Discriminator({"a": 8, "b": 16}, condition_dim=6, hidden=16, per_location=True)
    patch_heads.load_state_dict(pooled_heads.state_dict())  # the same weights: only the pool differs
    features = {"a": torch.randn(2, 8, 6, 6), "b": torch.randn(2, 16, 2, 2)}
    pooled, t = torch.randn(2, 6), torch.tensor([100.0, 800.0])
    logits = patch_heads(features, pooled, t)
    assert logits.shape == (2, 36 + 4)
    # every head is affine in its hidden map: its locations' mean is the pooled head's logit
    per_head = (logits[:, :36].mean(1) + logits[:, 36:].mean(1)) / 2
    torch.testing.assert_close(per_head, pooled_heads(features, pooled, t))
    moved = {**features, "a": features["a"].clone()}
    moved["a"][:, :, 0, 0] += 1  # a corner of map a: its head's logits change, the other head's do not
    changed = (patch_heads(moved, pooled, t) != logits).any(0)
    assert changed[:36].all() and not changed[36:].any()  # (GroupNorm spreads the change over the whole map)
