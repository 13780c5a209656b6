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


@dataclass(frozen=True)
class BlockLayout:
    """Module names inside one transformer block of a family, relative to the block."""

    attn: str  # attention module; it calls transformers' attention interface
    attn_out_proj: str  # the heads' output projection: its input is attn.z
    norm2: str  # the norm in front of the MLP: its input is resid_mid
    mlp: str  # its output is mlp.out
    mlp_down: str  # the MLP's output projection: its input is mlp.post (neuron activations)


@dataclass(frozen=True)
class Tower:
    """A stack of blocks and the sites around it, named under `prefix` ("vision", "lm", "text")."""

    prefix: str
    layers: str  # path of the ModuleList of blocks
    stream: str
    block: BlockLayout | None = None  # None: chosen by the block class (see towers.py)  # which token stream the tower's positions index
    embed: tuple[str, str, str | None] | None = None  # (module, hook kind, arg) of prefix.embed
    norm: str | None = None  # final norm: prefix.norm is its output


@dataclass(frozen=True)
class Extra:
    """One site outside the towers (connector.in, lm.logits, vision.proj, ...)."""

    name: str
    module: str
    hook: str
    stream: str
    arg: str | None = None
    pooled: bool = False


@dataclass(frozen=True)
class Adapter:
    """Everything vlmscope knows about one VLM family."""

    name: str
    classes: tuple[str, ...]  # transformers class names this adapter describes
    towers: tuple[Tower, ...]
    extras: tuple[Extra, ...]
    positions: Callable[[nn.Module, Mapping[str, Any], frozenset[int]], dict[str, Positions]]
    check: Callable[[nn.Module, Mapping[str, Any]], None] = lambda model, inputs: None
    prompt: Callable[[str, int, Any], str] = lambda text, n_images, processor: text
    dual_encoder: bool = False
    notes: dict[str, str] = field(default_factory=dict)

    def site_table(self, model: nn.Module) -> dict[str, SiteSpec]:
        """Every site of `model`, in forward order (towers in declaration order, extras placed
        after the tower whose prefix they share, or at the end)."""
        table: dict[str, SiteSpec] = {}
        placed: set[str] = set()
        for tower in self.towers:
            for extra in self.extras:
                if extra.name.startswith("connector.") and tower.prefix == "lm":
                    table[extra.name] = _extra_spec(extra)
                    placed.add(extra.name)
            table.update(tower_sites(model, tower))
            for extra in self.extras:
                if extra.name.startswith(tower.prefix + ".") and extra.name not in placed:
                    table[extra.name] = _extra_spec(extra)
                    placed.add(extra.name)
        for extra in self.extras:
            if extra.name not in placed:
                table[extra.name] = _extra_spec(extra)
        return table


def _extra_spec(e: Extra) -> SiteSpec:
    return SiteSpec(name=e.name, module=e.module, hook=e.hook, stream=e.stream, arg=e.arg, pooled=e.pooled)


def tower_sites(model: nn.Module, tower: Tower) -> dict[str, SiteSpec]:
    """The sites of one tower, block by block, with head counts read from the modules."""
    p, s = tower.prefix, tower.stream
    out: dict[str, SiteSpec] = {}
    if tower.embed is not None:
        mod, hook, arg = tower.embed
        out[f"{p}.embed"] = SiteSpec(f"{p}.embed", mod, hook, s, arg=arg)
    from vlmscope.model.adapters.towers import block_layout

    layers = model.get_submodule(tower.layers)
    bl = tower.block or block_layout(layers[0])
    for i in range(len(layers)):
        blk = f"{tower.layers}.{i}"
        attn = model.get_submodule(f"{blk}.{bl.attn}")
        proj = model.get_submodule(f"{blk}.{bl.attn_out_proj}")
        head_dim = getattr(attn, "head_dim", None)
        n_heads = proj.in_features // head_dim if head_dim else None
        b = f"{p}.blocks.{i}"
        specs = [
            SiteSpec(f"{b}.resid_pre", blk, "input", s, arg="hidden_states", layer=i),
            SiteSpec(f"{b}.attn.pattern", f"{blk}.{bl.attn}", "pattern", s, layer=i),
            SiteSpec(f"{b}.attn.z", f"{blk}.{bl.attn_out_proj}", "input", s, layer=i, heads=n_heads),
            SiteSpec(f"{b}.attn.out", f"{blk}.{bl.attn}", "output", s, layer=i),
            SiteSpec(f"{b}.resid_mid", f"{blk}.{bl.norm2}", "resid_mid", s, layer=i, block=blk),
            SiteSpec(f"{b}.mlp.post", f"{blk}.{bl.mlp_down}", "input", s, layer=i),
            SiteSpec(f"{b}.mlp.out", f"{blk}.{bl.mlp}", "output", s, layer=i),
            SiteSpec(f"{b}.resid_post", blk, "output", s, layer=i),
        ]
        out.update({sp.name: sp for sp in specs})
    if tower.norm is not None:
        out[f"{p}.norm"] = SiteSpec(f"{p}.norm", tower.norm, "output", s)
    return out
