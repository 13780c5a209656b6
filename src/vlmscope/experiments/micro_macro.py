"""Micro to macro: explain why two models that differ in one design choice answer some question
families better than others, from what their parts represent (the survey's third future direction).

For each model: task accuracy per family (macro), and the scene probe's decodability of colour,
shape and object presence at each cell at the end of each part -- vision tower, connector, LM
(micro). Each family is tied to the concepts it needs (FAMILY_NEEDS); a family whose accuracy
differs between the models is "explained" when a concept it needs is less decodable in the worse
model at some part, by at least the same margin rule.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vlmscope.experiments.accuracy import task_accuracy
from vlmscope.experiments.scene_probe import scene_traces
from vlmscope.results import Result

PARTS = ("vision", "connector", "lm")
CONCEPTS = ("colour", "shape", "object")
# the scene facts each question family needs: what is where (colour / shape bound to a cell) or
# only where something is (object presence)
FAMILY_NEEDS = {
    "colour": ("colour",), "shape": ("shape",), "where": ("colour", "shape"), "count": ("object",),
    "exists": ("colour", "shape"), "relation": ("colour", "shape", "object"),
}
MARGIN = 0.05  # a difference in accuracy or decodability worth stating


@dataclass(frozen=True, repr=False)
class MicroMacro(Result):
    """Accuracy per family and scene decodability per concept and part, for two or more models,
    and the statements tying accuracy differences to decodability differences."""

    kind = "micro_macro"
    models: tuple[str, ...]
    families: tuple[str, ...]
    accuracy: torch.Tensor  # (model, family)
    concepts: tuple[str, ...]
    parts: tuple[str, ...]
    decodability: torch.Tensor  # (model, concept, part): scene probe at the part's last site
    statements: tuple[str, ...]

    def to_dataframe(self):
        import pandas as pd

        rows = [{"model": m, "level": "macro", "what": f"accuracy {f}", "part": None,
                 "value": float(self.accuracy[i, j])} for i, m in enumerate(self.models)
                for j, f in enumerate(self.families)]
        rows += [{"model": m, "level": "micro", "what": f"scene {c}", "part": p,
                  "value": float(self.decodability[i, k, q])} for i, m in enumerate(self.models)
                 for k, c in enumerate(self.concepts) for q, p in enumerate(self.parts)]
        return pd.DataFrame(rows)


def _last_of(trace, part: str) -> float:
    i = trace.last_of(part)
    return float("nan") if i is None else float(trace.score[i])


def explain(models: Sequence[str], families: Sequence[str], accuracy: torch.Tensor, decodability: torch.Tensor,
            concepts: Sequence[str] = CONCEPTS, parts: Sequence[str] = PARTS, margin: float = MARGIN) -> list[str]:
    """Statements for each pair of models (first vs the others): every family whose accuracy differs by
    >= margin, with the needed concept and part whose decodability differs most, and whether it
    points the same way (explained) or not."""
    out = []
    a = 0
    for b in range(1, len(models)):
        for j, fam in enumerate(families):
            d_acc = float(accuracy[a, j] - accuracy[b, j])
            if abs(d_acc) < margin:
                continue
            best, best_d = None, 0.0
            for c in FAMILY_NEEDS.get(fam, ()):
                k = list(concepts).index(c)
                for q, part in enumerate(parts):
                    d = float(decodability[a, k, q] - decodability[b, k, q])
                    if d == d and abs(d) > abs(best_d):
                        best, best_d = (c, part, k, q), d
            hi, lo = (a, b) if d_acc > 0 else (b, a)
            head = (f"{fam}: {models[hi]} {float(accuracy[hi, j]):.2f} vs {models[lo]} {float(accuracy[lo, j]):.2f}")
            if best is None or abs(best_d) < margin:
                out.append(f"{head} -- not explained by scene decodability (no needed concept differs by "
                           f">= {margin} at any part)")
                continue
            c, part, k, q = best
            same_way = (best_d > 0) == (d_acc > 0)
            out.append(f"{head} -- {c} at each cell is {'less' if same_way else 'more'} decodable in "
                       f"{models[lo]} at the {part} ({float(decodability[lo, k, q]):.2f} vs "
                       f"{float(decodability[hi, k, q]):.2f}): "
                       + ("consistent with the accuracy gap" if same_way else "the opposite of the accuracy gap"))
    return out


def micro_to_macro(vlms: Sequence, names: Sequence[str], n: int = 600, seed: int = 0,
                   concepts: Sequence[str] = CONCEPTS, margin: float = MARGIN) -> MicroMacro:
    """Measure and tie together accuracy and scene decodability for each model (loaded VLMs)."""
    acc_rows, dec_rows, families = [], [], None
    for vlm, name in zip(vlms, names, strict=True):
        acc, _ = task_accuracy(vlm, n=n, seed=seed, name=name)
        families = families or acc.families
        acc_rows.append(torch.tensor([acc[f] for f in families]))
        found = scene_traces(vlm, concepts, n=n, seed=seed)
        traces = [found[c][0] for c in concepts]
        dec_rows.append(torch.tensor([[_last_of(t, p) for p in PARTS] for t in traces]))
    accuracy, decodability = torch.stack(acc_rows), torch.stack(dec_rows)
    statements = explain(names, families, accuracy, decodability, concepts, PARTS, margin)
    return MicroMacro(models=tuple(names), families=tuple(families), accuracy=accuracy, concepts=tuple(concepts),
                      parts=PARTS, decodability=decodability, statements=tuple(statements))
