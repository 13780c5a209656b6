"""Example inputs of a given batch and image size for any supported family, without a processor:
per-family knowledge, so it lives with the adapters.

The memory planner (vlmscope.scale.plan) needs inputs with the token layout a processor would make
(how many image tokens, how many tiles or patches), not real pixels: these builders lay the tokens
out as each family's processor does (vlmscope.testing), with pixel tensors on the meta device.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from vlmscope import testing as T
from vlmscope.errors import InputError


def _size(config, image_size: int | None) -> int:
    return image_size or config.vision_config.image_size


def _qwen(model, batch: int, image_size: int | None, text_len: int) -> dict[str, Any]:
    vc = model.config.vision_config
    unit = vc.patch_size * vc.spatial_merge_size  # the processor rounds sides to whole merged tokens
    side = max(1, round((image_size or 448) / unit)) * vc.spatial_merge_size
    return T.qwen_inputs(model, grids=(((1, side, side),),) * batch, text_len=text_len, device="meta")


def _idefics3(model, batch: int, image_size: int | None, text_len: int) -> dict[str, Any]:
    tile = model.config.vision_config.image_size
    n = math.ceil(_size(model.config, image_size) / tile)  # the processor's split into tile-sized crops
    split = (n, n) if n > 1 else (0, 0)
    x = T.idefics3_inputs(model, splits=((split,),) * batch, text_len=text_len, device="meta")
    # real pixels: Idefics3 tells padding images (all zeros) from real ones by their values
    x["pixel_values"] = torch.ones(x["pixel_values"].shape)
    return x


def _llava(model, batch: int, image_size: int | None, text_len: int) -> dict[str, Any]:
    x = T.llava_inputs(model, batch=batch, text_len=text_len, device="meta")
    image = model.config.image_token_id  # a small vocabulary's (the zoo's) may fall among the random words
    text = x["input_ids"][:, -text_len:]
    text[text == image] = 3 if image != 3 else 4
    return x


BUILDERS = {
    "llava": _llava,
    "llava_next": lambda m, b, s, n: T.llava_next_inputs(m, sizes=((_size(m.config, s),) * 2,) * b, text_len=n,
                                                         device="meta"),
    "qwen2_vl": _qwen,
    "qwen2_5_vl": _qwen,
    "idefics3": _idefics3,
    "paligemma": lambda m, b, s, n: T.paligemma_inputs(m, prefix_lens=(n,) * b, suffix_lens=(2,) * b, device="meta"),
    "blip2": lambda m, b, s, n: T.blip2_inputs(m, batch=b, text_lens=(n,) * b, device="meta"),
    "clip": lambda m, b, s, n: T.clip_inputs(m, n_images=b, n_texts=b, text_len=n, device="meta"),
    "siglip": lambda m, b, s, n: T.siglip_inputs(m, n_images=b, text_lens=(n,) * b, device="meta"),
}


def example_inputs(vlm, batch_size: int, image_size: int | None = None, text_len: int = 16) -> dict[str, Any]:
    """`batch_size` rows of one image and `text_len` text tokens each, laid out as the family's
    processor would for an image of `image_size` pixels a side (families that resize every image to
    one size, like LLaVA-1.5, use their own). Pixels are on the meta device."""
    name = vlm.adapter.name
    build = BUILDERS.get(name)
    if build is None:
        raise InputError(f"no example inputs for the {name!r} family; give inputs= (one batch as the "
                         f"processor makes it). Families with builders: {', '.join(BUILDERS)}")
    if batch_size < 1:
        raise InputError(f"batch_size must be at least 1, got {batch_size}")
    return build(vlm.model, batch_size, image_size, text_len)
