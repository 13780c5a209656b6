"""Activation patching (Vig et al. 2020; Meng et al. 2022): which sites and positions carry the
information that separates a clean run from a corrupt one.

Denoising runs the corrupt input and patches in clean activations (what is *sufficient* to
restore the answer); noising runs the clean input and patches in corrupt ones (what is
*necessary*). Effects are normalised so the clean run scores 1 and the corrupt run 0. Many
patches ride in one forward: each job (component x position group) owns rows of a batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from vlmscope.errors import InputError
from vlmscope.methods.corruptions import check_same_layout
from vlmscope.methods.metrics import Metric, last_logits, metric_name, normalise
from vlmscope.methods.suffix import SuffixRunner, first_position, job_mask, suffix_chunks
from vlmscope.model.interventions import Intervention, Patch, patch
from vlmscope.model.positions import IMAGE, Positions
from vlmscope.results import Result, long_frame

Groups = str | Mapping[str, Any] | Sequence[Any]


@dataclass(frozen=True, repr=False)
class PatchingResult(Result):
    """Normalised effect of patching each component (site, or site:head) at each position group."""

    kind = "patching"
    direction: str
    metric: str
    components: tuple[str, ...]
    groups: tuple[str, ...]
    effect: torch.Tensor  # (component, group): mean over pairs; NaN where a group is empty
    per_pair: torch.Tensor  # (pair, component, group), normalised
    raw: torch.Tensor  # (pair, component, group), the metric itself
    clean: torch.Tensor  # (pair,)
    corrupt: torch.Tensor  # (pair,)
    group_row: torch.Tensor  # (group,) patch row of single-patch groups, else -1
    group_col: torch.Tensor  # (group,)
    approximate: bool = False  # attribution patching (a first-order estimate)

    def to_dataframe(self):
        df = long_frame(self.effect, ("component", "group"),
                        {"component": list(self.components), "group": list(self.groups)}, "effect")
        df["direction"], df["metric"], df["approximate"] = self.direction, self.metric, self.approximate
        return df

    def patch_map(self, component: str) -> torch.Tensor:
        """(rows, cols) effects of single-patch groups of one component, laid over the image grid."""
        ci = self.components.index(component)
        sel = self.group_row >= 0
        if not sel.any():
            raise ValueError("this result has no single-patch groups; sweep with positions='patches'")
        h, w = int(self.group_row[sel].max()) + 1, int(self.group_col[sel].max()) + 1
        grid = torch.full((h, w), float("nan"))
        grid[self.group_row[sel], self.group_col[sel]] = self.effect[ci, sel]
        return grid


@dataclass(frozen=True)
class _Group:
    label: str
    spec: Any
    row: int = -1
    col: int = -1


def position_groups(pos: Positions, groups: Groups) -> list[_Group]:
    """Named position groups of a stream: 'each' position, 'patches' (each image patch), 'roles'
    (image / text / last), 'all', a {name: spec} mapping or a list of specs."""
    if isinstance(groups, str):
        if groups == "each":
            return [_Group(str(i), [i]) for i in range(pos.shape[1])]
        if groups == "patches":
            img = pos.role[0] == IMAGE
            cells = sorted({(r, c) for r, c in zip(pos.row[0, img].tolist(), pos.col[0, img].tolist()) if r >= 0})
            return [_Group(f"r{r}c{c}", (pos.row == r) & (pos.col == c) & (pos.role == IMAGE), r, c) for r, c in cells]
        if groups == "roles":
            return [_Group("image", "image"), _Group("text", "text"), _Group("last", "last")]
        if groups == "all":
            return [_Group("all", None)]
        raise InputError(f"unknown position groups {groups!r}; valid: 'each', 'patches', 'roles', 'all', "
                         "a {name: positions} mapping or a list of position specs")
    if isinstance(groups, Mapping):
        return [_Group(str(k), v) for k, v in groups.items()]
    return [_Group(str(g), g) for g in groups]


def _components(vlm, sites, heads: bool) -> list[tuple[str, str, int | None]]:
    names = vlm_sites(vlm, sites)
    out = []
    for s in names:
        spec = vlm.site(s)
        if heads:
            if not spec.heads:
                raise InputError(f"heads=True needs attn.z sites (per-head); {s!r} has no head axis")
            out += [(f"{s}:h{h}", s, h) for h in range(spec.heads)]
        else:
            out.append((s, s, None))
    return out


def vlm_sites(vlm, sites) -> list[str]:
    from vlmscope.model.sites import resolve

    return resolve(sites, vlm.site_table)


def _metric_of(vlm, out, inputs, metric: Metric) -> torch.Tensor:
    return metric(last_logits(vlm, out, inputs)).float().cpu()


def _tile(inputs: Mapping[str, Any], n: int) -> dict[str, Any]:
    return {k: v.repeat(n, *[1] * (v.dim() - 1)) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def patch_sweep(vlm, clean: Mapping[str, Any], corrupt: Mapping[str, Any], metric: Metric,
                sites: str | Sequence[str] = "lm.blocks.*.resid_post", positions: Groups = "each",
                direction: Literal["denoise", "noise"] = "denoise", heads: bool = False, batch_size: int = 32,
                corrupt_interventions: Sequence[Intervention] = (), prefix_reuse: bool = True,
                skip_unchanged: bool = True) -> PatchingResult:
    """Exact activation patching of every component x position group.

    clean/corrupt: inputs with equal token layouts (SIP, STR), or the same inputs with
    `corrupt_interventions` (e.g. `gaussian_noise(...)`) making the corrupt run.
    prefix_reuse: in a causal LM a patch at position p cannot change positions before p, so
    LM-site patches rerun only the suffix from p, on the base run's cached keys and values
    (checked once against the full run; off when the model or the corruption rules it out).
    skip_unchanged: a patch that writes exactly the values the base run already has there (e.g.
    every position before the replaced token of an STR pair) is the identity: its metric is the
    base run's, taken without a forward.
    """
    if direction not in ("denoise", "noise"):
        raise InputError(f"direction must be 'denoise' or 'noise', got {direction!r}")
    check_same_layout(vlm, clean, corrupt)
    comps = _components(vlm, sites, heads)
    site_names = sorted({c[1] for c in comps}, key=list(vlm.site_table).index)
    clean_out, clean_cache = vlm.run_with_cache(clean, site_names)
    corrupt_out, corrupt_cache = vlm.run_with_cache(corrupt, site_names, interventions=corrupt_interventions)
    m_clean = _metric_of(vlm, clean_out, clean, metric)
    m_corrupt = _metric_of(vlm, corrupt_out, corrupt, metric)
    if direction == "denoise":
        base, base_ivs, source = corrupt, list(corrupt_interventions), clean_cache
    else:
        base, base_ivs, source = clean, [], corrupt_cache
    streams = vlm.positions(base)
    stream_groups = {st: position_groups(p, positions) for st, p in streams.items()}
    labels: list[str] = []
    meta: dict[str, tuple[int, int]] = {}
    for gs in stream_groups.values():
        for g in gs:
            if g.label not in meta:
                labels.append(g.label)
                meta[g.label] = (g.row, g.col)
    pairs = clean["input_ids"].shape[0] if "input_ids" in clean else 1
    jobs = []  # (component index, group index, intervention builder args)
    for ci, (_, site, head) in enumerate(comps):
        stream = vlm.site(site).stream
        for g in stream_groups[stream]:
            mask = streams[stream].select(g.spec)
            if mask.any():
                jobs.append((ci, labels.index(g.label), site, head, mask))
    raw = torch.full((pairs, len(comps), len(labels)), float("nan"))
    if skip_unchanged:
        base_cache, m_base = (corrupt_cache, m_corrupt) if direction == "denoise" else (clean_cache, m_clean)
        same = [_unchanged(vlm, source, base_cache, j) for j in jobs]
        _store(raw, [j for j, s in zip(jobs, same) if s], m_base.expand(sum(same), pairs))
        jobs = [j for j, s in zip(jobs, same) if not s]
    per_forward = max(1, batch_size // pairs)
    suffix = SuffixRunner.make(vlm, base, base_ivs) if prefix_reuse else None
    plain_jobs = [j for j in jobs if suffix is None or not suffix.accepts(vlm.site(j[2]))]
    suffix_jobs = [j for j in jobs if suffix is not None and suffix.accepts(vlm.site(j[2]))]
    for start in range(0, len(plain_jobs), per_forward):
        chunk = plain_jobs[start:start + per_forward]
        n = len(chunk)
        inputs = _tile(base, n)
        ivs: list[Intervention] = [_tiled(iv, n) for iv in base_ivs]
        for j, (_, _, site, head, mask) in enumerate(chunk):
            ivs.append(patch(site, source, positions=job_mask(mask, n, j), heads=None if head is None else [head]))
        out = vlm.run(inputs, ivs)
        _store(raw, chunk, _metric_of(vlm, out, inputs, metric).view(n, pairs))
    # suffix jobs by layer then position, latest first: each forward shares its skipped blocks
    # and a long reused prefix
    suffix_jobs.sort(key=lambda j: (-(vlm.site(j[2]).layer or 0), -first_position(j[4])))
    for chunk in suffix_chunks(vlm, suffix_jobs, per_forward, suffix.length if suffix else 0):
        p0 = min(first_position(j[4]) for j in chunk)
        values = suffix.run(chunk, p0, source, metric)
        _store(raw, chunk, values)
    per_pair = normalise(raw, m_clean[:, None, None], m_corrupt[:, None, None])
    return PatchingResult(
        direction=direction, metric=metric_name(metric), components=tuple(c[0] for c in comps),
        groups=tuple(labels), effect=per_pair.nanmean(0) if pairs > 1 else per_pair[0], per_pair=per_pair,
        raw=raw, clean=m_clean, corrupt=m_corrupt, group_row=torch.tensor([meta[g][0] for g in labels]),
        group_col=torch.tensor([meta[g][1] for g in labels]),
    )


def _unchanged(vlm, source, base, job) -> bool:
    """Whether a job's patch writes exactly the values the base run has at its positions."""
    _, _, site, head, mask = job
    a, b = source[site], base[site]
    if vlm.site(site).hook == "pattern" or a.shape != b.shape or tuple(a.shape[:2]) != tuple(mask.shape):
        return False
    if head is not None:
        a, b = a[:, :, head], b[:, :, head]
    mask = mask.to(a.device)
    return torch.equal(a[mask], b[mask])


def _store(raw: torch.Tensor, chunk, values: torch.Tensor) -> None:
    for j, (ci, gi, *_rest) in enumerate(chunk):
        raw[:, ci, gi] = values[j]


def _tiled(iv: Intervention, n: int) -> Intervention:
    """A base intervention (e.g. the noise corruption) repeated over n tiled copies of the batch."""
    if isinstance(iv, Patch) and isinstance(iv.positions, torch.Tensor) and iv.positions.dtype == torch.bool:
        return Patch(iv.site, iv.source, iv.positions.repeat(n, 1), iv.heads, iv.batch)
    return iv
