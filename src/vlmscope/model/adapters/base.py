"""What an adapter is: a declarative description of one VLM family.

An adapter says where each part's blocks live (as `Tower`s built from a per-family block
layout), which extra sites the family has (connector, logits), how its image tokens lie
(`positions`), and which input mistakes transformers would let pass silently (`check`).
Nothing outside adapters/ knows any module path.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from vlmscope.model.positions import Positions
from vlmscope.model.sites import SiteSpec


def n_heads(model: nn.Module, attn: str, out_proj: str) -> int | None:
    """Query heads of an attention module: its output projection's input width over the head size."""
    a = model.get_submodule(attn)
    head_dim = getattr(a, "head_dim", None) or getattr(a, "attention_head_size", None)
    return model.get_submodule(out_proj).weight.shape[1] // head_dim if head_dim else None


@dataclass(frozen=True)
class BlockLayout:
    """Module names inside one pre-norm transformer block of a family, relative to the block."""

    attn: str  # attention module; it calls transformers' attention interface
    attn_out_proj: str  # the heads' output projection: its input is attn.z
    norm2: str  # the norm in front of the MLP: its input is resid_mid
    mlp: str  # its output is mlp.out
    mlp_down: str  # the MLP's output projection: its input is mlp.post (neuron activations)
    flat_mlp: bool = False  # the block flattens (batch, pos) into one axis around its MLP (OPT)
    attn_q_proj: str | None = None  # a separate query projection: its output is attn.q (None: fused qkv)

    def sites(self, model: nn.Module, blk: str, b: str, i: int, stream: str, packed: bool) -> list[SiteSpec]:
        """The sites of block `blk` (module path), named under `b` ("lm.blocks.3")."""
        heads = n_heads(model, f"{blk}.{self.attn}", f"{blk}.{self.attn_out_proj}")
        d = f"{blk}.{self.attn_out_proj}.weight:0"
        flat = dict(flat=self.flat_mlp, block=blk if self.flat_mlp else None)
        common = dict(layer=i, packed=packed)
        query = [SiteSpec(f"{b}.attn.q", f"{blk}.{self.attn_q_proj}", "output", stream,
                          width=f"{blk}.{self.attn_q_proj}.weight:0", **common)] if self.attn_q_proj else []
        return [
            SiteSpec(f"{b}.resid_pre", blk, "input", stream, arg="hidden_states", width=d, **common),
            *query,
            SiteSpec(f"{b}.attn.pattern", f"{blk}.{self.attn}", "pattern", stream, heads=heads, **common),
            SiteSpec(f"{b}.attn.z", f"{blk}.{self.attn_out_proj}", "input", stream, heads=heads,
                     width=f"{blk}.{self.attn_out_proj}.weight:1", **common),
            SiteSpec(f"{b}.attn.out", f"{blk}.{self.attn}", "output", stream, width=d, **common),
            SiteSpec(f"{b}.resid_mid", f"{blk}.{self.norm2}", "resid_mid", stream, width=d, layer=i,
                     packed=packed, flat=self.flat_mlp, block=blk),
            SiteSpec(f"{b}.mlp.post", f"{blk}.{self.mlp_down}", "input", stream,
                     width=f"{blk}.{self.mlp_down}.weight:1", **common, **flat),
            SiteSpec(f"{b}.mlp.out", f"{blk}.{self.mlp}", "output", stream, width=d, **common, **flat),
            SiteSpec(f"{b}.resid_post", blk, "output", stream, width=d, **common),
        ]


@dataclass(frozen=True)
class Tower:
    """A stack of blocks and the sites around it, named under `prefix` ("vision", "lm", "text",
    "connector")."""

    prefix: str
    layers: str  # path of the ModuleList of blocks
    stream: str  # which token stream the tower's positions index
    block: Any = None  # a layout with .sites(...); None: chosen by the block class (see towers.py)
    embed: tuple[str, str, str | None] | None = None  # (module, hook kind, arg) of prefix.embed
    norm: str | None = None  # final norm over every position: prefix.norm is its output
    packed: bool = False  # the blocks see every image's tokens packed into one sequence (no batch axis)


@dataclass(frozen=True)
class Extra:
    """One site outside the towers (connector.in, lm.logits, vision.proj, ...)."""

    name: str
    module: str
    hook: str
    stream: str
    arg: str | None = None
    pooled: bool = False
    width: str | None = None  # "param.path:dim" sizing the last axis (for VLM.site_shapes)
    packed: bool = False


@dataclass(frozen=True)
class Adapter:
    """Everything vlmscope knows about one VLM family.

    `towers` is a tuple, or a function of the model returning one when the towers inside depend
    on the checkpoint (BLIP-2 on OPT or on Llama, LLaVA on CLIP or on SigLIP)."""

    name: str
    classes: tuple[str, ...]  # transformers class names this adapter describes
    towers: tuple[Tower, ...] | Callable[[nn.Module], tuple[Tower, ...]]
    extras: tuple[Extra, ...]
    positions: Callable[[nn.Module, Mapping[str, Any], frozenset[int]], dict[str, Positions]]
    check: Callable[[nn.Module, Mapping[str, Any]], None] = lambda model, inputs: None
    prompt: Callable[[str, int, Any], str] = lambda text, n_images, processor: text
    dual_encoder: bool = False
    lm_causal: bool = True  # every LM position sees only earlier ones (False: a bidirectional prefix)
    notes: dict[str, str] = field(default_factory=dict)

    def site_table(self, model: nn.Module) -> dict[str, SiteSpec]:
        """Every site of `model`, in forward order: per tower, its `{prefix}.in` extra, the tower,
        then the tower's other extras; the connector's extras come before the LM; the rest last."""
        towers = self.towers(model) if callable(self.towers) else self.towers
        table: dict[str, SiteSpec] = {}

        def place(names: list[Extra]) -> None:
            for extra in names:
                table.setdefault(extra.name, _extra_spec(extra))

        for tower in towers:
            if tower.prefix == "lm":
                place([e for e in self.extras if e.name.startswith("connector.")])
            place([e for e in self.extras if e.name == f"{tower.prefix}.in"])
            table.update(tower_sites(model, tower))
            place([e for e in self.extras if e.name.startswith(tower.prefix + ".")])
        place(list(self.extras))
        return table


def _extra_spec(e: Extra) -> SiteSpec:
    return SiteSpec(name=e.name, module=e.module, hook=e.hook, stream=e.stream, arg=e.arg, pooled=e.pooled,
                    width=e.width, packed=e.packed)


def tower_sites(model: nn.Module, tower: Tower) -> dict[str, SiteSpec]:
    """The sites of one tower, block by block, with head counts and widths read from the modules."""
    from vlmscope.model.adapters.towers import block_layout

    p, s = tower.prefix, tower.stream
    layers = model.get_submodule(tower.layers)
    layout = tower.block or block_layout(layers[0])
    blocks = [layout.sites(model, f"{tower.layers}.{i}", f"{p}.blocks.{i}", i, s, tower.packed)
              for i in range(len(layers))]
    d = blocks[0][0].width  # resid_pre's width is the tower's
    out: dict[str, SiteSpec] = {}
    if tower.embed is not None:
        mod, hook, arg = tower.embed
        out[f"{p}.embed"] = SiteSpec(f"{p}.embed", mod, hook, s, arg=arg, width=d, packed=tower.packed)
    out.update({sp.name: sp for specs in blocks for sp in specs})
    if tower.norm is not None:
        out[f"{p}.norm"] = SiteSpec(f"{p}.norm", tower.norm, "output", s, width=d, packed=tower.packed)
    return out
