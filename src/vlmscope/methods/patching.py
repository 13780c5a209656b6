"""Activation patching (Vig et al. 2020; Meng et al. 2022): which sites and positions carry the
information that separates a clean run from a corrupt one.

Denoising runs the corrupt input and patches in clean activations (what is *sufficient* to
restore the answer); noising runs the clean input and patches in corrupt ones (what is
*necessary*). Effects are normalised so the clean run scores 1 and the corrupt run 0. Many
patches ride in one forward: each job (component x position group) owns rows of a batch.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from vlmscope.errors import InputError, UnsupportedModelError
from vlmscope.methods.corruptions import check_same_layout
from vlmscope.methods.metrics import Metric, last_logits, metric_name, normalise
from vlmscope.model import attention
from vlmscope.model.attention import AttnEdit
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
    suffix = _SuffixRunner.make(vlm, base, base_ivs) if prefix_reuse else None
    plain_jobs = [j for j in jobs if suffix is None or not suffix.accepts(vlm.site(j[2]))]
    suffix_jobs = [j for j in jobs if suffix is not None and suffix.accepts(vlm.site(j[2]))]
    for start in range(0, len(plain_jobs), per_forward):
        chunk = plain_jobs[start:start + per_forward]
        n = len(chunk)
        inputs = _tile(base, n)
        ivs: list[Intervention] = [_tiled(iv, n) for iv in base_ivs]
        for j, (_, _, site, head, mask) in enumerate(chunk):
            ivs.append(patch(site, source, positions=_job_mask(mask, n, j), heads=None if head is None else [head]))
        out = vlm.run(inputs, ivs)
        _store(raw, chunk, _metric_of(vlm, out, inputs, metric).view(n, pairs))
    # suffix jobs by layer then position, latest first: each forward shares its skipped blocks
    # and a long reused prefix
    suffix_jobs.sort(key=lambda j: (-(vlm.site(j[2]).layer or 0), -_first_position(j[4])))
    for chunk in _suffix_chunks(vlm, suffix_jobs, per_forward, suffix.length if suffix else 0):
        p0 = min(_first_position(j[4]) for j in chunk)
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


def _job_mask(mask: torch.Tensor, n: int, j: int) -> torch.Tensor:
    """The (n * rows, pos) mask selecting `mask` in the j-th tiled copy only."""
    full = torch.zeros((n * mask.shape[0], mask.shape[1]), dtype=torch.bool)
    full[j * mask.shape[0]:(j + 1) * mask.shape[0]] = mask
    return full


def _first_position(mask: torch.Tensor) -> int:
    return int(mask.any(0).nonzero()[0])


SPREAD = 0.15  # a suffix chunk's rows may start at most this fraction of its suffix apart


def _suffix_chunks(vlm, jobs, per_forward: int, length: int):
    """Consecutive jobs (sorted by layer, then position, latest first) batched together while they
    share a layer and their first positions lie close: every row reruns the chunk's longest suffix,
    so rows far apart would waste work."""
    chunk: list = []
    for job in jobs:
        layer, p = vlm.site(job[2]).layer or 0, _first_position(job[4])
        if chunk:
            first_layer, first_p = vlm.site(chunk[0][2]).layer or 0, _first_position(chunk[0][4])
            if len(chunk) == per_forward or layer != first_layer or first_p - p > SPREAD * (length - p):
                yield chunk
                chunk = []
        chunk.append(job)
    if chunk:
        yield chunk


def _store(raw: torch.Tensor, chunk, values: torch.Tensor) -> None:
    for j, (ci, gi, *_rest) in enumerate(chunk):
        raw[:, ci, gi] = values[j]


class _AtPositions(torch.nn.Module):
    """Stands in for a position-wise module of the last block (query or output projection, MLP):
    computes it at one position per row, the one whose logits are read; other positions get
    zeros, which nothing downstream of them reads."""

    def __init__(self, mlp: torch.nn.Module, positions: torch.Tensor):
        super().__init__()
        self.mlp, self.positions = mlp, positions

    def forward(self, x, *args, **kwargs):
        if x.dim() != 3 or x.shape[0] != len(self.positions):
            return self.mlp(x, *args, **kwargs)
        rows = torch.arange(x.shape[0], device=x.device)
        at = self.positions.to(x.device)
        y = self.mlp(x[rows, at].unsqueeze(1), *args, **kwargs)
        out = y.new_zeros(x.shape[:2] + y.shape[2:])
        out[rows, at] = y[:, 0]
        return out


class _Skip(torch.nn.Module):
    """Stands in for a block whose output the suffix run already knows: returns its input."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


