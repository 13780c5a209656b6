"""`VLM`: one named, hookable view of a transformers vision-language model.

It wraps the model the user loaded (it never copies or changes weights) and offers the few
operations every method is built on: list sites, prepare inputs, type positions, run with
interventions, run with a cache (optionally with gradients), and stream activations to disk.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from vlmscope.errors import InputError, SiteError
from vlmscope.model import hooks
from vlmscope.model.adapters import Adapter, adapter_for
from vlmscope.model.cache import Cache
from vlmscope.model.devices import input_device
from vlmscope.model.interventions import Intervention, compile_interventions
from vlmscope.model.positions import Positions, PositionSpec
from vlmscope.model.sites import SiteSpec, filter_names, resolve, site_shape


class _Run:
    """What one forward knows about itself: its sites, and its positions, computed on demand."""

    def __init__(self, vlm: VLM, inputs: Mapping[str, Any]):
        self.vlm, self.inputs = vlm, inputs
        self._positions: dict[str, Positions] | None = None

    def resolve(self, sites):
        return self.vlm._resolve(sites)

    def spec(self, site: str) -> SiteSpec:
        return self.vlm.site(site)

    def positions(self, stream: str) -> Positions:
        if self._positions is None:
            self._positions = self.vlm.positions(self.inputs)
        try:
            return self._positions[stream]
        except KeyError:
            raise InputError(f"these inputs have no {stream!r} token stream (they have: "
                             f"{', '.join(self._positions)})") from None

    def attention_module(self, part: str, layer: int) -> str:
        return self.vlm.site(f"{part}.blocks.{layer}.attn.pattern").module

    def n_layers(self, part: str) -> int:
        return self.vlm.n_layers(part)


class VLM:
    """A transformers VLM seen through vlmscope's site names. Build it with `vlmscope.load`."""

    def __init__(self, model: nn.Module, processor: Any = None, adapter: Adapter | None = None):
        self.model = model
        self.processor = processor
        self.adapter = adapter or adapter_for(model)
        self.site_table: dict[str, SiteSpec] = self.adapter.site_table(model)
        mine = getattr(processor, "image_token_id", None)
        theirs = getattr(model.config, "image_token_id", None)
        if mine is not None and theirs is not None and mine != theirs:
            raise InputError(f"the processor's image token id {mine} differs from the model's image_token_id "
                             f"{theirs}; they must come from the same checkpoint")

    def __repr__(self) -> str:
        n = sum(p.numel() for p in self.model.parameters())
        return (f"VLM({type(self.model).__name__}, adapter={self.adapter.name!r}, {n / 1e6:.2f}M params, "
                f"{len(self.site_table)} sites)")

    # --- sites ---------------------------------------------------------------------------------
    def sites(self, pattern: str | None = None) -> list[str]:
        """Site names in forward order, optionally filtered by a glob ("lm.blocks.*.resid_post")."""
        return filter_names(self.site_table, pattern)

    def _resolve(self, sites: str | Sequence[str] | None) -> list[str]:
        """`resolve(sites, self.site_table)`, remembered per request: matching a glob against every
        site name costs more than the hooks of a small model's run (fnmatch over the whole table)."""
        key = sites if sites is None or isinstance(sites, str) else tuple(sites)
        memo = self.__dict__.get("_resolved")
        if memo is None or memo[0] is not self.site_table:  # the table was replaced: start over
            memo = self._resolved = (self.site_table, {})
        try:
            hit = memo[1].get(key)
        except TypeError:  # an unhashable item: resolve() names the problem
            return resolve(key, self.site_table)
        if hit is None:
            hit = memo[1][key] = tuple(resolve(key, self.site_table))
        return list(hit)

    def site(self, name: str) -> SiteSpec:
        if name not in self.site_table:
            resolve(name, self.site_table)  # raises SiteError with the nearest names
            raise SiteError(f"{name!r} is a pattern; give one site")
        return self.site_table[name]

    def n_layers(self, part: str) -> int:
        n = len(self.sites(f"{part}.blocks.*.resid_post"))
        if n == 0:
            parts = sorted({s.split(".")[0] for s in self.site_table if ".blocks." in s})
            raise SiteError(f"this model has no blocks under {part!r}; parts with blocks: {', '.join(parts)}")
        return n

    def unembed(self, resid: torch.Tensor) -> torch.Tensor:
        """Logits of residual-stream vectors: the LM's final norm, then its unembedding (the
        modules behind the `lm.norm` and `lm.logits` sites)."""
        if "lm.norm" not in self.site_table or "lm.logits" not in self.site_table:
            raise SiteError("this model has no language-model head (lm.norm / lm.logits); the logit lens "
                            "needs a generative VLM")
        norm = self.model.get_submodule(self.site_table["lm.norm"].module)
        head = self.model.get_submodule(self.site_table["lm.logits"].module)
        return head(norm(resid))

    @property
    def tokenizer(self):
        return getattr(self.processor, "tokenizer", self.processor)

    @property
    def device(self) -> torch.device:
        """Where inputs go: the model's device, or accelerate's main device when the model is split
        over devices or offloaded (its offloaded weights sit on `meta`; see model/devices.py)."""
        return input_device(self.model)

    # --- inputs ----------------------------------------------------------------------------------
    def prepare(self, images: Any = None, texts: str | Sequence[str] | None = None, **kwargs) -> dict[str, Any]:
        """Model inputs from images and texts, through the model's processor (padding on).

        One image per text by default; the family's image placeholder is added to texts that lack it.
        """
        if self.processor is None:
            raise InputError("prepare() needs a processor: pass processor= to vlmscope.load, or build the "
                             "inputs yourself (any dict the model accepts works everywhere)")
        if isinstance(texts, str):
            texts = [texts]
        if images is not None and not isinstance(images, (list, tuple)):
            images = [images]
        if texts is not None and images is not None and not self.adapter.dual_encoder:
            if len(images) != len(texts):
                raise InputError(f"got {len(images)} images for {len(texts)} texts; give one image per text "
                                 "(or build multi-image inputs with the processor)")
            texts = [self.adapter.prompt(t, 1, self.processor) for t in texts]
        out = self.processor(images=images, text=texts, return_tensors="pt", padding=True, **kwargs)
        return dict(out)

    def positions(self, inputs: Mapping[str, Any]) -> dict[str, Positions]:
        """Typed positions of every token stream of these inputs ("lm", "vision", "connector", "text")."""
        return self.adapter.positions(self.model, inputs, self._special_ids())

    def _special_ids(self) -> frozenset[int]:
        """Token ids typed 'special': the tokenizer's special tokens and the config's bos/eos/pad."""
        tok = getattr(self.processor, "tokenizer", self.processor)
        ids = set(getattr(tok, "all_special_ids", ()) or ())
        cfg = self.model.config
        for c in (getattr(cfg, "text_config", None) or cfg,):  # a VLM's own config may only alias these
            for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
                v = getattr(c, key, None) if c is not None else None
                ids.update(v if isinstance(v, list) else [v] if isinstance(v, int) else [])
        for key in ("image_token_id", "image_token_index"):
            ids.discard(getattr(cfg, key, None))
        return frozenset(ids)

    def site_shapes(self, inputs: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
        """The shape of every site in a run on these inputs, in forward order, without running it:
        arithmetic on the typed positions and the parameters' shapes, so a full-size model built on
        the meta device (`with torch.device("meta")`) is described without allocating its memory.
        Pixel tensors may be on the meta device too; positions read only their shapes. Sites whose
        token stream the inputs lack (a dual encoder given only images) are left out."""
        pos = self.positions(inputs)
        shapes = {name: site_shape(spec, pos, self.model) for name, spec in self.site_table.items()}
        return {name: shape for name, shape in shapes.items() if shape is not None}

    def select(self, inputs: Mapping[str, Any], spec: PositionSpec, stream: str = "lm") -> torch.Tensor:
        """Boolean (batch, pos) mask of the positions `spec` selects in a stream."""
        return self.positions(inputs)[stream].select(spec)

    def _inputs(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        if not isinstance(inputs, Mapping):
            raise InputError(f"inputs must be a mapping of model inputs (e.g. from VLM.prepare), got "
                             f"{type(inputs).__name__}")
        dev = self.device
        out = {k: v.to(dev) if isinstance(v, torch.Tensor) and v.device != dev else v
               for k, v in inputs.items()}
        self.adapter.check(self.model, out)
        return out

    # --- running ---------------------------------------------------------------------------------
    def _model_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """No key/value cache unless asked for (use_cache=True): a generative model returns one by
        default, as large as a cache of every layer's keys and values, and no method reads it."""
        return kwargs if self.adapter.dual_encoder else {"use_cache": False, **kwargs}

    def run(self, inputs: Mapping[str, Any], interventions: Sequence[Intervention] = (), **model_kwargs):
        """The model's output with `interventions` applied (no gradients)."""
        inputs = self._inputs(inputs)
        run = _Run(self, inputs)
        fns, knock = compile_interventions(interventions, run)
        with hooks.install(self.model, self.site_table, fns, knock), torch.no_grad():
            return self.model(**inputs, **self._model_kwargs(model_kwargs))

    def run_with_cache(
        self,
        inputs: Mapping[str, Any],
        sites: str | Sequence[str] | None = None,
        *,
        interventions: Sequence[Intervention] = (),
        positions: PositionSpec = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        grad_metric: Callable[[Any], torch.Tensor] | None = None,
        **model_kwargs,
    ) -> tuple[Any, Cache]:
        """Run once and return `(output, cache)`; `cache[site]` is the value the model used there
        (after any interventions). `sites` are names or globs (None: every site).

        positions: keep only these positions (same count per row), stored in order; `cache.kept`
        holds their indices. device/dtype: where and how to store. grad_metric: a function of the
        output returning a scalar; the cache then also holds `grads[site]` = d metric / d site.
        """
        inputs = self._inputs(inputs)
        model_kwargs = self._model_kwargs(model_kwargs)
        run = _Run(self, inputs)
        names = self._resolve(sites)
        fns, knock = compile_interventions(interventions, run)
        acts: dict[str, torch.Tensor] = {}
        kept: dict[str, torch.Tensor] = {}
        if positions is not None:
            for stream in {self.site_table[n].stream for n in names if not self.site_table[n].pooled}:
                kept[stream] = _kept_index(run.positions(stream).select(positions), stream)
        zero = torch.zeros((), requires_grad=True) if grad_metric is not None else None

        def store(t: torch.Tensor, *, site: str):
            spec = self.site_table[site]
            if zero is not None:
                t = t + zero.to(t.device, t.dtype)  # a graph node of its own, same values
                acts[site] = t
                return t
            acts[site] = _keep(t.detach(), spec, kept, device, dtype)
            return None

        for name in names:
            fns.setdefault(name, []).append(store)
        with hooks.install(self.model, self.site_table, fns, knock):
            if grad_metric is None:
                with torch.no_grad():
                    out = self.model(**inputs, **model_kwargs)
                grads = {}
            else:
                with torch.enable_grad():
                    out = self.model(**inputs, **model_kwargs)
                    metric = grad_metric(out)
                    if metric.numel() != 1:
                        raise InputError(f"grad_metric must return a scalar, got shape {tuple(metric.shape)}")
                    got = torch.autograd.grad(metric, list(acts.values()), allow_unused=True)
                grads = {
                    s: _keep(torch.zeros_like(a) if g is None else g.detach(), self.site_table[s], kept, device, dtype)
                    for (s, a), g in zip(acts.items(), got)
                }
                acts = {s: _keep(a.detach(), self.site_table[s], kept, device, dtype) for s, a in acts.items()}
        cache = Cache(
            {n: acts[n] for n in names if n in acts},
            {n: grads[n] for n in names if n in grads},
            layouts={n: self.site_table[n].layout for n in names if n in acts},
            streams={n: self.site_table[n].stream for n in names if n in acts},
            kept=kept,
        )
        return out, cache

    def cache_dataset(self, dataset, sites, out_dir, batch_size: int = 8, positions: PositionSpec = None,
                      **kwargs):
        """Stream activations of `dataset` at `sites` to safetensors shards (see vlmscope.model.store)."""
        from vlmscope.model.store import cache_dataset

        return cache_dataset(self, dataset, sites, out_dir, batch_size=batch_size, positions=positions, **kwargs)


def _kept_index(mask: torch.Tensor, stream: str) -> torch.Tensor:
    counts = mask.sum(1)
    if (counts != counts[0]).any():
        raise InputError(
            f"the positions kept select different counts per row in the {stream!r} stream "
            f"({counts.tolist()}); keep a selection with equal counts (e.g. 'last') or use cache_dataset, which "
            "stores rows flat"
        )
    return mask.nonzero()[:, 1].view(mask.shape[0], -1)


def _keep(t: torch.Tensor, spec: SiteSpec, kept: dict[str, torch.Tensor], device, dtype) -> torch.Tensor:
    idx = kept.get(spec.stream)
    if idx is not None and not spec.pooled and spec.hook != "model_output":
        rows = torch.arange(idx.shape[0], device=t.device)[:, None]
        idx = idx.to(t.device)
        t = t[rows, :, idx].transpose(1, 2) if spec.hook == "pattern" else t[rows, idx]
    if device is not None or dtype is not None:
        t = t.to(device=device, dtype=dtype if t.is_floating_point() else None)
    return t
