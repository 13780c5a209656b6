"""Interventions: plain values that say what to change in a run, composable and per example.

`patch`, `ablate`, `add`, `knockout` and `hook` build frozen dataclasses; `VLM.run` compiles
them into site functions. Each takes `batch=` (rows of the run it applies to), so one batched
forward can carry many different patches.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch

from vlmscope.errors import InterventionError
from vlmscope.model.cache import Cache
from vlmscope.model.positions import Positions, PositionSpec
from vlmscope.model.sites import SiteSpec

Batch = int | Sequence[int] | torch.Tensor | None


class RunContext(Protocol):
    def resolve(self, sites: str | Sequence[str]) -> list[str]: ...
    def spec(self, site: str) -> SiteSpec: ...
    def positions(self, stream: str) -> Positions: ...
    def attention_module(self, part: str, layer: int) -> str: ...
    def n_layers(self, part: str) -> int: ...


@dataclass(frozen=True)
class Patch:
    site: str
    source: Any  # Cache, {site: tensor} or a tensor
    positions: PositionSpec = None
    heads: Sequence[int] | None = None
    batch: Batch = None


@dataclass(frozen=True)
class Ablate:
    site: str
    how: Literal["zero", "mean", "resample"] = "zero"
    positions: PositionSpec = None
    heads: Sequence[int] | None = None
    neurons: Sequence[int] | None = None
    reference: Any = None  # mean/resample: a Cache, {site: tensor}, or a tensor
    batch: Batch = None
    seed: int = 0


@dataclass(frozen=True)
class Add:
    site: str
    vector: torch.Tensor
    scale: float = 1.0
    positions: PositionSpec = None
    batch: Batch = None


@dataclass(frozen=True)
class Knockout:
    src: PositionSpec
    dst: PositionSpec
    layers: Sequence[int] | None = None  # None: every layer of `part`
    part: str = "lm"
    batch: Batch = None


@dataclass(frozen=True)
class Hook:
    site: str
    fn: Callable[..., torch.Tensor | None]


Intervention = Patch | Ablate | Add | Knockout | Hook


def patch(site: str, source: Any, positions: PositionSpec = None, heads: Sequence[int] | None = None,
          batch: Batch = None) -> Patch:
    """Replace `site` (a name or glob) with the source's values at the given positions/heads/rows."""
    return Patch(site, source, positions, tuple(heads) if heads is not None else None, batch)


def ablate(site: str, how: Literal["zero", "mean", "resample"] = "zero", positions: PositionSpec = None,
           heads: Sequence[int] | None = None, neurons: Sequence[int] | None = None, reference: Any = None,
           batch: Batch = None, seed: int = 0) -> Ablate:
    """Zero, mean- or resample-ablate a site (optionally only some heads or neurons)."""
    if how not in ("zero", "mean", "resample"):
        raise InterventionError(f"unknown ablation {how!r}; valid: 'zero', 'mean', 'resample'")
    if how != "zero" and reference is None:
        raise InterventionError(f"{how} ablation needs reference= (a Cache or tensor of reference activations)")
    return Ablate(site, how, positions, tuple(heads) if heads is not None else None,
                  tuple(neurons) if neurons is not None else None, reference, batch, seed)


def add(site: str, vector: torch.Tensor, scale: float = 1.0, positions: PositionSpec = None,
        batch: Batch = None) -> Add:
    """Add `scale * vector` to a site (activation steering)."""
    return Add(site, vector, scale, positions, batch)


def knockout(src: PositionSpec, dst: PositionSpec, layers: Sequence[int] | None = None, part: str = "lm",
             batch: Batch = None) -> Knockout:
    """Stop `dst` positions from attending to `src` positions in `layers` (Geva et al. 2023).
    A position always keeps its edge to itself, so no attention row is left empty."""
    return Knockout(src, dst, tuple(layers) if layers is not None else None, part, batch)


def hook(site: str, fn: Callable[..., torch.Tensor | None]) -> Hook:
    """Run `fn(tensor, *, site) -> tensor | None` at a site."""
    return Hook(site, fn)


# --- compiling interventions into site functions ------------------------------------------------


def _rows(batch: Batch, n: int, site: str) -> torch.Tensor:
    rows = torch.zeros(n, dtype=torch.bool)
    if batch is None:
        rows[:] = True
        return rows
    idx = torch.as_tensor([batch] if isinstance(batch, int) else batch, dtype=torch.long).flatten()
    bad = idx[(idx < -n) | (idx >= n)].tolist()
    if bad:
        raise InterventionError(f"batch row(s) {bad} out of range for {site!r}, whose batch is {n}")
    rows[idx] = True
    return rows


