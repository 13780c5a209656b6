"""SpLiCE, sparse linear concept embeddings (Bhalla et al. 2024), on dual encoders (CLIP, SigLIP).

An image embedding is written as a sparse, non-negative combination of the text embeddings of a
concept vocabulary. As in the paper, both sides are unit-normalised, mean-centred (images by an
image mean, concepts by the concepts' mean) and renormalised, then

    w* = argmin_{w >= 0}  1/(2d) ||C w - z||² + l1 ||w||_1          (C: d x concepts, z: d)

which is scikit-learn's `Lasso(alpha=l1, positive=True, fit_intercept=False)` objective. It is solved
here by ADMM in torch (`nonneg_lasso`), batched over images; `l1` sets the sparsity. The result
holds the weights, the cosine between the reconstruction and the centred embedding, and, when
ground-truth concepts are given, precision and recall of the concepts with non-zero weight.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from vlmscope.errors import InputError
from vlmscope.results import Result


def nonneg_lasso(A: torch.Tensor, b: torch.Tensor, l1: float, rho: float | None = None, max_iter: int = 5000,
                 tol: float = 1e-7) -> torch.Tensor:
    """Solve min_{w>=0} 1/(2n) ||A w - b||² + l1 ||w||_1 for each column of b by ADMM (Boyd et al.
    2011, the lasso with a non-negativity constraint on the split variable). A: (n, k), b: (n,) or
    (n, m). Returns w: (k,) or (k, m), exactly non-negative and sparse (the projected split)."""
    if l1 < 0:
        raise InputError(f"l1 must be >= 0, got {l1}")
    squeeze = b.dim() == 1
    A64, B = A.double(), (b[:, None] if squeeze else b).double()
    n, k = A64.shape
    gram = A64.T @ A64 / n  # (k, k)
    rho = rho if rho is not None else max(float(torch.linalg.eigvalsh(gram)[-1]) * 0.5, 1e-6)
    chol = torch.linalg.cholesky(gram + rho * torch.eye(k, dtype=torch.float64))
    atb = A64.T @ B / n  # (k, m)
    z = torch.zeros(k, B.shape[1], dtype=torch.float64)
    u = torch.zeros_like(z)
    for _ in range(max_iter):
        w = torch.cholesky_solve(atb + rho * (z - u), chol)
        z_old = z
        z = (w + u - l1 / rho).clamp_min(0)  # prox of l1 |.| + indicator(>= 0)
        u = u + w - z
        primal, dual = (w - z).norm(), rho * (z - z_old).norm()
        if primal < tol * (1 + z.norm()) and dual < tol * (1 + u.norm() * rho):
            break
    z = z.to(A.dtype)
    return z[:, 0] if squeeze else z


def centre(emb: torch.Tensor, mean: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-normalise, subtract the mean of the normalised rows (or `mean`), renormalise: the paper's
    modality-gap correction. Returns (centred rows, the mean used)."""
    e = torch.nn.functional.normalize(emb.double(), dim=-1)
    mean = e.mean(0) if mean is None else mean.double()
    return torch.nn.functional.normalize(e - mean, dim=-1), mean


@dataclass(frozen=True, repr=False)
class SpliceResult(Result):
    """Sparse concept weights per image: `weights` (image, concept) >= 0."""

    kind = "splice"
    concepts: tuple[str, ...]
    weights: torch.Tensor  # (image, concept)
    cosine: torch.Tensor  # (image,) cos(reconstruction, centred embedding)
    l1: float
    precision: torch.Tensor  # (image,) NaN without ground truth
    recall: torch.Tensor  # (image,)

    def __repr__(self) -> str:
        l0 = float((self.weights > 0).sum(1).float().mean())
        return (f"SpliceResult({self.weights.shape[0]} images x {len(self.concepts)} concepts, l1={self.l1}, "
                f"mean L0 {l0:.1f}, cosine {float(self.cosine.mean()):.3f})")

    def top(self, image: int, k: int = 5) -> list[tuple[str, float]]:
        """The k concepts with the largest weights in one image (non-zero only)."""
        w = self.weights[image]
        idx = w.argsort(descending=True)[:k]
        return [(self.concepts[i], float(w[i])) for i in idx.tolist() if w[i] > 0]

    def to_dataframe(self):
        """One row per non-zero (image, concept) weight."""
        import pandas as pd

        rows = [{"image": int(i), "concept": self.concepts[int(j)], "weight": float(self.weights[i, j])}
                for i, j in self.weights.nonzero().tolist()]
        return pd.DataFrame(rows, columns=["image", "concept", "weight"])


def splice_decompose(image_emb: torch.Tensor, concept_emb: torch.Tensor, concepts: Sequence[str],
                     l1: float = 0.05, image_mean: torch.Tensor | None = None,
                     truth: Sequence[set[str]] | None = None) -> SpliceResult:
    """SpLiCE on given embeddings: image_emb (image, d), concept_emb (concept, d). `image_mean`: the
    mean of normalised image embeddings over a reference set (default: these images)."""
    if concept_emb.shape[0] != len(concepts):
        raise InputError(f"{concept_emb.shape[0]} concept embeddings for {len(concepts)} concept names")
    z, _ = centre(image_emb, image_mean)  # (image, d)
    c, _ = centre(concept_emb)  # (concept, d)
    w = nonneg_lasso(c.T, z.T, l1).T  # (image, concept)
    recon = w @ c
    cosine = torch.nn.functional.cosine_similarity(recon, z, dim=-1).nan_to_num(0.0)
    precision, recall = concept_precision_recall(w > 0, concepts, truth)
    return SpliceResult(tuple(concepts), w.float(), cosine.float(), float(l1), precision, recall)


def concept_precision_recall(chosen: torch.Tensor, concepts: Sequence[str],
                             truth: Sequence[set[str]] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image: precision and recall of the chosen concepts (image, concept) bool against the true
    concept sets (NaN without truth; precision of an empty choice is 1 when nothing is true, else 0)."""
    n = chosen.shape[0]
    if truth is None:
        return torch.full((n,), float("nan")), torch.full((n,), float("nan"))
    if len(truth) != n:
        raise InputError(f"{len(truth)} ground-truth sets for {n} images")
    p, r = torch.zeros(n), torch.zeros(n)
    for i, true in enumerate(truth):
        got = {concepts[j] for j in chosen[i].nonzero().flatten().tolist()}
        hit = len(got & set(true))
        p[i] = hit / len(got) if got else float(not true)
        r[i] = hit / len(true) if true else 1.0
    return p, r


def dual_embeddings(vlm, inputs: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(image embeddings (image, d), text embeddings (text, d)) of a dual encoder: the `vision.proj`
    and `text.proj` sites of one run on inputs holding both images and texts."""
    if not vlm.adapter.dual_encoder:
        raise InputError(f"SpLiCE and TEXTSPAN need a dual encoder (CLIP, SigLIP); this is {vlm.adapter.name!r}")
    _, cache = vlm.run_with_cache(inputs, ["vision.proj", "text.proj"])
    return cache["vision.proj"].float(), cache["text.proj"].float()


def splice(vlm, inputs: Mapping[str, Any], concepts: Sequence[str], l1: float = 0.05,
           image_mean: torch.Tensor | None = None, truth: Sequence[set[str]] | None = None) -> SpliceResult:
    """SpLiCE on a dual encoder: `inputs` hold the images and the concept texts (one text per
    concept, in order, e.g. `vlm.prepare(images, concepts)`)."""
    image_emb, concept_emb = dual_embeddings(vlm, inputs)
    return splice_decompose(image_emb, concept_emb, concepts, l1, image_mean, truth)
