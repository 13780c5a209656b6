"""CLIP (`CLIPModel`): a dual encoder. Sites: vision.* and text.* towers, the pooled and
projected embeddings (vision.norm, vision.proj, text.proj) and the image x text `logits`."""

from __future__ import annotations

import torch

from vlmscope.errors import InputError
from vlmscope.model.adapters.base import Adapter, Extra
from vlmscope.model.adapters.common import as_positions, text_stream
from vlmscope.model.adapters.towers import encoder, encoder_tower
from vlmscope.model.positions import patch_grid_stream


def positions(model, inputs, special_ids):
    """A dual encoder's streams (CLIP, SigLIP): "text" (bos / eos / pad ids typed special) and
    "vision" (one row per image: CLS if the tower has one, then the patches)."""
    vc = model.config.vision_config
    g = vc.image_size // vc.patch_size
    out = {}
    if "input_ids" in inputs:
        tc = model.config.text_config
        ids = (tc.bos_token_id, tc.eos_token_id, tc.pad_token_id)
        specials = special_ids | {i for i in ids if i is not None}
        out["text"] = as_positions(text_stream("text", inputs, frozenset(specials)), None)
    if inputs.get("pixel_values") is not None:
        cls = encoder(model, "vision_model").cls
        out["vision"] = patch_grid_stream("vision", inputs["pixel_values"].shape[0], g, g, cls=cls)
    return out


def check(model, inputs) -> None:
    """CLIP pools the text at the first EOS id; without one it silently pools position 0."""
    eos = model.config.text_config.eos_token_id
    if "input_ids" not in inputs or eos == 2:  # eos 2 is transformers' legacy argmax pooling
        return
    ids = torch.as_tensor(inputs["input_ids"])
    missing = (~(ids == eos).any(dim=1)).nonzero().flatten().tolist()
    if missing:
        raise InputError(
            f"text row(s) {missing} contain no EOS token (id {eos}); CLIP pools the text at the EOS token "
            "and would silently pool position 0. Tokenize with the model's processor, or append the EOS id."
        )


def towers(model):
    return encoder_tower(model, "vision_model"), encoder_tower(model, "text_model", "text")


ADAPTER = Adapter(
    name="clip",
    classes=("CLIPModel",),
    towers=towers,
    extras=(
        Extra("vision.norm", "vision_model.post_layernorm", "output", "vision", pooled=True,
              width="vision_model.post_layernorm.weight:0"),
        Extra("vision.proj", "visual_projection", "output", "vision", pooled=True,
              width="visual_projection.weight:0"),
        Extra("text.proj", "text_projection", "output", "text", pooled=True,
              width="text_projection.weight:0"),
        Extra("logits", "", "model_output", "vision", arg="logits_per_image"),
    ),
    positions=positions,
    check=check,
    dual_encoder=True,
)
