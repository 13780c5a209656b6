"""Running a whole job on the `meta` device: shapes without memory, and the few values it branches on.

A forward on meta tensors allocates nothing and gives every intermediate its exact shape, but a VLM
also reads values: it counts image tokens (`(ids == image_id).sum()`), selects rows with boolean
masks, loops over `image_grid_thw.tolist()`. Those values come from the inputs, never from the
weights. Inside `ShadowMeta` a meta tensor computed only from inputs and constants carries a real
CPU copy (its shadow; up to MAX_SHADOW elements), and data-dependent operations (`.item()`,
`nonzero`, boolean indexing, `.tolist()`) are answered from it. A value the weights decide is
unknown on meta: read as a number it is zero, used as a mask it selects everything (the most
memory); values never change a transformer's shapes, only such reads. Attention through sdpa is run
as a fused kernel would run it (see `_fused_attention`).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

from vlmscope.scale.measure import tensors_in

aten = torch.ops.aten
MAX_SHADOW = 1 << 24  # elements: larger tensors computed from inputs (a long (batch, T, T) mask) go without one
MAX_UNKNOWN = 1 << 16  # elements: a larger tensor of unknown values copied off meta stays there
FACTORIES = {aten.arange.default, aten.arange.start, aten.arange.start_step, aten.zeros.default,
             aten.ones.default, aten.full.default, aten.scalar_tensor.default, aten.eye.default,
             aten.linspace.default, aten.zeros_like.default, aten.ones_like.default, aten.full_like.default}
BOOL_INDEXED = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default,
                aten._index_put_impl_.default}


def _shadow(t):
    return t.__dict__.get("_vs_shadow") if isinstance(t, torch.Tensor) and t.device.type == "meta" else None


def _is_meta(t) -> bool:
    return isinstance(t, torch.Tensor) and t.device.type == "meta"


def _to_cpu(x):
    """Device arguments that say meta, said for CPU (the shadow computation)."""
    if isinstance(x, torch.device) and x.type == "meta":
        return torch.device("cpu")
    return "cpu" if x == "meta" else x


def _real(x):
    """A tensor's value for the shadow computation: its shadow, or itself when it is not on meta."""
    return _shadow(x) if _is_meta(x) else x


def _attach(meta: torch.Tensor, real: torch.Tensor, limit: int | None = MAX_SHADOW) -> torch.Tensor:
    if limit is None or real.numel() <= limit:
        meta.__dict__["_vs_shadow"] = real
    return meta


def _meta_like(real):
    if not isinstance(real, torch.Tensor):
        return real
    return _attach(torch.empty_strided(real.shape, real.stride(), dtype=real.dtype, device="meta"), real)


class ShadowMeta:
    """Inside it, meta tensors carry real values where they are cheap and known (see the module
    docstring); operations on them that meta alone cannot answer are answered from those values."""

    def __enter__(self):
        self._modes = (_Dispatch(), _Functions())
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc):
        for mode in reversed(self._modes):
            mode.__exit__(*exc)


class _Functions(TorchFunctionMode):
    """What bypasses the dispatcher: `tolist()` and `numpy()` read memory (answered from the shadow,
    or zeros), `torch.tensor(data, device="meta")` copies its data out of sight (built on CPU here,
    then moved, so the move keeps it as a shadow); and sdpa, whose meta kernel is not a fused one."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and _is_meta(args[0]):
            return _fused_attention(*args, **kwargs)
        if func in (torch.tensor, torch.as_tensor, torch.asarray):
            data = tree_map(_value, args)  # a list of meta scalars reads its items out of sight too
            if _to_meta(kwargs):
                return func(*data, **{**kwargs, "device": "cpu"}).to("meta")
            return func(*data, **kwargs)
        if func in (torch.Tensor.tolist, torch.Tensor.numpy) and _is_meta(args[0]):
            return func(_value(args[0]), *args[1:], **kwargs)
        return func(*args, **kwargs)


def _fused_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                     enable_gqa=False):
    """sdpa as a fused kernel runs it (no (T, T) matrix; the output and a log-sum-exp row): the CPU
    flash kernel's own op, which meta supports (grouped key/value heads included, as enable_gqa asks).
    On meta, sdpa itself takes its math path."""
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        attn_mask = torch.where(attn_mask, torch.scalar_tensor(0.0, dtype=query.dtype),
                                torch.scalar_tensor(float("-inf"), dtype=query.dtype))
    out, _ = aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, dropout_p, is_causal,
                                                              attn_mask=attn_mask, scale=scale)
    return out


def _value(t):
    """A meta tensor's shadow, or zeros where it has none (a value the weights decide)."""
    if not _is_meta(t):
        return t
    real = _shadow(t)
    return torch.zeros(t.shape, dtype=t.dtype) if real is None else real


