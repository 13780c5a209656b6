"""Gradients for attribution patching beyond the one taken on the base run.

- GradDrop (Kramár et al. 2024, AtP*): one gradient per language-model layer, with the gradient
  through that layer's residual contributions (attn.out and mlp.out) dropped. A node whose direct
  and indirect effects cancel in the plain gradient keeps a large estimate in some of them.
- Integrated gradients (Sundararajan et al. 2017; as in EAP-IG, Hanna et al. 2024, and Marks et
  al. 2024): the gradient averaged over runs whose inputs lie between the base and the source
  run, for patches too large for a first-order estimate (a whole token replaced).
- The QK fix (Kramár et al. 2024, AtP*): the exact effect of a query or key patch on its head's
  softmax, with the gradient taken only after it (`query_effects`, `key_effects`). It needs a
  head's queries and keys, which no vlmscope site exposes yet, so `attribution_patching` does
  not route through it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from vlmscope.errors import InputError
from vlmscope.methods.patching import _tile, _tiled
from vlmscope.model.interventions import Intervention, hook

CopyHooks = Callable[[int, int], list[Intervention]]  # (first copy, copies) -> hooks for one forward


def grads_per_copy(vlm, inputs: Mapping[str, Any], names: Sequence[str], interventions: Sequence[Intervention],
                   total: Callable[[Mapping[str, Any]], Callable], copies: int, hooks_for: CopyHooks,
                   batch_size: int = 32) -> dict[str, torch.Tensor]:
    """d metric / d site for `copies` variants of one run, batched: copy j of the inputs gets the
    hooks `hooks_for` builds for it. Returns {site: (copies, batch, ...)}."""
    rows = inputs["input_ids"].shape[0]
    per_forward = max(1, batch_size // rows)
    out: dict[str, list[torch.Tensor]] = {s: [] for s in names}
    for first in range(0, copies, per_forward):
        n = min(per_forward, copies - first)
        tiled = _tile(inputs, n)
        ivs = [_tiled(iv, n) for iv in interventions] + hooks_for(first, n)
        _, cache = vlm.run_with_cache(tiled, list(names), interventions=ivs, grad_metric=total(tiled))
        for s in names:
            g = cache.grads[s]
            out[s].append(g.view(n, g.shape[0] // n, *g.shape[1:]))
    return {s: torch.cat(gs) for s, gs in out.items()}


def _copy_rows(t: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """(copies,) per-copy values -> one per row of the tiled batch `t`, shaped to broadcast against it."""
    return values.repeat_interleave(t.shape[0] // len(values)).view(-1, *[1] * (t.dim() - 1))


# --- GradDrop --------------------------------------------------------------------------------------


def dropped_grads(vlm, inputs, names, interventions, total, batch_size: int = 32) -> dict[str, torch.Tensor]:
    """{site: (layers, batch, ...)}: the gradient with LM layer l's residual contributions detached
    (its attn.out and mlp.out pass values on but no gradient), for each layer l."""
    n_layers = vlm.n_layers("lm")

    def hooks_for(first: int, n: int) -> list[Intervention]:
        ivs = []
        for j in range(n):
            layer = first + j
            drop = torch.zeros(n, dtype=torch.bool)
            drop[j] = True
            for site in (f"lm.blocks.{layer}.attn.out", f"lm.blocks.{layer}.mlp.out"):
                ivs.append(hook(site, _detach_rows(drop)))
        return ivs

    return grads_per_copy(vlm, inputs, names, interventions, total, n_layers, hooks_for, batch_size)


def _detach_rows(drop: torch.Tensor) -> Callable:
    """A hook passing a site's value on unchanged, but no gradient through the copies in `drop`."""
    def fn(t: torch.Tensor, *, site: str) -> torch.Tensor:
        return torch.where(_copy_rows(t, drop).to(t.device), t.detach(), t)
    return fn


def own_layer(vlm, site: str) -> int | None:
    """The LM layer whose output a node belongs to (its block; resid_pre to the block before), or None."""
    spec = vlm.site(site)
    if spec.part != "lm" or spec.layer is None:
        return None
    return spec.layer - 1 if site.endswith(".resid_pre") else spec.layer


def graddrop(per_layer: torch.Tensor, plain: torch.Tensor, own: Sequence[int | None]) -> torch.Tensor:
    """AtP*'s combination of per-layer estimates (layer, pair, component, group): the mean absolute
    value over the layers other than each component's own (dropping it would cut the node's own
    output; Kramár et al. sum over L layers and divide by L - 1), signed like the plain AtP
    estimate `plain`. Where no other layer exists it is the plain estimate."""
    keep = torch.ones(per_layer.shape[0], len(own), dtype=torch.bool)
    for ci, layer in enumerate(own):
        if layer is not None and 0 <= layer < per_layer.shape[0]:
            keep[layer, ci] = False
    keep = keep[:, None, :, None]  # (layer, 1, component, 1)
    count = keep.sum(0)
    mag = (per_layer.abs() * keep).sum(0) / count.clamp(min=1)
    return torch.where(count > 0, plain.sign() * mag, plain)


