"""Path patching (Wang et al. 2022; Goldowsky-Dill et al. 2023): the effect of a sender on the
output *only through* chosen receivers.

Pass 1 runs the base input with the sender patched from the source run and every later
attention / MLP output frozen to its base value, so the sender's change reaches the receivers
only along direct residual paths; the receivers' values are recorded. Pass 2 runs the base
input with just the receivers set to those values, and measures the metric.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from vlmscope.methods.metrics import Metric, last_logits, metric_name, normalise
from vlmscope.model.interventions import patch
from vlmscope.results import Result


@dataclass(frozen=True, repr=False)
class PathResult(Result):
    kind = "path_patching"
    sender: str
    receivers: tuple[str, ...]
    metric: str
    value: torch.Tensor  # (example,) metric with the path patched
    base: torch.Tensor  # (example,) metric of the base run
    source: torch.Tensor  # (example,) metric of the source run
    effect: torch.Tensor  # (example,) normalised: source = 1, base = 0

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame({"sender": self.sender, "receivers": ", ".join(self.receivers),
                             "value": self.value.tolist(), "effect": self.effect.tolist()})


def _frozen_sites(vlm, sender: str) -> list[str]:
    """attn.out / mlp.out sites after the sender (same block: the MLP if the sender is attention)."""
    parts = sender.split(".")
    part, layer = parts[0], int(parts[2])
    is_attn = ".attn." in sender
    out = []
    for i in range(layer, vlm.n_layers(part)):
        for comp in ("attn.out", "mlp.out"):
            name = f"{part}.blocks.{i}.{comp}"
            if i == layer and (comp == "attn.out" and is_attn or comp == "mlp.out" and not is_attn):
                continue
            if name != sender:
                out.append(name)
    return out


def path_patch(vlm, base: Mapping[str, Any], source: Mapping[str, Any], metric: Metric, sender: str,
               receivers: Sequence[str], sender_heads: Sequence[int] | None = None,
               receiver_heads: Sequence[int] | None = None) -> PathResult:
    """Effect of `sender` (a `part.blocks.i.…` site, optionally some heads) via `receivers`."""
    receivers = list(receivers)
    frozen = _frozen_sites(vlm, sender)
    src_out, src_cache = vlm.run_with_cache(source, sender)
    base_out, base_cache = vlm.run_with_cache(base, frozen)
    pass1 = [patch(sender, src_cache, heads=sender_heads)]
    pass1 += [patch(s, base_cache) for s in frozen if s not in receivers]
    _, recv_cache = vlm.run_with_cache(base, receivers, interventions=pass1)
    out = vlm.run(base, [patch(r, recv_cache, heads=receiver_heads) for r in receivers])
    value = metric(last_logits(vlm, out, base)).float().cpu()
    m_base = metric(last_logits(vlm, base_out, base)).float().cpu()
    m_src = metric(last_logits(vlm, src_out, source)).float().cpu()
    return PathResult(sender=sender, receivers=tuple(receivers), metric=metric_name(metric), value=value,
                      base=m_base, source=m_src, effect=normalise(value, m_src, m_base))
