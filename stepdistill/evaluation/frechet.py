"""The Fréchet distance between two feature sets (the formula of FID, Heusel et al. 2017).

    FD = ‖μ_a − μ_b‖² + tr(Σ_a) + tr(Σ_b) − 2 tr((Σ_a Σ_b)^{1/2})

computed in float64. tr((Σ_a Σ_b)^{1/2}) is the sum of the square roots of the eigenvalues of
Σ_a Σ_b, which are real and non-negative for covariance matrices (tiny negative round-off is
clipped to zero). The estimate is biased upwards for small sets: compare only equal sample sizes.
"""

from __future__ import annotations

import torch


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """FD between the Gaussians fitted to ``(N, D)`` and ``(M, D)`` feature sets."""
    if features_a.ndim != 2 or features_b.ndim != 2 or features_a.shape[1] != features_b.shape[1]:
        raise ValueError(f"need (N, D) and (M, D) features, got {tuple(features_a.shape)} and {tuple(features_b.shape)}")
    if min(len(features_a), len(features_b)) < 2:
        raise ValueError("the Fréchet distance needs at least 2 samples in each set")
    a, b = features_a.double(), features_b.double()
    mean_a, mean_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    eigenvalues = torch.linalg.eigvals(cov_a @ cov_b).real.clamp(min=0)
    distance = (mean_a - mean_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * eigenvalues.sqrt().sum()
    return float(distance.clamp(min=0))
