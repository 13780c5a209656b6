"""Attribution patching (Nanda 2023; Kramár et al. 2024): a first-order estimate of every
activation-patching effect from two forwards and one backward.

effect(site, pos) ~ (a_source - a_base) . d metric / d a, evaluated on the base run, summed
over the feature axis (per head for attn.z). `method` picks the gradient: "atp" the base run's;
"ig" averaged between the base and the source run (integrated gradients, for large patches);
"atp*" AtP* with GradDrop (Kramár et al. 2024). `compare` reports how well an estimate tracks
the exact sweep (Pearson r per site type) and lists where the two disagree most.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from vlmscope.errors import InputError
from vlmscope.methods import attribution_star as star
from vlmscope.methods.corruptions import check_same_layout
from vlmscope.methods.metrics import Metric, last_logits, metric_name
from vlmscope.methods.patching import PatchingResult, _components, position_groups
from vlmscope.model.interventions import Intervention

METHODS = ("atp", "atp*", "ig")


def attribution_patching(vlm, clean: Mapping[str, Any], corrupt: Mapping[str, Any], metric: Metric,
                         sites: str | Sequence[str] = "lm.blocks.*.resid_post", positions="each",
                         direction: Literal["denoise", "noise"] = "denoise", heads: bool = False,
                         corrupt_interventions: Sequence[Intervention] = (),
                         method: Literal["atp", "atp*", "ig"] = "atp", steps: int = 8,
                         batch_size: int = 32) -> PatchingResult:
    """An estimate of `patch_sweep` with the same arguments (an approximate result).

    method: "atp" (one backward); "ig" (`steps` backwards on runs interpolated between base and
    source; `steps` is used by "ig" only); "atp*" (AtP plus one backward per LM layer, GradDrop:
    magnitudes from the dropped gradients, signs from AtP). batch_size: rows per forward of the
    extra backwards.
    """
    if method not in METHODS:
        raise InputError(f"unknown attribution method {method!r}; valid: {', '.join(map(repr, METHODS))}")
    if direction not in ("denoise", "noise"):
        raise InputError(f"direction must be 'denoise' or 'noise', got {direction!r}")
    check_same_layout(vlm, clean, corrupt)
    comps = _components(vlm, sites, heads)
    names = sorted({c[1] for c in comps}, key=list(vlm.site_table).index)
    noisy = list(corrupt_interventions)
    base_in, base_ivs, src_in, src_ivs = (corrupt, noisy, clean, []) if direction == "denoise" else \
        (clean, [], corrupt, noisy)

    def total(inputs):
        return lambda out: metric(last_logits(vlm, out, inputs)).sum()

    ig = method == "ig"  # its gradients come from the interpolated runs, not from the base run
    cached = names + [s for s in star.interpolation_sites(vlm, names) if s not in names] if ig else names
    base_out, base = vlm.run_with_cache(base_in, cached, interventions=base_ivs,
                                        grad_metric=None if ig else total(base_in))
    src_out, src = vlm.run_with_cache(src_in, cached, interventions=src_ivs)
    m_base = metric(last_logits(vlm, base_out, base_in)).float().detach().cpu()
    m_src = metric(last_logits(vlm, src_out, src_in)).float().detach().cpu()
    m_clean, m_corrupt = (m_src, m_base) if direction == "denoise" else (m_base, m_src)
    grid = _Grid(vlm, base_in, positions, {vlm.site(s).stream for s in names})
    if ig:
        grads = star.integrated_grads(vlm, base_in, names, base_ivs, total, base, src, steps, batch_size)
        delta = grid.estimates(comps, base, src, grads)
    else:
        delta = grid.estimates(comps, base, src, {s: base.grads[s] for s in names})
    if method == "atp*":
        dropped = star.dropped_grads(vlm, base_in, names, base_ivs, total, batch_size)
        per_layer = torch.stack([grid.estimates(comps, base, src, {s: g[i] for s, g in dropped.items()})
                                 for i in range(vlm.n_layers("lm"))])  # (layer, pair, component, group)
        delta = star.graddrop(per_layer, delta, [star.own_layer(vlm, site) for _, site, _ in comps])
    raw = delta + m_base[:, None, None]  # (pair, component, group); NaN where a group is empty
    per_pair = (raw - m_corrupt[:, None, None]) / (m_clean - m_corrupt)[:, None, None]
    return PatchingResult(
        direction=direction, metric=metric_name(metric), components=tuple(c[0] for c in comps),
        groups=tuple(grid.labels), effect=per_pair.nanmean(0), per_pair=per_pair, raw=raw, clean=m_clean,
        corrupt=m_corrupt, group_row=torch.tensor([grid.rowcol[g][0] for g in grid.labels]),
        group_col=torch.tensor([grid.rowcol[g][1] for g in grid.labels]), approximate=True,
    )


class _Grid:
    """The component x position-group grid of one base run, and first-order estimates over it."""

    def __init__(self, vlm, inputs, positions, streams: set[str]):
        self.vlm = vlm
        self.labels: list[str] = []
        self.rowcol: dict[str, tuple[int, int]] = {}
        self.masks: dict[str, list[tuple[int, torch.Tensor]]] = {}  # stream -> (group index, (batch, pos) mask)
        for stream, pos in vlm.positions(inputs).items():
            if stream not in streams:  # only the streams of the swept sites (indices refer to one stream)
                continue
            for g in position_groups(pos, positions):
                if g.label not in self.rowcol:
                    self.labels.append(g.label)
                    self.rowcol[g.label] = (g.row, g.col)
                mask = pos.select(g.spec)
                if mask.any():
                    self.masks.setdefault(stream, []).append((self.labels.index(g.label), mask))

    def estimates(self, comps, base, src, grads: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """(pair, component, group): sum of (a_src - a_base) * grad over each node; NaN where empty."""
        pairs = next(iter(grads.values())).shape[0]
        out = torch.full((pairs, len(comps), len(self.labels)), float("nan"))
        for ci, (_, site, head) in enumerate(comps):
            spec = self.vlm.site(site)
            prod = (src[site] - base[site]).float() * grads[site].float()
            if spec.hook == "pattern":
                per_pos = prod.sum(-1).transpose(1, 2)  # (batch, query, head)
            elif spec.heads:
                per_pos = prod.sum(-1)  # (batch, pos, head)
            else:
                per_pos = prod.flatten(2).sum(-1)  # (batch, pos)
            if head is not None:
                per_pos = per_pos[..., head]
            elif per_pos.dim() == 3:
                per_pos = per_pos.sum(-1)
            for gi, mask in self.masks.get(spec.stream, []):
                out[:, ci, gi] = (per_pos * mask.to(per_pos.device)).sum(1).cpu()
        return out


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