def _index(spec: SiteSpec, t: torch.Tensor, ctx: RunContext, positions: PositionSpec, batch: Batch,
           heads: Sequence[int] | None = None, neurons: Sequence[int] | None = None,
           pos_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """Advanced-index tuple into `t` selecting the intervention's rows, positions, heads, neurons."""
    rows = _rows(batch, t.shape[0], spec.name)
    if heads is not None and not (spec.heads or spec.hook == "pattern"):
        raise InterventionError(f"heads= applies to attn.z and attn.pattern sites, not {spec.name!r}")
    if spec.pooled or spec.hook == "model_output":
        if positions is not None:
            raise InterventionError(f"{spec.name!r} has no position axis ({spec.layout}); drop positions=")
        (b,) = rows.nonzero(as_tuple=True)
        return (b[:, None], torch.as_tensor(neurons)[None]) if neurons is not None else (b,)
    seq_axis = 2 if spec.hook == "pattern" else 1
    if pos_mask is None and isinstance(positions, torch.Tensor) and positions.dtype == torch.bool \
            and tuple(positions.shape) == (t.shape[0], t.shape[seq_axis]):
        pos_mask = positions  # an exact mask needs no token-stream lookup
    if pos_mask is None:
        pos_mask = ctx.positions(spec.stream).select(positions)
    expected = (t.shape[0], t.shape[seq_axis])
    if tuple(pos_mask.shape) != expected:
        raise InterventionError(
            f"positions for {spec.name!r} cover {tuple(pos_mask.shape)} (batch, pos) but the activation has "
            f"{expected}"
        )
    b, p = (pos_mask.to(rows.device) & rows[:, None]).nonzero(as_tuple=True)
    if spec.hook == "pattern":
        h = torch.arange(t.shape[1]) if heads is None else torch.as_tensor(heads)
        _check_heads(h, t.shape[1], spec.name)
        return (b[:, None], h[None], p[:, None])
    if heads is not None:
        h = torch.as_tensor(heads)
        _check_heads(h, t.shape[2], spec.name)
        return (b[:, None], p[:, None], h[None])
    if neurons is not None:
        n = torch.as_tensor(neurons)
        if n.numel() and (n.max() >= t.shape[-1] or n.min() < -t.shape[-1]):
            raise InterventionError(f"neuron index out of range for {spec.name!r} with {t.shape[-1]} units")
        return (b[:, None], p[:, None], n[None])
    return (b, p)


def _check_heads(h: torch.Tensor, n: int, site: str) -> None:
    if h.numel() and (h.max() >= n or h.min() < -n):
        raise InterventionError(f"head index out of range for {site!r}, which has {n} heads (0..{n - 1})")


def _source_tensor(source: Any, site: str, t: torch.Tensor, what: str) -> torch.Tensor:
    if isinstance(source, torch.Tensor):
        s = source
    elif isinstance(source, Mapping):
        s = source[site]
    else:
        raise InterventionError(f"{what} for {site!r} must be a Cache, a {{site: tensor}} mapping or a tensor, "
                                f"got {type(source).__name__}")
    if s.dtype != t.dtype:
        raise InterventionError(f"{what} for {site!r} has dtype {s.dtype} but the activation is {t.dtype}; "
                                f"convert it with .to({t.dtype})")
    return s.to(t.device)


def _check_shape(s: torch.Tensor, t: torch.Tensor, site: str, what: str) -> None:
    if s.shape[1:] != t.shape[1:] or t.shape[0] % s.shape[0] != 0:
        raise InterventionError(
            f"{what} for {site!r} has shape {tuple(s.shape)} but the activation has shape {tuple(t.shape)}; "
            f"it needs batch {t.shape[0]} (or a divisor of it, tiled: 1 broadcasts) and the same remaining axes"
        )


def _src_index(idx: tuple[torch.Tensor, ...], s: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Run rows read source rows; a source with fewer rows is tiled (row % n)."""
    return (idx[0] % s.shape[0], *idx[1:])


def _kept_expand(source: Cache, site: str, stream: str, full: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A cache that stored only some positions: scatter them into a full-size tensor and a mask."""
    kept = source.kept[stream].cpu()  # (batch, k); the CPU mask below cannot take an index on another device
    part = source[site]
    out = torch.zeros((part.shape[0], *full.shape[1:]), dtype=part.dtype, device=full.device)
    rows = torch.arange(part.shape[0])[:, None]
    out[rows, kept] = part.to(full.device)
    mask = torch.zeros(part.shape[0], full.shape[1], dtype=torch.bool)
    mask[rows, kept] = True
    return out, mask


def _edit_fn(iv: Intervention, spec: SiteSpec, ctx: RunContext) -> Callable:
    """An in-place edit `edit(out, orig)` of a clone `out` of the site's value `orig`."""
    site = spec.name

    if isinstance(iv, Patch):
        def edit(out: torch.Tensor, orig: torch.Tensor) -> None:
            pos_mask = None
            if isinstance(iv.source, Cache) and spec.stream in iv.source.kept and not spec.pooled:
                s, kept_mask = _kept_expand(iv.source, site, spec.stream, orig)
                if iv.positions is None:
                    pos_mask = kept_mask.expand(orig.shape[0], -1) if kept_mask.shape[0] == 1 else kept_mask
            else:
                s = _source_tensor(iv.source, site, orig, "patch source")
            _check_shape(s, orig, site, "patch source")
            idx = _index(spec, orig, ctx, iv.positions, iv.batch, iv.heads, pos_mask=pos_mask)
            out[idx] = s[_src_index(idx, s)]
        return edit

    if isinstance(iv, Ablate):
        def edit(out: torch.Tensor, orig: torch.Tensor) -> None:
            idx = _index(spec, orig, ctx, iv.positions, iv.batch, iv.heads, iv.neurons)
            if iv.how == "zero":
                out[idx] = 0
                return
            ref = _source_tensor(iv.reference, site, orig, "ablation reference")
            if iv.how == "mean":
                if ref.shape == orig.shape[1:] or ref.dim() < orig.dim():  # already a mean
                    mean = ref.expand(orig.shape[1:]) if ref.shape != orig.shape[1:] else ref
                else:
                    if ref.shape[1:] != orig.shape[1:]:
                        raise InterventionError(
                            f"mean-ablation reference for {site!r} has shape {tuple(ref.shape)}; give a mean of "
                            f"shape {tuple(orig.shape[1:])} (or broadcastable) or samples "
                            f"(n, *{tuple(orig.shape[1:])})")
                    mean = ref.mean(0)
                full = mean.unsqueeze(0).expand_as(orig)
                out[idx] = full[idx]
            else:  # resample: each selected row takes a random reference row, same positions
                if ref.shape[1:] != orig.shape[1:]:
                    raise InterventionError(
                        f"resample reference for {site!r} has shape {tuple(ref.shape)}; it needs (n, "
                        f"{', '.join(map(str, orig.shape[1:]))})")
                g = torch.Generator().manual_seed(iv.seed)
                pick = torch.randint(ref.shape[0], (orig.shape[0],), generator=g).to(ref.device)
                out[idx] = ref[pick][idx]
        return edit

    if isinstance(iv, Add):
        def edit(out: torch.Tensor, orig: torch.Tensor) -> None:
            v = iv.vector.to(device=orig.device, dtype=orig.dtype)
            idx = _index(spec, orig, ctx, iv.positions, iv.batch)
            out[idx] = out[idx] + iv.scale * v
        return edit

    raise TypeError(f"not an in-place intervention: {iv!r}")


def _site_fn(edits: list[Callable]) -> Callable:
    def fn(t: torch.Tensor, *, site: str) -> torch.Tensor:
        out = t.clone()
        for e in edits:
            e(out, t)
        return out
    return fn


def compile_interventions(interventions: Sequence[Intervention], ctx: RunContext
                          ) -> tuple[dict[str, list[Callable]], dict[str, torch.Tensor]]:
    """Site functions (grouped so each site is cloned once per run of consecutive edits) and
    knockout edge masks keyed by attention-module path."""
    fns: dict[str, list[Callable]] = {}
    pending: dict[str, list[Callable]] = {}
    knock: dict[str, torch.Tensor] = {}

    def flush(site: str) -> None:
        if pending.get(site):
            fns.setdefault(site, []).append(_site_fn(pending.pop(site)))

    for iv in interventions:
        if isinstance(iv, Knockout):
            _compile_knockout(iv, ctx, knock)
            continue
        if not isinstance(iv, (Patch, Ablate, Add, Hook)):
            raise InterventionError(
                f"not an intervention: {iv!r}; build them with vs.patch, vs.ablate, vs.add, vs.knockout or vs.hook")
        for site in ctx.resolve(iv.site):
            if isinstance(iv, Hook):
                flush(site)
                fns.setdefault(site, []).append(iv.fn)
            else:
                pending.setdefault(site, []).append(_edit_fn(iv, ctx.spec(site), ctx))
    for site in list(pending):
        flush(site)
    return fns, knock


def _compile_knockout(iv: Knockout, ctx: RunContext, knock: dict[str, torch.Tensor]) -> None:
    n = ctx.n_layers(iv.part)
    layers = range(n) if iv.layers is None else iv.layers
    bad = [i for i in layers if not -n <= i < n]
    if bad:
        raise InterventionError(f"knockout layer(s) {bad} out of range: {iv.part!r} has {n} layers (0..{n - 1})")
    spec = ctx.spec(f"{iv.part}.blocks.0.attn.pattern")
    pos = ctx.positions(spec.stream)
    src, dst = pos.select(iv.src), pos.select(iv.dst)
    rows = _rows(iv.batch, src.shape[0], f"knockout on {iv.part}")
    edges = dst[:, :, None] & src[:, None, :] & rows[:, None, None]  # (batch, query, key)
    edges &= ~torch.eye(src.shape[1], dtype=torch.bool)
    for i in layers:
        path = ctx.attention_module(iv.part, i % n)
        knock[path] = knock[path] | edges if path in knock else edges
