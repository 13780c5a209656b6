"""Metrics of a run's output for causal methods: functions (batch, vocab) logits -> (batch,).

They read the logits at each example's last real token (the answer position in the zoo's
single-word answers). `normalise` maps a metric so that clean = 1 and corrupt = 0.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

Metric = Callable[[torch.Tensor], torch.Tensor]


def _ids(tokens, batch: int, device) -> torch.Tensor:
    """One id per row: a scalar broadcasts; per-example ids tile over a batch that repeats the
    examples (the layout batched sweeps use)."""
    t = torch.as_tensor(tokens, device=device).long()
    if t.dim() == 0:
        return t.expand(batch)
    if batch % len(t):
        raise ValueError(f"{len(t)} token ids for a batch of {batch} rows")
    return t.repeat(batch // len(t))


@dataclass(frozen=True)
class LogitDiff:
    """logit[good] - logit[bad]; each a token id or one per example."""

    good: int | Sequence[int] | torch.Tensor
    bad: int | Sequence[int] | torch.Tensor
    name: str = "logit_diff"

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        b = logits.shape[0]
        g, w = _ids(self.good, b, logits.device), _ids(self.bad, b, logits.device)
        rows = torch.arange(b, device=logits.device)
        return logits[rows, g] - logits[rows, w]


@dataclass(frozen=True)
class AnswerProb:
    """Probability of the answer token(s)."""

    answer: int | Sequence[int] | torch.Tensor
    name: str = "answer_prob"

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        b = logits.shape[0]
        a = _ids(self.answer, b, logits.device)
        return logits.float().softmax(-1)[torch.arange(b, device=logits.device), a]


def logit_diff(good, bad) -> LogitDiff:
    return LogitDiff(good, bad)


def answer_prob(answer) -> AnswerProb:
    return AnswerProb(answer)


def last_logits(vlm, output, inputs) -> torch.Tensor:
    """(batch, vocab) logits at each row's last real token."""
    last = vlm.positions(inputs)["lm"].last().to(output.logits.device)
    return output.logits[torch.arange(output.logits.shape[0], device=last.device), last]


def normalise(value: torch.Tensor, clean: torch.Tensor, corrupt: torch.Tensor) -> torch.Tensor:
    """Map metric values so that the clean run scores 1 and the corrupt run 0."""
    return (value - corrupt) / (clean - corrupt)


def metric_name(metric: Metric) -> str:
    return getattr(metric, "name", getattr(metric, "__name__", type(metric).__name__))
