"""LLaVA-1.5 (`LlavaForConditionalGeneration`): a ViT tower, an MLP projector, a decoder LM.

Image tokens: (S/p)^2 per image with vision_feature_select_strategy "default" (the CLS token is
dropped), one more (CLS first) with "full"; they replace the image-token id in input_ids.
"""

from __future__ import annotations

import torch

from vlmscope.model.adapters.base import Adapter, Extra, Tower
from vlmscope.model.adapters.common import (
    as_positions,
    check_count,
    image_index_in_example,
    place_images,
    text_stream,
)
from vlmscope.model.positions import patch_grid_stream


def _grid(cfg) -> tuple[tuple[int, int], bool]:
    g = cfg.vision_config.image_size // cfg.vision_config.patch_size
    return (g, g), cfg.vision_feature_select_strategy == "full"


def positions(model, inputs, special_ids):
    cfg = model.config
    (rows, cols), cls = _grid(cfg)
    per_image = rows * cols + int(cls)
    f = text_stream("lm", inputs, special_ids)
    ids = torch.as_tensor(inputs["input_ids"]).cpu()
    owners = place_images(f, ids == cfg.image_token_id, per_image, (rows, cols), cls)
    within = image_index_in_example(owners)
    n = len(owners)
    return {
        "lm": as_positions(f, (rows, cols)),
        "vision": patch_grid_stream("vision", n, rows, cols, cls=True, example=owners, image_in_example=within),
        "connector": patch_grid_stream("connector", n, rows, cols, cls=cls, example=owners, image_in_example=within),
    }


def check(model, inputs) -> None:
    cfg = model.config
    (rows, cols), cls = _grid(cfg)
    ids = torch.as_tensor(inputs["input_ids"])
    pixels = inputs.get("pixel_values")
    n_images = 0 if pixels is None else pixels.shape[0]
    n_tokens = int((ids == cfg.image_token_id).sum())
    check_count(n_tokens, n_images, rows * cols + int(cls),
                f"{rows}x{cols} patches, vision_feature_select_strategy={cfg.vision_feature_select_strategy!r}")


def prompt(text: str, n_images: int, processor) -> str:
    token = getattr(processor, "image_token", "<image>")
    return text if token in text else (token + " ") * n_images + text


ADAPTER = Adapter(
    name="llava",
    classes=("LlavaForConditionalGeneration",),
    towers=(
        Tower("vision", "model.vision_tower.encoder.layers", "vision",
              embed=("model.vision_tower.embeddings", "output", None)),
        Tower("lm", "model.language_model.layers", "lm",
              embed=("model.language_model", "input", "inputs_embeds"), norm="model.language_model.norm"),
    ),
    extras=(
        Extra("connector.in", "model.multi_modal_projector", "input", "connector", arg="image_features"),
        Extra("connector.out", "model.multi_modal_projector", "output", "connector"),
        Extra("lm.logits", "lm_head", "output", "lm"),
    ),
    positions=positions,
    check=check,
    prompt=prompt,
)
