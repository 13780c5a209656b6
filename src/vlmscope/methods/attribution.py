"""Attribution patching (Nanda 2023; Kramár et al. 2024): a first-order estimate of every
activation-patching effect from two forwards and one backward.

effect(site, pos) ~ (a_source - a_base) . d metric / d a, evaluated on the base run, summed
over the feature axis (per head for attn.z). `compare` reports how well it tracks the exact
sweep (Pearson r per site type) and lists where the two disagree most.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from vlmscope.methods.corruptions import check_same_layout
from vlmscope.methods.metrics import Metric, last_logits, metric_name
from vlmscope.methods.patching import PatchingResult, _components, position_groups
from vlmscope.model.interventions import Intervention


def attribution_patching(vlm, clean: Mapping[str, Any], corrupt: Mapping[str, Any], metric: Metric,
                         sites: str | Sequence[str] = "lm.blocks.*.resid_post", positions="each",
                         direction: Literal["denoise", "noise"] = "denoise", heads: bool = False,
                         corrupt_interventions: Sequence[Intervention] = ()) -> PatchingResult:
    """The AtP estimate of `patch_sweep` with the same arguments (an approximate result)."""
    check_same_layout(vlm, clean, corrupt)
    comps = _components(vlm, sites, heads)
    names = sorted({c[1] for c in comps}, key=list(vlm.site_table).index)
    noisy = list(corrupt_interventions)

    def total(inputs):
        return lambda out: metric(last_logits(vlm, out, inputs)).sum()

    if direction == "denoise":
        base_out, base = vlm.run_with_cache(corrupt, names, interventions=noisy, grad_metric=total(corrupt))
        src_out, src = vlm.run_with_cache(clean, names)
        m_clean = metric(last_logits(vlm, src_out, clean)).float().detach().cpu()
        m_corrupt = metric(last_logits(vlm, base_out, corrupt)).float().detach().cpu()
        base_inputs = corrupt
    else:
        base_out, base = vlm.run_with_cache(clean, names, grad_metric=total(clean))
        src_out, src = vlm.run_with_cache(corrupt, names, interventions=noisy)
        m_clean = metric(last_logits(vlm, base_out, clean)).float().detach().cpu()
        m_corrupt = metric(last_logits(vlm, src_out, corrupt)).float().detach().cpu()
        base_inputs = clean
    streams = vlm.positions(base_inputs)
    labels: list[str] = []
    rowcol: dict[str, tuple[int, int]] = {}
    groups = {st: position_groups(p, positions) for st, p in streams.items()}
    for gs in groups.values():
        for g in gs:
            if g.label not in rowcol:
                labels.append(g.label)
                rowcol[g.label] = (g.row, g.col)
    pairs = m_clean.shape[0]
    base_metric = m_corrupt if direction == "denoise" else m_clean
    raw = torch.full((pairs, len(comps), len(labels)), float("nan"))
    for ci, (_, site, head) in enumerate(comps):
        spec = vlm.site(site)
        delta = (src[site] - base[site]).float() * base.grads[site].float()
        if spec.hook == "pattern":
            per_pos = delta.sum(-1).transpose(1, 2)  # (batch, query, head)
        elif spec.heads:
            per_pos = delta.sum(-1)  # (batch, pos, head)
        else:
            per_pos = delta.flatten(2).sum(-1)  # (batch, pos)
        if head is not None:
            per_pos = per_pos[..., head]
        elif per_pos.dim() == 3:
            per_pos = per_pos.sum(-1)
        for g in groups[spec.stream]:
            mask = streams[spec.stream].select(g.spec).to(per_pos.device)
            if mask.any():
                raw[:, ci, labels.index(g.label)] = (per_pos * mask).sum(1).cpu() + base_metric
    per_pair = (raw - m_corrupt[:, None, None]) / (m_clean - m_corrupt)[:, None, None]
    return PatchingResult(
        direction=direction, metric=metric_name(metric), components=tuple(c[0] for c in comps),
        groups=tuple(labels), effect=per_pair.nanmean(0), per_pair=per_pair, raw=raw, clean=m_clean,
        corrupt=m_corrupt, group_row=torch.tensor([rowcol[g][0] for g in labels]),
        group_col=torch.tensor([rowcol[g][1] for g in labels]), approximate=True,
    )


@dataclass(frozen=True)
class Agreement:
    """How an approximate sweep tracks the exact one."""

    pearson: dict[str, float]  # per site type (resid_post, attn.z, ...), and "all"
    disagreements: list[tuple[str, str, float, float]]  # (component, group, exact, approx), worst first

    def __repr__(self) -> str:
        return "Agreement(" + ", ".join(f"{k}: r={v:.3f}" for k, v in self.pearson.items()) + ")"


def compare(exact: PatchingResult, approx: PatchingResult, top: int = 10) -> Agreement:
    """Pearson r between two sweeps over the same grid, per site type, and the worst cells."""
    if exact.components != approx.components or exact.groups != approx.groups:
        raise ValueError("the two sweeps cover different components or groups")

    def r(a: torch.Tensor, b: torch.Tensor) -> float:
        ok = ~(a.isnan() | b.isnan())
        a, b = a[ok], b[ok]
        if a.numel() < 2 or a.std() == 0 or b.std() == 0:
            return float("nan")
        return float(torch.corrcoef(torch.stack([a, b]))[0, 1])

    kinds: dict[str, list[int]] = {}
    for i, c in enumerate(exact.components):
        site = c.split(":")[0]
        kinds.setdefault(".".join(site.split(".")[3:]) or site, []).append(i)
    pearson = {k: r(exact.effect[idx].flatten(), approx.effect[idx].flatten()) for k, idx in kinds.items()}
    pearson["all"] = r(exact.effect.flatten(), approx.effect.flatten())
    gap = (exact.effect - approx.effect).abs().nan_to_num(-1)
    worst = gap.flatten().argsort(descending=True)[:top]
    g = len(exact.groups)
    cells = [(exact.components[int(i) // g], exact.groups[int(i) % g], float(exact.effect.flatten()[i]),
              float(approx.effect.flatten()[i])) for i in worst]
    return Agreement(pearson, cells)
