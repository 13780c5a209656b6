"""PaliGemma (`PaliGemmaForConditionalGeneration`): a SigLIP tower, one linear projector, Gemma.

The text is (S/p)^2 image tokens, <bos>, the prompt and "\\n" (the prefix, token_type_ids 0),
then the suffix (token_type_ids 1). Gemma attends bidirectionally within the prefix and causally
in the suffix; vlmscope's knockout edits the mask transformers builds, so it keeps that structure.
Positions add extra "prefix" (1 in the prefix, 0 in the suffix, -1 on padding). Without
token_type_ids the whole input is the prefix (bidirectional), except that transformers then
silently attends causally as soon as the batch is padded; vlmscope refuses that case.
"""

from __future__ import annotations

import torch

from vlmscope.errors import InputError
from vlmscope.model.adapters.base import Adapter, Extra
from vlmscope.model.adapters.common import (
    as_positions,
    check_count,
    grid_layout,
    image_tokens,
    place_images,
    rows_stream,
    text_stream,
)
from vlmscope.model.adapters.towers import decoder_tower, encoder_tower
from vlmscope.model.positions import PAD


def towers(model):
    return encoder_tower(model, "model.vision_tower"), decoder_tower(model, "model.language_model")


def _grid(model) -> tuple[int, int]:
    vc = model.config.vision_config
    return vc.image_size // vc.patch_size, vc.image_size // vc.patch_size


def positions(model, inputs, special_ids):
    grid = _grid(model)
    lay = grid_layout(*grid)
    f = text_stream("lm", inputs, special_ids)
    ids = torch.as_tensor(inputs["input_ids"]).cpu()
    is_image = ids == model.config.image_token_id
    n = -(-int(is_image.sum()) // len(lay["role"]))  # a partial image too, to name it
    owners, within = place_images(f, is_image, [image_tokens(lay)] * n)
    types = inputs.get("token_type_ids")
    prefix = torch.ones_like(ids) if types is None else (torch.as_tensor(types).cpu() == 0).long()
    f["extra"]["prefix"] = torch.where(f["role"] == PAD, -1, prefix)
    return {
        "lm": as_positions(f, grid),
        "vision": rows_stream("vision", [lay] * n, owners, within, grid),
        "connector": rows_stream("connector", [lay] * n, owners, within, grid),
    }


def check(model, inputs) -> None:
    if "input_ids" not in inputs:  # precomputed inputs_embeds: nothing to count
        return
    rows, cols = _grid(model)
    ids = torch.as_tensor(inputs["input_ids"])
    pixels = inputs.get("pixel_values")
    n_tokens = int((ids == model.config.image_token_id).sum())
    check_count(n_tokens, 0 if pixels is None else pixels.shape[0], rows * cols,
                f"{rows}x{cols} SigLIP patches")
    mask = inputs.get("attention_mask")
    if inputs.get("token_type_ids") is None and mask is not None and not bool(torch.as_tensor(mask).all()):
        raise InputError(
            "padded PaliGemma inputs need token_type_ids (0 on the prefix: image, prompt; 1 on the suffix), "
            "as the processor returns them: without them transformers attends bidirectionally over unpadded "
            "inputs but causally over padded ones, so results would depend on the batch"
        )


ADAPTER = Adapter(
    name="paligemma",
    classes=("PaliGemmaForConditionalGeneration",),
    towers=towers,
    extras=(
        Extra("connector.in", "model.multi_modal_projector", "input", "connector", arg="image_features",
              width="model.multi_modal_projector.linear.weight:1"),
        Extra("connector.out", "model.multi_modal_projector", "output", "connector",
              width="model.multi_modal_projector.linear.weight:0"),
        Extra("lm.logits", "lm_head", "output", "lm", width="lm_head.weight:0"),
    ),
    positions=positions,
    check=check,
    lm_causal=False,
)
