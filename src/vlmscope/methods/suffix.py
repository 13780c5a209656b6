"""Exact patching sweeps that rerun only what a patch can change (used by `patching.patch_sweep`).

In a causal LM a patch at (block l, position p) leaves earlier positions and earlier blocks
untouched, so `SuffixRunner` reruns positions >= p on the base run's cached keys and values and
blocks >= l (earlier blocks skipped, block l started from the base run's residual). In the last
block only the read position matters downstream: its query / output projections, MLP and
attention run there alone, and the unembedding too (`logits_to_keep`). Every shortcut is checked
once against the full run and dropped where the model disagrees (multimodal RoPE, bidirectional
prefixes, blocks that return tuples).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from vlmscope.errors import UnsupportedModelError
from vlmscope.model import attention
from vlmscope.model.attention import AttnEdit
from vlmscope.model.interventions import patch


@contextmanager
def swapped(model: torch.nn.Module, replacements: dict[str, torch.nn.Module]) -> Iterator[None]:
    """Submodules replaced by path (a block of a ModuleList too: "layers.3") for the context."""
    saved = []
    try:
        for path, new in replacements.items():
            owner_path, _, attr = path.rpartition(".")
            owner = model.get_submodule(owner_path)
            saved.append((owner, attr, getattr(owner, attr)))
            setattr(owner, attr, new)
        yield
    finally:
        for owner, attr, old in reversed(saved):
            setattr(owner, attr, old)


def job_mask(mask: torch.Tensor, n: int, j: int) -> torch.Tensor:
    """The (n * rows, pos) mask selecting `mask` in the j-th tiled copy only."""
    full = torch.zeros((n * mask.shape[0], mask.shape[1]), dtype=torch.bool)
    full[j * mask.shape[0]:(j + 1) * mask.shape[0]] = mask
    return full


def first_position(mask: torch.Tensor) -> int:
    return int(mask.any(0).nonzero()[0])


SPREAD = 0.15  # a suffix chunk's rows may start at most this fraction of its suffix apart


def suffix_chunks(vlm, jobs, per_forward: int, length: int):
    """Consecutive jobs (sorted by layer, then position, latest first) batched together while they
    share a layer and their first positions lie close: every row reruns the chunk's longest suffix,
    so rows far apart would waste work."""
    chunk: list = []
    for job in jobs:
        layer, p = vlm.site(job[2]).layer or 0, first_position(job[4])
        if chunk:
            first_layer, first_p = vlm.site(chunk[0][2]).layer or 0, first_position(chunk[0][4])
            if len(chunk) == per_forward or layer != first_layer or first_p - p > SPREAD * (length - p):
                yield chunk
                chunk = []
        chunk.append(job)
    if chunk:
        yield chunk


class _AtPositions(torch.nn.Module):
    """Stands in for a position-wise module of the last block (query or output projection, MLP):
    computes it at one position per row, the one whose logits are read; other positions get
    zeros, which nothing downstream of them reads."""

    def __init__(self, module: torch.nn.Module, positions: torch.Tensor):
        super().__init__()
        self.module, self.positions = module, positions

    def forward(self, x, *args, **kwargs):
        if x.dim() != 3 or x.shape[0] != len(self.positions):
            return self.module(x, *args, **kwargs)
        rows = torch.arange(x.shape[0], device=x.device)
        at = self.positions.to(x.device)
        y = self.module(x[rows, at].unsqueeze(1), *args, **kwargs)
        out = y.new_zeros(x.shape[:2] + y.shape[2:])
        out[rows, at] = y[:, 0]
        return out


class _Skip(torch.nn.Module):
    """Stands in for a block whose output the suffix run already knows: returns its input."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


class SuffixRunner:
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
        trims = [("trimmed", path) for path in runner.trimmed] + [("logits_to_keep", True),
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
            setattr(runner, name, [*before, value] if isinstance(before, list) else value)
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
        swaps: dict[str, torch.nn.Module] = {f"{self.layers_path}.{i}": _Skip() for i in range(skip)}
        if trim:
            swaps |= {path: _AtPositions(self.vlm.model.get_submodule(path), last) for path in self.trimmed}
        one = {self.vlm.model.get_submodule(self.one_query): AttnEdit(queries=last)} if trim and self.one_query else {}
        with swapped(self.vlm.model, swaps), attention.override(one):
            out = self.vlm.run(inputs, ivs, **kwargs)
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
            ivs.append(patch(target, {target: source[site][:, p:]}, positions=job_mask(mask[:, p:], n, j),
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
