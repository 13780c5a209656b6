"""Direct ablations (Nanda et al. 2023): replace components with zeros, a dataset mean or
resampled activations, and measure the change in a metric and in task accuracy."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from vlmscope.methods.metrics import Metric, last_logits, metric_name
from vlmscope.model.interventions import ablate
from vlmscope.model.positions import PositionSpec
from vlmscope.results import Result, long_frame


@dataclass(frozen=True, repr=False)
class AblationResult(Result):
    kind = "ablation"
    how: str
    metric: str
    components: tuple[str, ...]
    value: torch.Tensor  # (component,) mean metric under ablation
    baseline: float
    accuracy: torch.Tensor  # (component,) task accuracy under ablation (NaN without answers)
    baseline_accuracy: float

    def to_dataframe(self):
        df = long_frame(self.value, ("component",), {"component": list(self.components)}, "metric")
        df["accuracy"] = self.accuracy.tolist()
        df["baseline"], df["baseline_accuracy"], df["how"] = self.baseline, self.baseline_accuracy, self.how
        return df


def ablation_effects(vlm, inputs: Mapping[str, Any], metric: Metric, components: Sequence[str | tuple],
                     how: Literal["zero", "mean", "resample"] = "zero", reference: Any = None,
                     positions: PositionSpec = None, answers: Sequence[int] | torch.Tensor | None = None
                     ) -> AblationResult:
    """Ablate each component in turn: a site name, or (site, {"heads": [...]} / {"neurons": [...]})."""
    def run(ivs):
        out = vlm.run(inputs, ivs)
        logits = last_logits(vlm, out, inputs)
        acc = float((logits.argmax(-1).cpu() == torch.as_tensor(answers)).float().mean()) if answers is not None \
            else float("nan")
        return float(metric(logits).float().mean()), acc

    base, base_acc = run([])
    labels, values, accs = [], [], []
    for comp in components:
        site, opts = (comp, {}) if isinstance(comp, str) else comp
        labels.append(site + "".join(f":{k}={list(v)}" for k, v in opts.items()))
        v, a = run([ablate(site, how, positions=positions, reference=reference, **opts)])
        values.append(v)
        accs.append(a)
    return AblationResult(how=how, metric=metric_name(metric), components=tuple(labels),
                          value=torch.tensor(values), baseline=base, accuracy=torch.tensor(accs),
                          baseline_accuracy=base_acc)
