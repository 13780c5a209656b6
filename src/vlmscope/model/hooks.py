"""Registering site functions on a model, only inside a context that always removes them.

A site function has one signature, `fn(tensor, *, site) -> tensor | None`: return a tensor to
replace the site's value, or None to leave it. Functions on one site run in the order given.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from functools import partial

import torch
from torch import nn

from vlmscope.model import attention
from vlmscope.model.sites import SiteSpec

SiteFn = Callable[..., "torch.Tensor | None"]


def _chain(fns: list[tuple[str, SiteFn]], t: torch.Tensor) -> torch.Tensor:
    for site, fn in fns:
        r = fn(t, site=site)
        if r is not None:
            t = r
    return t


def _split_heads(fn: SiteFn, n_heads: int) -> SiteFn:
    """Show `fn` the tensor as (..., heads, d_head) and merge what it returns back."""

    def split(t: torch.Tensor, *, site: str):
        r = fn(t.unflatten(-1, (n_heads, -1)), site=site)
        return None if r is None else r.flatten(-2)

    return split


def _packed(fn: SiteFn) -> SiteFn:
    """Show `fn` a packed (pos, ...) tensor, which has no batch axis, as (1, pos, ...)."""

    def packed(t: torch.Tensor, *, site: str):
        r = fn(t.unsqueeze(0), site=site)
        return None if r is None else r.squeeze(0)

    return packed


class _BlockShape:
    """The (batch, pos) of a block's input, read when the block starts, for its flat sites."""

    def __init__(self):
        self.shape: torch.Size | None = None

    def pre(self, module, args, kwargs):
        t = args[0] if args else kwargs["hidden_states"]
        self.shape = t.shape[:-1]


def _flat(fn: SiteFn, block: _BlockShape) -> SiteFn:
    """Show `fn` a (batch * pos, ...) tensor as (batch, pos, ...)."""

    def flat(t: torch.Tensor, *, site: str):
        r = fn(t.view(*block.shape, *t.shape[1:]), site=site)
        return None if r is None else r.reshape(t.shape)

    return flat


def _bind(fn: SiteFn, spec: SiteSpec, shapes: dict[str, _BlockShape]) -> SiteFn:
    """`fn` seeing the site as (batch, pos, [head,] d) whatever shape the module holds it in."""
    if spec.heads:
        fn = _split_heads(fn, spec.heads)
    if spec.packed:
        fn = _packed(fn)
    if spec.flat:
        fn = _flat(fn, shapes.setdefault(spec.block, _BlockShape()))
    return fn


def _submodule(model: nn.Module, path: str) -> nn.Module:
    """`model.get_submodule(path)` through the `_modules` dicts: the same module, without the
    hasattr/getattr round trips through `nn.Module.__getattr__` that make get_submodule cost more
    than a small model's hooks. Anything unusual falls back to get_submodule."""
    mod = model
    for name in path.split(".") if path else ():
        nxt = mod._modules.get(name)
        if nxt is None:
            return model.get_submodule(path)
        mod = nxt
    return mod


def _first(out):
    return out if isinstance(out, torch.Tensor) else out[0]


def _replace_first(out, new):
    if isinstance(out, torch.Tensor):
        return new
    if isinstance(out, tuple):
        return (new, *out[1:])
    out[next(iter(out.keys()))] = new  # a ModelOutput
    return out


def _on_output(fns, module, args, out):
    t = _first(out)
    new = _chain(fns, t)
    return None if new is t else _replace_first(out, new)


def _on_input(fns, arg, module, args, kwargs):
    if arg is not None and arg in kwargs:
        t = kwargs[arg]
        new = _chain(fns, t)
        if new is t:
            return None
        kwargs[arg] = new
        return args, kwargs
    t = args[0]
    new = _chain(fns, t)
    return None if new is t else ((new, *args[1:]), kwargs)


def _on_model_output(fns, attr, module, args, out):
    t = out[attr]
    new = _chain(fns, t)
    if new is not t:
        out[attr] = new
    return out


class _ResidMid:
    """resid_mid is read at the MLP norm's input; a write also adds (new - old) to the block's
    output, since the block keeps its own reference to the unpatched residual."""

    def __init__(self, fns):
        self.fns = fns
        self.delta: torch.Tensor | None = None

    def pre(self, module, args, kwargs):
        t = args[0] if args else kwargs["hidden_states"]
        new = _chain(self.fns, t)
        if new is t:
            return None
        self.delta = new - t
        return ((new, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": new})

    def post(self, module, args, out):
        if self.delta is None:
            return None
        first = _first(out)
        # the MLP may see the residual flattened; a model split over devices may put its output elsewhere
        new = first + self.delta.view_as(first).to(first.device)
        self.delta = None
        return _replace_first(out, new)


@contextmanager
def install(
    model: nn.Module,
    specs: dict[str, SiteSpec],
    fns: dict[str, list[SiteFn]],
    knock: dict[str, torch.Tensor] | None = None,
) -> Iterator[None]:
    """Attach `fns[site]` to each site of `model` (and knockout masks keyed by attention module
    path) for the duration of the context. Hooks are removed even when the forward raises."""
    groups: dict[tuple[str, str, str | None], list[tuple[str, SiteFn]]] = {}
    attn_edits: dict[str, attention.AttnEdit] = {}
    shapes: dict[str, _BlockShape] = {}
    for site, site_fns in fns.items():
        if not site_fns:
            continue
        spec = specs[site]
        if spec.hook == "pattern":
            attn_edits.setdefault(spec.module, attention.AttnEdit()).pattern_fns.extend(
                partial(f, site=site) for f in site_fns
            )
        else:
            bound = [(site, _bind(f, spec, shapes)) for f in site_fns]
            arg = spec.block if spec.hook == "resid_mid" else spec.arg
            groups.setdefault((spec.module, spec.hook, arg), []).extend(bound)
    for module_path, edges in (knock or {}).items():
        attn_edits.setdefault(module_path, attention.AttnEdit()).knock = edges

    with ExitStack() as stack:
        for path, block in shapes.items():
            h = _submodule(model, path).register_forward_pre_hook(block.pre, with_kwargs=True)
            stack.callback(h.remove)
        for (path, hook, arg), group in groups.items():
            mod = _submodule(model, path)
            if hook == "output":
                h = mod.register_forward_hook(partial(_on_output, group))
            elif hook == "input":
                h = mod.register_forward_pre_hook(partial(_on_input, group, arg), with_kwargs=True)
            elif hook == "model_output":
                h = mod.register_forward_hook(partial(_on_model_output, group, arg))
            elif hook == "resid_mid":
                rm = _ResidMid(group)
                h = mod.register_forward_pre_hook(rm.pre, with_kwargs=True)
                stack.callback(_submodule(model, arg).register_forward_hook(rm.post).remove)
            else:  # pragma: no cover - specs are validated when tables are built
                raise ValueError(f"unknown hook kind {hook!r}")
            stack.callback(h.remove)
        stack.enter_context(attention.override({_submodule(model, p): e for p, e in attn_edits.items()}))
        yield