class _Dispatch(TorchDispatchMode):
    """Every operation: factories and copies onto meta keep their values, operations on shadowed
    tensors compute their shadows too, and what meta alone cannot answer goes to `_unknown`."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        metas = [t for t in tensors_in((args, kwargs)) if t.device.type == "meta"]
        if func in FACTORIES or (func is aten._to_copy.default and not metas and _to_meta(kwargs)):
            return self._factory(func, args, kwargs)
        if not metas:
            return func(*args, **kwargs)
        if all(_shadow(t) is not None for t in metas):
            return self._shadowed(func, args, kwargs)
        if func in BOOL_INDEXED:
            args = (args[0], _long_indices(args[1]), *args[2:])
        try:
            return func(*args, **kwargs)
        except (RuntimeError, NotImplementedError) as e:
            return _unknown(func, args, kwargs, e)

    def _factory(self, func, args, kwargs):
        out = func(*args, **kwargs)
        if not _is_meta(out) or out.numel() > MAX_SHADOW:
            return out
        real = func(*tree_map(_to_cpu, args), **tree_map(_to_cpu, kwargs))
        return _attach(out, real)

    def _shadowed(self, func, args, kwargs):
        real = func(*tree_map(_real, args), **tree_map(_to_cpu, tree_map(_real, kwargs)))
        if func is aten._to_copy.default and kwargs.get("device") is not None and not _to_meta(kwargs):
            return real  # copied off meta (`.cpu()`, `.to("cpu")`): the value itself
        try:
            out = func(*args, **kwargs)
        except (RuntimeError, NotImplementedError):  # data-dependent on meta: the real result's shape
            inputs = {id(t) for t in tensors_in((args, kwargs))}
            return tree_map(lambda r: r if id(r) in inputs else _meta_like(r), real)  # in place on a real one
        for o, r in zip(tensors_in(out), tensors_in(real)):
            if o.device.type == "meta":
                _attach(o, r)
        return out


def _to_meta(kwargs) -> bool:
    d = kwargs.get("device")
    return d is not None and torch.device(d).type == "meta"


def _long_indices(indices):
    """Boolean masks as the long indices they select, so meta knows the shapes: from the shadow, or,
    for a mask the weights or unknown pixels decide, as if it selected everything (the most memory)."""
    out = []
    for idx in indices:
        if not _is_meta(idx) or idx.dtype not in (torch.bool, torch.uint8):
            out.append(idx)
            continue
        real = _shadow(idx)
        if real is not None:
            out.extend(_meta_like(i) for i in real.bool().nonzero().unbind(1))
        else:
            out.extend(torch.empty(idx.numel(), dtype=torch.long, device="meta") for _ in range(idx.dim()))
    return out


def _unknown(func, args, kwargs, error):
    """An operation meta cannot answer without values the weights decide: zeros of the right kind."""
    if func is aten._local_scalar_dense.default:
        return False if args[0].dtype == torch.bool else 0
    if func is aten._to_copy.default:  # a weight-derived meta tensor copied to a real device
        dtype = kwargs.get("dtype") or args[0].dtype
        if args[0].numel() > MAX_UNKNOWN:  # stays on meta: zeros would cost real memory and time
            return torch.empty(args[0].shape, dtype=dtype, device="meta")
        return torch.zeros(args[0].shape, dtype=dtype, device=kwargs.get("device") or "cpu")
    if func._schema.is_mutable and isinstance(args[0], torch.Tensor) and not _is_meta(args[0]):
        return args[0]  # unknown values written into a real tensor: it keeps its own
    if func is aten.nonzero.default:  # as if every element were nonzero (the most memory)
        return torch.empty((args[0].numel(), args[0].dim()), dtype=torch.long, device="meta")
    if func is aten.masked_select.default:
        return torch.empty(torch.broadcast_shapes(args[0].shape, args[1].shape).numel(), dtype=args[0].dtype,
                           device="meta")
    if func is aten.equal.default or func is aten.is_nonzero.default:
        return False
    raise error


def meta_inputs(inputs: Mapping[str, Any]) -> dict[str, Any]:
    """Inputs on meta, each with its values as its shadow (ids, masks, grids, and pixels, which some
    families read: Idefics3 drops all-zero padding images); pixels already on meta have none."""
    out = {}
    for k, v in inputs.items():
        if not isinstance(v, torch.Tensor):
            out[k] = v
            continue
        m = torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device="meta")
        if v.device.type != "meta":
            _attach(m, v.detach().cpu(), limit=None)
        out[k] = m
    return out
