"""Qwen2-VL and Qwen2.5-VL (`Qwen2VLForConditionalGeneration`, `Qwen2_5_VLForConditionalGeneration`).

Dynamic resolution: each image is a (t, h, w) grid of 14x14 patches (`image_grid_thw`). The ViT
sees every image's patches packed into one sequence without a batch axis, so its sites have
batch 1 ("packed" positions, `extra["example"]` says whose each patch is), in the processor's
order: 2x2 merge groups one after the other. Qwen2.5-VL further reorders the merge groups into
attention windows (window_size pixels) before block 0 and attends within a window except in
`fullatt_block_indexes`; positions follow that order and carry `extra["window"]`.

The connector is the patch merger (`connector.in`: patches, stream "vision";
`connector.out`: one token per 2x2 group, stream "connector"). The LM sees
<vision_start> + t*(h/2)*(w/2) image tokens (merged grid, raster) + <vision_end>, with
multimodal rotary positions computed from `mm_token_type_ids`.
"""

from __future__ import annotations

import torch
from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

from vlmscope.errors import InputError
from vlmscope.model.adapters.base import Adapter, Extra
from vlmscope.model.adapters.common import (
    as_positions,
    check_total,
    common_grid,
    packed_stream,
    place_images,
    text_stream,
)
from vlmscope.model.adapters.towers import decoder_tower, encoder_tower
from vlmscope.model.positions import IMAGE

VIDEO_KEYS = ("pixel_values_videos", "video_grid_thw")


def towers(model):
    return encoder_tower(model, "model.visual"), decoder_tower(model, "model.language_model")


def _grids(inputs) -> torch.Tensor:
    thw = inputs.get("image_grid_thw")
    return torch.zeros(0, 3, dtype=torch.long) if thw is None else torch.as_tensor(thw).cpu().long()


def _windows(model, thw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Qwen2.5-VL: the merge-group order (window_index) and each group's window, as the ViT computes them."""
    vc = model.config.vision_config
    if getattr(vc, "window_size", None) is None:
        return None
    index, cu = get_vision_window_index(thw, vc.spatial_merge_size, vc.window_size, vc.patch_size)
    unit = vc.spatial_merge_size**2
    window = torch.searchsorted(cu[1:].long(), torch.arange(len(index)) * unit, right=True)
    return index, window


def positions(model, inputs, special_ids):
    cfg = model.config
    m = cfg.vision_config.spatial_merge_size
    thw = _grids(inputs)
    specials = special_ids | {cfg.vision_start_token_id, cfg.vision_end_token_id}
    f = text_stream("lm", inputs, frozenset(specials))
    ids = torch.as_tensor(inputs["input_ids"]).cpu()
    merged, patches = [], []
    for g in thw:
        t, h, w = g.tolist()
        k = torch.arange(t * (h // m) * (w // m))
        cols = w // m
        merged.append({"role": torch.full_like(k, IMAGE), "row": k // cols % (h // m), "col": k % cols})
        hw = get_vision_position_ids(g[None], m)  # (t*h*w, 2): each patch's (row, col), merge groups in order
        patches.append({"role": torch.full((len(hw),), IMAGE), "row": hw[:, 0], "col": hw[:, 1]})
    owners, within = place_images(f, ids == cfg.image_token_id, merged)
    merged_grid = common_grid([(h // m, w // m) for _, h, w in thw.tolist()])
    patch_grid = common_grid([(h, w) for _, h, w in thw.tolist()])
    win = _windows(model, thw) if len(thw) else None
    if win is None:
        vision = packed_stream("vision", patches, owners, within, patch_grid)
        connector = packed_stream("connector", merged, owners, within, merged_grid)
    else:  # Qwen2.5-VL: merge groups in window order
        index, window = win
        unit = m * m
        vision = packed_stream("vision", patches, owners, within, patch_grid,
                               order=(index[:, None] * unit + torch.arange(unit)).flatten(),
                               extra={"window": window.repeat_interleave(unit)})
        connector = packed_stream("connector", merged, owners, within, merged_grid, order=index,
                                  extra={"window": window})
    return {"lm": as_positions(f, merged_grid), "vision": vision, "connector": connector}


def check(model, inputs) -> None:
    cfg = model.config
    given = [k for k in VIDEO_KEYS if inputs.get(k) is not None]
    if given:
        raise InputError(f"video inputs ({', '.join(given)}) are not supported yet by vlmscope's "
                         f"{type(model).__name__} adapter; images are, one or several per example "
                         "(pixel_values + image_grid_thw + mm_token_type_ids)")
    if "input_ids" not in inputs:  # precomputed inputs_embeds: nothing to count
        return
    ids = torch.as_tensor(inputs["input_ids"]).cpu()
    is_image = ids == cfg.image_token_id
    if inputs.get("pixel_values") is None and not is_image.any():
        return
    if inputs.get("image_grid_thw") is None:
        raise InputError("Qwen2-VL inputs with images need image_grid_thw (one (t, h, w) patch grid per "
                         "image) next to pixel_values; the processor returns it")
    tt = inputs.get("mm_token_type_ids")
    if tt is None and inputs.get("position_ids") is None:
        raise InputError(
            "inputs have images but no mm_token_type_ids: Qwen2.5-VL would silently fall back to 1-D rotary "
            "positions instead of its multimodal (t, h, w) ones (Qwen2-VL refuses). Pass the "
            "mm_token_type_ids the processor returns (1 on image tokens, 0 elsewhere)"
        )
    if tt is not None and not torch.equal(torch.as_tensor(tt).cpu() == 1, is_image):
        raise InputError(f"mm_token_type_ids must be 1 exactly on the image tokens (image_token_id "
                         f"{cfg.image_token_id}); they differ, so the multimodal rotary positions would be "
                         "wrong")
    thw = _grids(inputs)
    m = cfg.vision_config.spatial_merge_size
    check_total(int(is_image.sum()), int(thw.prod(-1).sum()) // m**2,
                f"image_grid_thw {thw.tolist()}, one token per {m}x{m} patches")
    pixels = inputs.get("pixel_values")
    if pixels is not None and pixels.shape[0] != int(thw.prod(-1).sum()):
        raise InputError(f"pixel_values hold {pixels.shape[0]} patches but image_grid_thw {thw.tolist()} "
                         f"implies {int(thw.prod(-1).sum())}")


def prompt(text: str, n_images: int, processor) -> str:
    token = getattr(processor, "image_token", "<|image_pad|>")
    return text if token in text else f"<|vision_start|>{token}<|vision_end|>" * n_images + text


def _adapter(name: str, cls: str) -> Adapter:
    return Adapter(
        name=name,
        classes=(cls,),
        towers=towers,
        extras=(
            Extra("connector.in", "model.visual.merger", "input", "vision", packed=True,
                  width="model.visual.merger.ln_q.weight:0"),
            Extra("connector.out", "model.visual.merger", "output", "connector", packed=True,
                  width="model.visual.merger.mlp.2.weight:0"),
            Extra("lm.logits", "lm_head", "output", "lm", width="lm_head.weight:0"),
        ),
        positions=positions,
        check=check,
        prompt=prompt,
    )


ADAPTER = _adapter("qwen2_vl", "Qwen2VLForConditionalGeneration")
ADAPTER_2_5 = _adapter("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration")
