"""Scoring explanations by simulation (Bills et al. 2023): predict a feature's activations from its
explanation alone and correlate the prediction with the real activations.

For the shapes world's concept explanations ("colour=red", or a formula such as "colour=red OR
colour=orange") the simulator is exact and needs no LLM: it predicts 1 on the patches of the
explanation's mask and 0 elsewhere. Alongside the
correlation, `precision` is the share of the feature's strongest patches (above its top
quantile) that lie in the concept's ground-truth mask, and `recall` the share of the mask covered.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from vlmscope.errors import InputError
from vlmscope.methods.explain.compose import mask_of
from vlmscope.results import Result


def correlation(real: torch.Tensor, predicted: torch.Tensor) -> float:
    """Pearson correlation of all entries (NaN when either side is constant)."""
    a, b = real.flatten().double(), predicted.flatten().double()
    if a.shape != b.shape:
        raise InputError(f"real activations have {a.numel()} entries, the prediction {b.numel()}")
    a, b = a - a.mean(), b - b.mean()
    den = a.norm() * b.norm()
    return float(a @ b / den) if den > 0 else float("nan")


@dataclass(frozen=True, repr=False)
class ExplanationScores(Result):
    """Per (feature, explanation): simulation correlation and precision / recall against the mask."""

    kind = "explanation_scores"
    features: tuple[str, ...]
    explanations: tuple[str, ...]
    correlation: torch.Tensor  # (feature,)
    precision: torch.Tensor  # (feature,)
    recall: torch.Tensor  # (feature,)
    quantile: float

    def __repr__(self) -> str:
        return (f"ExplanationScores({len(self.features)} features, mean correlation "
                f"{float(self.correlation.nanmean()):.3f}, precision {float(self.precision.nanmean()):.3f})")

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame({"feature": list(self.features), "explanation": list(self.explanations),
                             "correlation": self.correlation.tolist(), "precision": self.precision.tolist(),
                             "recall": self.recall.tolist()})


def score_explanations(maps: torch.Tensor, explanations: Sequence[str], masks: Mapping[str, torch.Tensor],
                       quantile: float = 0.8, features: Sequence[str] | None = None,
                       thresholds: torch.Tensor | None = None) -> ExplanationScores:
    """maps (feature, scene, rows, cols); explanations: one concept or formula of concepts (compose.py)
    per feature; masks: concept -> (scene, rows, cols) bool (e.g. `concepts.concept_masks`), whose
    union and intersection simulate a formula. A feature fires above its top `quantile`, or above its
    entry of `thresholds` (feature,) where given (e.g. the dissection's)."""
    maps = maps[None] if maps.dim() == 3 else maps
    if len(explanations) != len(maps):
        raise InputError(f"{len(explanations)} explanations for {len(maps)} features")
    if thresholds is not None and len(thresholds) != len(maps):
        raise InputError(f"{len(thresholds)} thresholds for {len(maps)} features")
    simulated = [mask_of(e, masks) for e in explanations]
    corr, prec, rec = [], [], []
    for i, (f, m) in enumerate(zip(maps, simulated)):
        m = m.to(f.device)
        corr.append(correlation(f, m.float()))
        flat = f.flatten().float()
        thr = flat.kthvalue(max(1, int(quantile * flat.numel()))).values if thresholds is None else thresholds[i]
        on = flat > thr
        hit = float((on & m.flatten()).sum())
        prec.append(hit / float(on.sum()) if on.any() else float("nan"))
        rec.append(hit / float(m.sum()) if m.any() else float("nan"))
    features = tuple(features) if features is not None else tuple(str(i) for i in range(len(maps)))
    return ExplanationScores(features, tuple(explanations), torch.tensor(corr), torch.tensor(prec),
                             torch.tensor(rec), float(quantile))
