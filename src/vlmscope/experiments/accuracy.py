"""Task accuracy per question family, as a result: the macro-level behaviour that interpretability
findings are tied back to (the survey's micro-to-macro direction)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlmscope.results import Result


@dataclass(frozen=True, repr=False)
class TaskAccuracy(Result):
    """Accuracy of a zoo-world VLM per question family on fresh examples of a seed."""

    kind = "task_accuracy"
    model: str
    families: tuple[str, ...]
    accuracy: torch.Tensor  # (family,)
    n: int
    seed: int

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame({"model": self.model, "family": list(self.families), "accuracy": self.accuracy.tolist()})

    def __getitem__(self, family: str) -> float:
        if family not in self.families:
            raise KeyError(f"no family {family!r}; families: {', '.join(self.families)}")
        return float(self.accuracy[self.families.index(family)])


def task_accuracy(vlm, n: int = 600, seed: int = 0, name: str | None = None) -> tuple[TaskAccuracy, dict[str, float]]:
    """Per-family accuracy (arg-max answer at the last token) and the same numbers as scores."""
    from vlmscope.zoo.evaluate import evaluate

    acc = evaluate(vlm, seed=seed, n=n)
    result = TaskAccuracy(model=name or type(vlm.model).__name__, families=tuple(acc),
                          accuracy=torch.tensor(list(acc.values())), n=n, seed=seed)
    return result, {f"accuracy {k}": v for k, v in acc.items()}
