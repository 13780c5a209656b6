"""Representation similarity: centred kernel alignment (Kornblith et al. 2019), linear and RBF.

CKA compares two sets of representations of the same n inputs, invariant to orthogonal
transforms and isotropic scaling. Many sites of one or two models are compared at once: each
site's centred Gram matrix is built once, and every pair's score is one inner product.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from vlmscope.results import Result, long_frame


@dataclass(frozen=True, repr=False)
class SimilarityResult(Result):
    kind = "cka"
    rows: tuple[str, ...]
    cols: tuple[str, ...]
    values: torch.Tensor  # (row, col)
    kernel: str
    n: int

    def to_dataframe(self):
        return long_frame(self.values, ("row", "col"), {"row": list(self.rows), "col": list(self.cols)}, "cka")


def _centred_gram(x: torch.Tensor, kernel: str, sigma: float) -> torch.Tensor:
    x = x.double().flatten(1)
    if kernel == "linear":
        x = x - x.mean(0)
        k = x @ x.T
    else:
        d2 = torch.cdist(x, x).pow(2)
        med = d2[d2 > 0].median() if (d2 > 0).any() else torch.tensor(1.0, dtype=x.dtype)
        k = torch.exp(-d2 / (2 * sigma**2 * med))
    h = k - k.mean(0, keepdim=True)
    return h - h.mean(1, keepdim=True)


def cka_matrix(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor] | None = None,
               kernel: Literal["linear", "rbf"] = "linear", sigma: float = 1.0) -> SimilarityResult:
    """CKA between every representation in `a` and every one in `b` (default: `a` itself).

    Each value is (n, ...) for the same n inputs in the same order. sigma scales the RBF
    bandwidth relative to the median pairwise distance.
    """
    if kernel not in ("linear", "rbf"):
        raise ValueError(f"unknown kernel {kernel!r}; valid: 'linear', 'rbf'")
    b = a if b is None else b
    ns = {t.shape[0] for t in (*a.values(), *b.values())}
    if len(ns) != 1:
        raise ValueError(f"CKA needs the same inputs on both sides; row counts differ: {sorted(ns)}")
    ga = torch.stack([_centred_gram(t, kernel, sigma) for t in a.values()]).flatten(1)  # (A, n*n)
    gb = ga if b is a else torch.stack([_centred_gram(t, kernel, sigma) for t in b.values()]).flatten(1)
    hsic = ga @ gb.T
    norm = ga.norm(dim=1)[:, None] * gb.norm(dim=1)[None, :]
    return SimilarityResult(rows=tuple(a), cols=tuple(b), values=(hsic / norm).float(), kernel=kernel,
                            n=ns.pop())


def site_representations(vlm, inputs, sites: Sequence[str], positions="last") -> dict[str, torch.Tensor]:
    """One vector per input at each site: the chosen position (default the last token), or the
    mean over a role's positions when `positions` is "mean:image" / "mean:text"."""
    names = list(sites)
    _, cache = vlm.run_with_cache(inputs, names)
    out = {}
    for s in names:
        spec = vlm.site(s)
        t = cache[s].float()
        if spec.pooled:
            out[s] = t
            continue
        pos = vlm.positions(inputs)[spec.stream]
        if isinstance(positions, str) and positions.startswith("mean:"):
            m = pos.select(positions[5:]).to(t.device).float()
            out[s] = (t * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp_min(1)
        else:
            m = pos.select(positions)
            idx = m.float().argmax(1)
            out[s] = t[torch.arange(t.shape[0]), idx]
    return out
