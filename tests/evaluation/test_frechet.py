import math

import pytest
import torch
from scipy import linalg

from stepdistill.evaluation.frechet import frechet_distance


def _with_exact_moments(samples: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """``samples`` moved so that their sample mean and (N−1) covariance are exactly ``mean`` and ``cov``."""
    centred = samples.double() - samples.double().mean(0)
    whitener = torch.linalg.cholesky(torch.cov(centred.T))
    white = torch.linalg.solve_triangular(whitener, centred.T, upper=False).T
    return white @ torch.linalg.cholesky(cov).T + mean


def _closed_form(mean_a, cov_a, mean_b, cov_b) -> float:
    root = linalg.sqrtm(cov_a.numpy() @ cov_b.numpy()).real
    return float((mean_a - mean_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * root.trace())


def test_identical_sets_have_zero_distance():
    features = torch.randn(500, 16, generator=torch.Generator().manual_seed(0))
    assert abs(frechet_distance(features, features)) < 1e-6
    assert abs(frechet_distance(features, features.flip(0))) < 1e-6


def test_sampled_diagonal_gaussians_match_the_closed_form():
    """FD of N(μ₁, diag s₁) and N(μ₂, diag s₂) is ‖μ₁ − μ₂‖² + Σ (√s₁ − √s₂)² (= 7 here)."""
    generator = torch.Generator().manual_seed(0)
    n = 20_000
    mean_a, var_a = torch.tensor([0.0, 0.0]), torch.tensor([1.0, 4.0])
    mean_b, var_b = torch.tensor([1.0, 2.0]), torch.tensor([4.0, 1.0])
    a = mean_a + var_a.sqrt() * torch.randn(n, 2, generator=generator)
    b = mean_b + var_b.sqrt() * torch.randn(n, 2, generator=generator)
    expected = float((mean_a - mean_b).square().sum() + (var_a.sqrt() - var_b.sqrt()).square().sum())
    assert expected == 7.0
    assert frechet_distance(a, b) == pytest.approx(expected, rel=0.05)


def test_exact_moments_match_the_closed_form_for_correlated_covariances():
    """Non-commuting full covariances, features built to have exactly the given moments."""
    generator = torch.Generator().manual_seed(1)
    mean_a, mean_b = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64), torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64)
    root_a, root_b = torch.randn(3, 3, generator=generator).double(), torch.randn(3, 3, generator=generator).double()
    cov_a, cov_b = root_a @ root_a.T + 0.1 * torch.eye(3), root_b @ root_b.T + 0.1 * torch.eye(3)
    a = _with_exact_moments(torch.randn(300, 3, generator=generator), mean_a, cov_a)
    b = _with_exact_moments(torch.randn(200, 3, generator=generator), mean_b, cov_b)
    torch.testing.assert_close(torch.cov(a.T), cov_a)
    expected = _closed_form(mean_a, cov_a, mean_b, cov_b)
    assert expected > 1
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-8)
    assert frechet_distance(a.float(), b.float()) == pytest.approx(expected, rel=1e-4)


def test_pure_shift_is_squared_mean_distance():
    features = torch.randn(100, 8, generator=torch.Generator().manual_seed(2))
    shift = torch.arange(8.0) / 4
    assert frechet_distance(features, features + shift) == pytest.approx(float(shift.square().sum()), abs=1e-6)


def test_symmetric_nonnegative_and_scales_quadratically():
    generator = torch.Generator().manual_seed(3)
    a = torch.randn(400, 5, generator=generator)
    b = 1.5 * torch.randn(300, 5, generator=generator) + 0.3
    forward, backward = frechet_distance(a, b), frechet_distance(b, a)
    assert forward > 0 and math.isfinite(forward)
    assert forward == pytest.approx(backward, rel=1e-9)
    assert frechet_distance(3 * a, 3 * b) == pytest.approx(9 * forward, rel=1e-6)


def test_rank_deficient_features_give_finite_distance():
    """More dimensions than samples: singular covariances, round-off must not make the result NaN."""
    generator = torch.Generator().manual_seed(4)
    a, b = torch.randn(10, 64, generator=generator), torch.randn(12, 64, generator=generator)
    assert math.isfinite(frechet_distance(a, b)) and frechet_distance(a, b) >= 0


@pytest.mark.parametrize(
    "shape_a, shape_b",
    [((10, 3), (10, 4)), ((10,), (10,)), ((10, 3), (2, 5, 3)), ((4, 2, 2), (4, 2, 2))],
)
def test_mismatched_or_non_2d_features_raise(shape_a, shape_b):
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        frechet_distance(torch.randn(shape_a), torch.randn(shape_b))


@pytest.mark.parametrize("n_a, n_b", [(1, 10), (10, 1), (0, 10)])
def test_fewer_than_two_samples_raise(n_a, n_b):
    with pytest.raises(ValueError, match="at least 2 samples"):
        frechet_distance(torch.randn(n_a, 3), torch.randn(n_b, 3))
