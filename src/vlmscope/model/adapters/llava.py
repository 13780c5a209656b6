"""LLaVA-1.5 (`LlavaForConditionalGeneration`): a ViT tower, an MLP projector, a decoder LM.

Image tokens: the vision tower's tokens (a CLS token, then (S/p)^2 patches, for CLIP; no CLS for
SigLIP), less the first one with vision_feature_select_strategy "default"; they replace the
image-token id in input_ids. The towers are looked up by class (towers.py), so LLaVA on SigLIP,
Mistral or Qwen2 needs no code here.
"""

from __future__ import annotations

import torch

from vlmscope.model.adapters.base import Adapter, Extra
from vlmscope.model.adapters.common import (
    Layout,
    as_positions,
    check_count,
    drop_first,
    grid_layout,
    image_tokens,
    place_images,
    rows_stream,
    text_stream,
)
from vlmscope.model.adapters.towers import decoder_tower, encoder, encoder_tower

VISION, LM = "model.vision_tower", "model.language_model"


def towers(model):
    return encoder_tower(model, VISION), decoder_tower(model, LM)


def patch_grid(model) -> tuple[int, int]:
    vc = model.config.vision_config
    g = vc.image_size // vc.patch_size
    return g, g


def vision_layout(model, **extra: int) -> Layout:
    """One image's (or tile's) tokens in the vision tower: CLS (if the tower has one), then patches."""
    return grid_layout(*patch_grid(model), cls=encoder(model, VISION).cls, **extra)


def connector_layout(model, lay: Layout) -> Layout:
    """The vision tokens the projector receives: all, or all but the first with strategy "default"."""
    return drop_first(lay) if model.config.vision_feature_select_strategy == "default" else lay


def positions(model, inputs, special_ids):
    vis = vision_layout(model)
    conn = connector_layout(model, vis)
    f = text_stream("lm", inputs, special_ids)
    ids = torch.as_tensor(inputs["input_ids"]).cpu()
    is_image = ids == model.config.image_token_id
    n = -(-int(is_image.sum()) // len(conn["role"]))  # a partial image too, to name it
    owners, within = place_images(f, is_image, [image_tokens(conn)] * n)
    grid = patch_grid(model)
    return {
        "lm": as_positions(f, grid),
        "vision": rows_stream("vision", [vis] * n, owners, within, grid),
        "connector": rows_stream("connector", [conn] * n, owners, within, grid),
    }


def check(model, inputs) -> None:
    cfg = model.config
    if "input_ids" not in inputs:  # precomputed inputs_embeds: nothing to count
        return
    rows, cols = patch_grid(model)
    # counted by arithmetic, not by building the layouts: this runs before every forward
    cls = int(encoder(model, VISION).cls)
    per_image = rows * cols + cls - cls * int(cfg.vision_feature_select_strategy == "default")
    ids = torch.as_tensor(inputs["input_ids"])
    pixels = inputs.get("pixel_values")
    n_images = 0 if pixels is None else pixels.shape[0]
    n_tokens = int((ids == cfg.image_token_id).sum())
    strategy = cfg.vision_feature_select_strategy
    check_count(n_tokens, n_images, per_image,
                f"{rows}x{cols} patches, vision_feature_select_strategy={strategy!r}")


def prompt(text: str, n_images: int, processor) -> str:
    token = getattr(processor, "image_token", "<image>")
    return text if token in text else (token + " ") * n_images + text


EXTRAS = (
    Extra("connector.in", "model.multi_modal_projector", "input", "connector", arg="image_features",
          width="model.multi_modal_projector.linear_1.weight:1"),
    Extra("connector.out", "model.multi_modal_projector", "output", "connector",
          width="model.multi_modal_projector.linear_2.weight:0"),
    Extra("lm.logits", "lm_head", "output", "lm", width="lm_head.weight:0"),
)

ADAPTER = Adapter(
    name="llava",
    classes=("LlavaForConditionalGeneration",),
    towers=towers,
    extras=EXTRAS,
    positions=positions,
    check=check,
    prompt=prompt,
)
