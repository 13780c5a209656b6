"""Synthetic ground truth for SAEs (Sharkey et al. 2022): activations built from a known sparse
dictionary, and the score of how well a learned decoder recovers it (mean max cosine similarity)."""

from __future__ import annotations

import torch


def planted_dictionary(n_rows: int = 20000, d: int = 32, n_features: int = 64, mean_active: float = 4.0,
                       seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows z = c G of a random unit-norm dictionary G (n_features, d) with sparse coefficients c:
    each feature is on independently with probability mean_active / n_features, with magnitude
    Uniform(0, 1). Returns (rows (n_rows, d), G)."""
    g = torch.Generator().manual_seed(seed)
    dictionary = torch.randn(n_features, d, generator=g)
    dictionary = dictionary / dictionary.norm(dim=1, keepdim=True)
    on = torch.rand(n_rows, n_features, generator=g) < mean_active / n_features
    coef = torch.rand(n_rows, n_features, generator=g) * on  # (rows, n_features)
    return coef @ dictionary, dictionary


def mean_max_cosine(truth: torch.Tensor, learned: torch.Tensor) -> float:
    """For each true direction (n, d), the best cosine with any learned direction (m, d); mean."""
    truth, learned = truth.detach().float(), learned.detach().float()
    t = truth / truth.norm(dim=1, keepdim=True)
    w = learned / learned.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return float((t @ w.T).max(dim=1).values.mean())
