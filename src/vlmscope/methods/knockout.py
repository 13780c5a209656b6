"""Attention knockout (Geva et al. 2023): block the edges from source positions (e.g. the image)
to destination positions (e.g. the last token) in a window of k consecutive layers, slide the
window across depth, and measure the metric. Where the effect is large, information flows
along those edges in those layers. All windows ride in one batched forward.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from vlmscope.errors import InputError
from vlmscope.methods.metrics import Metric, last_logits, metric_name
from vlmscope.methods.patching import _tile
from vlmscope.model.interventions import knockout
from vlmscope.model.positions import PositionSpec
from vlmscope.results import Result, long_frame


@dataclass(frozen=True, repr=False)
class KnockoutResult(Result):
    """Metric with the src->dst edges blocked in layers [start, start + window), per start."""

    kind = "knockout"
    part: str
    src: str
    dst: str
    window: int
    metric: str
    starts: tuple[int, ...]
    values: torch.Tensor  # (start, example) metric under knockout
    baseline: torch.Tensor  # (example,) metric without knockout
    relative: torch.Tensor  # (start,) mean over examples of (value - baseline) / |baseline|

    def to_dataframe(self):
        df = long_frame(self.relative, ("start",), {"start": list(self.starts)}, "relative_change")
        df["mean_value"] = self.values.mean(1).tolist()
        df["baseline"] = float(self.baseline.mean())
        df["window"], df["src"], df["dst"] = self.window, self.src, self.dst
        return df

    def strongest(self) -> int:
        """The window start where knocking the edges out changes the metric most."""
        return self.starts[int(self.relative.abs().argmax())]


def knockout_sweep(vlm, inputs: Mapping[str, Any], metric: Metric, src: PositionSpec = "image",
                   dst: PositionSpec = "last", window: int = 1, part: str = "lm",
                   batch_size: int = 32) -> KnockoutResult:
    """Slide a window of `window` layers over `part` and knock out src->dst attention in it."""
    n = vlm.n_layers(part)
    if not 1 <= window <= n:
        raise InputError(f"window must be between 1 and {n} (the number of {part} layers), got {window}")
    starts = list(range(n - window + 1))
    with torch.no_grad():
        base_out = vlm.run(inputs)
    baseline = metric(last_logits(vlm, base_out, inputs)).float().cpu()
    b = baseline.shape[0]
    values = torch.empty(len(starts), b)
    per_forward = max(1, batch_size // b)
    for s0 in range(0, len(starts), per_forward):
        chunk = starts[s0:s0 + per_forward]
        tiled = _tile(inputs, len(chunk))
        ivs = [knockout(src, dst, layers=range(s, s + window), part=part, batch=list(range(j * b, (j + 1) * b)))
               for j, s in enumerate(chunk)]
        out = vlm.run(tiled, ivs)
        values[s0:s0 + len(chunk)] = metric(last_logits(vlm, out, tiled)).float().cpu().view(len(chunk), b)
    relative = ((values - baseline) / baseline.abs().clamp_min(1e-8)).mean(1)
    return KnockoutResult(part=part, src=repr(src) if not isinstance(src, str) else src,
                          dst=repr(dst) if not isinstance(dst, str) else dst, window=window,
                          metric=metric_name(metric), starts=tuple(starts), values=values, baseline=baseline,
                          relative=relative)


def accuracy_metric(answers: Sequence[int] | torch.Tensor) -> Metric:
    """1 where the top token is the answer, else 0 (use with `knockout_sweep` for task accuracy)."""
    answers = torch.as_tensor(answers)

    def accuracy(logits: torch.Tensor) -> torch.Tensor:
        return (logits.argmax(-1).cpu() == answers).float()

    accuracy.name = "accuracy"  # type: ignore[attr-defined]
    return accuracy