# --- integrated gradients ----------------------------------------------------------------------------


def interpolation_sites(vlm, sites: Sequence[str]) -> list[str]:
    """Where the interpolation path starts: the LM's input embeddings when every site is in the LM;
    else the vision tower's input and the LM's input at its non-image positions."""
    if all(vlm.site(s).stream == "lm" for s in sites):
        return ["lm.embed"]
    if "vision.embed" not in vlm.site_table or vlm.site("vision.embed").packed:
        bad = [s for s in sites if vlm.site(s).stream != "lm"]
        raise InputError(f"integrated gradients for sites outside the LM ({bad[:3]}) interpolate at vision.embed, "
                         "which this model lacks or packs; use LM sites or method='atp'")
    return ["vision.embed", "lm.embed"]


def integrated_grads(vlm, inputs, names, interventions, total, base, source, steps: int,
                     batch_size: int = 32) -> dict[str, torch.Tensor]:
    """{site: (batch, ...)}: the gradient averaged over `steps` runs whose path inputs (see
    `interpolation_sites`) lie at base + alpha (source - base), alpha at the midpoints of `steps`
    equal intervals of [0, 1] (midpoint rule)."""
    if steps < 1:
        raise InputError(f"steps must be >= 1, got {steps}")
    alphas = (torch.arange(steps) + 0.5) / steps
    starts = interpolation_sites(vlm, names)
    deltas = {s: source[s] - base[s] for s in starts}  # (batch, pos, d) each
    if "vision.embed" in deltas:  # the image positions of lm.embed follow the vision tower
        deltas["lm.embed"] = deltas["lm.embed"] * (~vlm.select(inputs, "image"))[..., None].to(deltas["lm.embed"])

    def hooks_for(first: int, n: int) -> list[Intervention]:
        a = alphas[first:first + n]
        return [hook(site, _shift(d, a)) for site, d in deltas.items()]

    grads = grads_per_copy(vlm, inputs, names, interventions, total, steps, hooks_for, batch_size)
    return {s: g.mean(0) for s, g in grads.items()}


def _shift(delta: torch.Tensor, alphas: torch.Tensor) -> Callable:
    """A hook moving each copy of a site from the base run toward the source run by its alpha."""
    def fn(t: torch.Tensor, *, site: str) -> torch.Tensor:
        tiled = delta.repeat(len(alphas), *[1] * (delta.dim() - 1)).to(t.device, t.dtype)
        return t + _copy_rows(t, alphas).to(t.device, t.dtype) * tiled
    return fn


# --- the QK fix ----------------------------------------------------------------------------------------


def query_effects(pattern: torch.Tensor, k: torch.Tensor, dq: torch.Tensor, grad: torch.Tensor,
                  scale: float) -> torch.Tensor:
    """(batch, query, head): the effect of changing each query by `dq`, through the softmax computed
    exactly and the gradient `grad` = d metric / d pattern after it.

    pattern, grad: (batch, head, query, key); k: (batch, key, head, d_head), the keys the scores
    use (after any rotary embedding, repeated to the query heads); dq: (batch, query, head, d_head).
    """
    shift = scale * torch.einsum("bqhd,bkhd->bhqk", dq, k)  # (batch, head, query, key)
    new = torch.softmax(pattern.log() + shift, dim=-1)  # masked keys stay at log 0 = -inf
    return ((new - pattern) * grad).sum(-1).transpose(1, 2)


def key_effects(pattern: torch.Tensor, q: torch.Tensor, dk: torch.Tensor, grad: torch.Tensor,
                scale: float) -> torch.Tensor:
    """(batch, key, head): the effect of changing each key by `dk`, every query row's softmax
    recomputed exactly (in closed form: one logit of the row moves, the rest rescale)."""
    dtype = pattern.dtype
    pattern, q, dk, grad = (t.double() for t in (pattern, q, dk, grad))  # differences of near-equal terms below
    shift = scale * torch.einsum("bqhd,bkhd->bhqk", q, dk)  # (batch, head, query, key): logit of key k moves
    log_a, rest = pattern.log(), (1 - pattern).clamp(min=0)  # rest: the other keys' weight
    new = (log_a + shift - torch.logaddexp(rest.log(), log_a + shift)).exp()  # the moved key's new weight
    ag = (pattern * grad).sum(-1, keepdim=True)  # (batch, head, query, 1)
    others = (ag - pattern * grad) / rest.clamp(min=1e-300)  # mean grad of the other keys (0 when none)
    return ((new - pattern) * (grad - others)).sum(2).transpose(1, 2).to(dtype)
