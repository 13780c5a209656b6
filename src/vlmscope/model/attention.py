"""Attention patterns and knockout under any attention implementation, for one run.

transformers computes attention through a dispatch table (`ALL_ATTENTION_FUNCTIONS`) keyed by
`config._attn_implementation`. Inside `override(...)` vlmscope routes the chosen attention
modules through a wrapper and restores the table on exit:

- pattern reads under `sdpa` (the default, which returns no weights): the output still comes
  from sdpa, untouched, and the probabilities are computed on the side with the model file's own
  `eager_attention_forward` (same scaling, mask and soft-capping). Logits stay bit-identical.
- pattern writes: the head outputs are recomputed as pattern @ values.
- knockout: the mask handed to the implementation blocks the chosen (query, key) edges, so it
  works with sdpa and eager alike.
- one query per row (`AttnEdit.queries`): only those queries are computed, against every key;
  the other positions' head outputs are zeros (for runs that read nothing downstream of them).
- block-diagonal attention (a module that calls the attention function once per block of its
  input: packed images, attention windows): each call covers the next span of the module's
  sequence; knockout edges are cut to that span, and the pattern is read as the whole
  block-diagonal (batch, heads, seq, seq) matrix once the last block ran. Writing such a pattern
  is refused (the earlier blocks' outputs are already computed).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from vlmscope.errors import InterventionError, UnsupportedModelError

PatternFn = Callable[[torch.Tensor], "torch.Tensor | None"]


@dataclass
class AttnEdit:
    """What to do in one attention module during a run."""

    pattern_fns: list[PatternFn] = field(default_factory=list)
    knock: torch.Tensor | None = None  # (batch, query, key) bool: edges to block
    seq: int | None = None  # length of the module's input sequence in the current call
    offset: int = 0  # where the next attention call starts within it (block-diagonal attention)
    blocks: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # (start, pattern) read so far
    queries: torch.Tensor | None = None  # (batch,) the one query per row to compute; others get zeros

    def begin(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook of the attention module: a new sequence starts."""
        t = args[0] if args else kwargs.get("hidden_states")
        self.seq = t.shape[-2] if isinstance(t, torch.Tensor) and t.dim() >= 2 else None
        self.offset, self.blocks = 0, []

    def span(self, length: int) -> tuple[int, int] | None:
        """The (start, stop) of this attention call within the module's sequence, or None when the
        call covers all of it."""
        if self.seq is None or (self.offset == 0 and length == self.seq):
            return None
        start, self.offset = self.offset, self.offset + length
        return start, self.offset

    def read_block(self, module: nn.Module, weights: torch.Tensor, start: int) -> None:
        """Collect one block's pattern; after the last, show the block-diagonal whole to the fns."""
        self.blocks.append((start, weights))
        if self.offset < self.seq:
            return
        b, h = weights.shape[:2]
        full = weights.new_zeros(b, h, self.seq, self.seq)  # (batch, heads, seq, seq)
        for s0, w in self.blocks:
            full[:, :, s0:s0 + w.shape[-2], s0:s0 + w.shape[-1]] = w
        for fn in self.pattern_fns:
            if fn(full) is not None:
                raise InterventionError(
                    f"{type(module).__name__} attends in {len(self.blocks)} separate blocks (packed images "
                    "or attention windows), so its attn.pattern can be read and knocked out but not "
                    "written (nor differentiated with grad_metric)"
                )


def _module_file(module: nn.Module):
    return sys.modules[type(module).__module__]


def _causal(module: nn.Module, kwargs: dict) -> bool:
    flag = kwargs.get("is_causal")
    return bool(getattr(module, "is_causal", True) if flag is None else flag)


def _repeat_kv(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    groups = n_heads // x.shape[1]
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def float_mask(mask, query, key, causal: bool) -> torch.Tensor | None:
    """The additive float mask that eager attention expects, from whatever the run holds."""
    tq, tk = query.shape[-2], key.shape[-2]
    neg = torch.finfo(query.dtype).min
    if mask is None:
        if not (causal and tq > 1):
            return None
        blocked = torch.ones(tq, tk, dtype=torch.bool, device=query.device).triu(tk - tq + 1)
        return torch.zeros(tq, tk, dtype=query.dtype, device=query.device).masked_fill(blocked, neg)[None, None]
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=query.dtype, device=mask.device).masked_fill(~mask, neg)
    return mask