class _SuffixRunner:
    """Reruns only what a patch at (layer l, position p) can change in a causal LM: positions
    >= p (on the base run's cached keys and values) and blocks >= l (earlier blocks are
    skipped, and block l starts from the base run's residual)."""

    def __init__(self, vlm, base, cache, kv, last, n_layers: int, skip_layers: bool):
        self.vlm, self.base, self.cache, self.kv, self.last = vlm, base, cache, kv, last
        self.n_layers, self.skip_layers = n_layers, skip_layers
        self.length = cache["lm.embed"].shape[1]
        self.layers_path = vlm.site("lm.blocks.0.resid_pre").module.rsplit(".", 1)[0]
        # the last block's query and output projections, its MLP and the unembedding matter only at
        # the positions whose logits are read (its keys and values are needed everywhere)
        b = f"lm.blocks.{n_layers - 1}"
        self.trimmed = [vlm.site(s).module for s in (f"{b}.attn.q", f"{b}.attn.z", f"{b}.mlp.out")
                        if s in vlm.site_table]
        self.one_query = vlm.site(f"{b}.attn.pattern").module if f"{b}.attn.pattern" in vlm.site_table else None
        self.logits_to_keep = True

    @classmethod
    def make(cls, vlm, base, base_ivs):
        if not vlm.adapter.lm_causal or "lm.embed" not in vlm.site_table:
            return None
        if any(_site_of(iv) != "lm.embed" for iv in base_ivs):
            return None  # other corruptions would need re-applying inside the suffix
        n = vlm.n_layers("lm")
        try:
            out, cache = vlm.run_with_cache(base, ["lm.embed", "lm.blocks.*.resid_pre", "lm.blocks.0.resid_post"],
                                            interventions=base_ivs, use_cache=True)
        except (TypeError, ValueError):
            return None
        kv = out.get("cache", None) if hasattr(out, "get") else None
        kv = kv if kv is not None else getattr(out, "past_key_values", None)
        if kv is None or not hasattr(kv, "layers"):
            return None
        last = vlm.positions(base)["lm"].last()
        full = out.logits[torch.arange(len(last)), last]
        p = int(last.min())
        # blocks can be skipped only if they return the residual itself (not a tuple)
        skip = isinstance(cache["lm.blocks.0.resid_post"], torch.Tensor) and n > 1
        runner = cls(vlm, base, cache, kv, last, n, skip)
        trims = [("trimmed", [path]) for path in runner.trimmed] + [("logits_to_keep", True),
                                                                    ("one_query", runner.one_query)]
        runner.trimmed, runner.logits_to_keep, runner.one_query = [], False, None
        try:  # a model whose positions do not follow the cache (e.g. multimodal RoPE) fails here
            if skip and not torch.allclose(runner._logits(p, 1, [], n - 1), full, atol=1e-4, rtol=1e-4):
                runner.skip_layers = False
            if not torch.allclose(runner._logits(p, 1, [], 0), full, atol=1e-4, rtol=1e-4):
                return None
        except (TypeError, ValueError, RuntimeError, IndexError, KeyError):
            return None
        for name, value in trims:  # each shortcut is kept only if the model gives the same logits
            before = getattr(runner, name)
            setattr(runner, name, before + value if name == "trimmed" else value)
            try:
                same = torch.allclose(runner._logits(p, 1, [], 0), full, atol=1e-4, rtol=1e-4)
            except (TypeError, ValueError, RuntimeError, IndexError, KeyError, AttributeError,
                    UnsupportedModelError):
                same = False
            if not same:
                setattr(runner, name, before)
        return runner

    def accepts(self, spec) -> bool:
        return spec.stream == "lm" and spec.hook != "pattern"

    def _logits(self, p: int, n: int, ivs, layer: int, trim: bool = True) -> torch.Tensor:
        kv = copy.deepcopy(self.kv)
        for kv_layer in kv.layers:
            kv_layer.keys = kv_layer.keys[:, :, :p].repeat(n, 1, 1, 1)
            kv_layer.values = kv_layer.values[:, :, :p].repeat(n, 1, 1, 1)
        inputs = {"inputs_embeds": self.cache["lm.embed"][:, p:].repeat(n, 1, 1), "cache": kv}
        if "attention_mask" in self.base:
            inputs["attention_mask"] = self.base["attention_mask"].repeat(n, 1)
        skip = layer if self.skip_layers else 0
        if skip:
            start = f"lm.blocks.{skip}.resid_pre"
            known = self.cache[start][:, p:]
            everywhere = torch.ones(n * known.shape[0], known.shape[1], dtype=torch.bool)
            ivs = [patch(start, {start: known}, positions=everywhere)] + list(ivs)
        last = (self.last - p).repeat(n)
        kwargs, read = {}, last
        if trim and self.logits_to_keep:
            kept = torch.unique(last)
            kwargs["logits_to_keep"], read = kept, torch.searchsorted(kept, last)
        blocks = self.vlm.model.get_submodule(self.layers_path)
        kept_blocks = [blocks[i] for i in range(skip)]
        swaps = []
        for path in self.trimmed if trim else []:
            owner_path, attr = path.rsplit(".", 1)
            owner = self.vlm.model.get_submodule(owner_path)
            swaps.append((owner, attr, getattr(owner, attr)))
        try:
            for i in range(skip):
                blocks[i] = _Skip()
            for owner, attr, module in swaps:
                setattr(owner, attr, _AtPositions(module, last))
            one = {self.vlm.model.get_submodule(self.one_query): AttnEdit(queries=last)} if (
                trim and self.one_query) else {}
            with attention.override(one):
                out = self.vlm.run(inputs, ivs, **kwargs)
        finally:
            for i, block in enumerate(kept_blocks):
                blocks[i] = block
            for owner, attr, module in swaps:
                setattr(owner, attr, module)
        read = read.to(out.logits.device)
        return out.logits[torch.arange(len(read), device=read.device), read]

    def run(self, chunk, p: int, source, metric) -> torch.Tensor:
        p = min(p, int(self.last.min()))
        layer = min(self.vlm.site(j[2]).layer or 0 for j in chunk)
        n, rows = len(chunk), len(self.last)
        # a residual-output patch at block l is an input patch at block l + 1: block l need not rerun
        shift = self.skip_layers and layer + 1 < self.n_layers and all(
            j[2] == f"lm.blocks.{self.vlm.site(j[2]).layer}.resid_post" for j in chunk)
        ivs = []
        for j, (_, _, site, head, mask) in enumerate(chunk):
            target = f"lm.blocks.{self.vlm.site(site).layer + 1}.resid_pre" if shift else site
            ivs.append(patch(target, {target: source[site][:, p:]}, positions=_job_mask(mask[:, p:], n, j),
                             heads=None if head is None else [head]))
        # a patch inside the last MLP or on the logits needs them at every position
        trim = not any(self._needs_all_positions(j[2]) for j in chunk)
        return metric(self._logits(p, n, ivs, layer + shift, trim)).float().cpu().view(n, rows)

    def _needs_all_positions(self, site: str) -> bool:
        module = self.vlm.site(site).module
        cut = [*self.trimmed, *([self.one_query] if self.one_query else [])]
        return site == "lm.logits" or any(module == t or module.startswith(t + ".") for t in cut)


def _site_of(iv) -> str | None:
    return getattr(iv, "site", None)


def _tiled(iv: Intervention, n: int) -> Intervention:
    """A base intervention (e.g. the noise corruption) repeated over n tiled copies of the batch."""
    if isinstance(iv, Patch) and isinstance(iv.positions, torch.Tensor) and iv.positions.dtype == torch.bool:
        return Patch(iv.site, iv.source, iv.positions.repeat(n, 1), iv.heads, iv.batch)
    return iv
