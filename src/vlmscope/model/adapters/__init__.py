"""Adapters: one file per VLM family, registered by transformers class name."""

from __future__ import annotations

from torch import nn

from vlmscope.errors import UnsupportedModelError
from vlmscope.model.adapters import blip2, clip, idefics3, llava, llava_next, paligemma, qwen2_vl, siglip
from vlmscope.model.adapters.base import Adapter, BlockLayout, Extra, Tower

ADAPTERS: tuple[Adapter, ...] = (
    llava.ADAPTER, llava_next.ADAPTER, qwen2_vl.ADAPTER, qwen2_vl.ADAPTER_2_5, idefics3.ADAPTER,
    paligemma.ADAPTER, blip2.ADAPTER, clip.ADAPTER, siglip.ADAPTER,
)
BY_CLASS: dict[str, Adapter] = {c: a for a in ADAPTERS for c in a.classes}


def supported_classes() -> list[str]:
    return sorted(BY_CLASS)


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter describing `model`'s class (or its nearest registered base class)."""
    for cls in type(model).__mro__:
        if cls.__name__ in BY_CLASS:
            return BY_CLASS[cls.__name__]
    raise UnsupportedModelError(
        f"no vlmscope adapter for {type(model).__name__}; supported classes: "
        f"{', '.join(supported_classes())}. "
        "To add a family, write one adapter file (see docs/adapters.md)."
    )


__all__ = ["ADAPTERS", "Adapter", "BlockLayout", "Extra", "Tower", "adapter_for", "supported_classes"]