def knocked_mask(mask, knock: torch.Tensor, query, key, causal: bool, as_float: bool) -> torch.Tensor:
    """`mask` with the edges in `knock` (batch, query, key) blocked, in the mask's own format."""
    b, _, tq, _ = query.shape
    tk = key.shape[-2]
    if tuple(knock.shape) != (b, tq, tk):
        raise InterventionError(
            f"knockout edges have shape {tuple(knock.shape)} but this attention call has batch {b}, "
            f"{tq} queries and {tk} keys; knockout needs a full forward pass (no key/value cache)"
        )
    knock = knock.to(query.device)[:, None]  # (batch, 1, query, key)
    if mask is None:
        allowed = torch.ones(tq, tk, dtype=torch.bool, device=query.device)
        if causal and tq > 1:
            allowed = allowed.tril(tk - tq)
        mask = allowed[None, None].expand(b, 1, tq, tk)
        if as_float:
            mask = float_mask(mask, query, key, causal)
    if mask.dtype == torch.bool:
        return mask.expand(b, -1, tq, tk) & ~knock
    return mask.expand(b, -1, tq, tk).masked_fill(knock, torch.finfo(mask.dtype).min)


def _one_query(fallback, module, query, key, value, mask, queries, causal, args, kwargs):
    """Attention for one query per row (the rest of the output is zeros): what a run that reads
    only those positions downstream needs. The keys and values stay whole."""
    b, _, tq, _ = query.shape
    rows, at = torch.arange(b, device=query.device), queries.to(query.device)
    if mask is None:
        mask = float_mask(None, query, key, causal)  # (1, 1, tq, tk) or None
    if mask is not None:
        mask = mask.expand(b, -1, tq, -1)[rows, :, at].unsqueeze(2)  # (batch, 1 | heads, 1, tk)
    out, _ = fallback(module, query[rows, :, at].unsqueeze(2), key, value, mask, *args, **kwargs)
    full = out.new_zeros(b, tq, *out.shape[2:])  # (batch, query, heads, d_head)
    full[rows, at] = out[:, 0]
    return full, None


def _wrapper(impl: str, original: Callable | None, edits: dict[int, AttnEdit]) -> Callable:
    eager = impl == "eager"

    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        fallback = original or _module_file(module).eager_attention_forward
        edit = edits.get(id(module))
        if edit is None:
            return fallback(module, query, key, value, attention_mask, *args, **kwargs)
        causal = _causal(module, kwargs)
        if edit.queries is not None:
            return _one_query(fallback, module, query, key, value, attention_mask, edit.queries, causal, args, kwargs)
        span = edit.span(query.shape[-2])
        if edit.knock is not None:
            knock = edit.knock if span is None else edit.knock[:, span[0]:span[1], span[0]:span[1]]
            attention_mask = knocked_mask(attention_mask, knock, query, key, causal, as_float=eager)
        if not edit.pattern_fns:
            return fallback(module, query, key, value, attention_mask, *args, **kwargs)
        out, weights = fallback(module, query, key, value, attention_mask, *args, **kwargs)
        if weights is None:  # sdpa & co: compute the probabilities on the side
            side = {k: v for k, v in kwargs.items() if k != "is_causal"}
            side["dropout"] = 0.0
            eager_fn = _module_file(module).eager_attention_forward
            _, weights = eager_fn(module, query, key, value, float_mask(attention_mask, query, key, causal),
                                  *args, **side)
        if span is not None:
            edit.read_block(module, weights, span[0])
            return out, weights
        new = weights
        for fn in edit.pattern_fns:
            r = fn(new)
            if r is not None:
                new = r
        if new is not weights:  # a write: the heads' outputs follow the new pattern
            v = _repeat_kv(value, new.shape[1])
            out = torch.matmul(new.to(v.dtype), v).transpose(1, 2).contiguous()  # (batch, query, heads, d_head)
        return out, new

    return attention


@contextmanager
def override(modules: dict[nn.Module, AttnEdit]) -> Iterator[None]:
    """Route the given attention modules through vlmscope for the duration of the context."""
    if not modules:
        yield
        return
    tables: dict[int, tuple[object, set[str]]] = {}
    for mod in modules:
        table = getattr(_module_file(mod), "ALL_ATTENTION_FUNCTIONS", None)
        impl = getattr(getattr(mod, "config", None), "_attn_implementation", None)
        if table is None or impl is None:
            raise UnsupportedModelError(
                f"{type(mod).__name__} does not dispatch through transformers' attention interface, "
                "so vlmscope cannot read its pattern or knock edges out"
            )
        tables.setdefault(id(table), (table, set()))[1].add(impl)
    edits = {id(m): e for m, e in modules.items()}
    saved: list[tuple[object, str, object]] = []
    missing = object()
    handles = [m.register_forward_pre_hook(e.begin, with_kwargs=True) for m, e in modules.items()]
    try:
        for table, impls in tables.values():
            local = table._local_mapping  # type: ignore[attr-defined]
            for impl in impls:
                saved.append((table, impl, local.get(impl, missing)))
                original = None if impl == "eager" else table[impl]  # type: ignore[index]
                local[impl] = _wrapper(impl, original, edits)
        yield
    finally:
        for h in handles:
            h.remove()
        for table, impl, old in reversed(saved):
            local = table._local_mapping  # type: ignore[attr-defined]
            if old is missing:
                local.pop(impl, None)
            else:
                local[impl] = old
