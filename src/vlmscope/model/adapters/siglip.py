"""SigLIP (`SiglipModel`): a dual encoder like CLIP, trained with a sigmoid loss.

Sites: vision.* and text.* towers; vision.norm (post-layernorm, every patch), vision.proj (the
attention-pooling head's output), text.norm, text.proj (the head applied to the last token) and
`logits`: logits_per_image = exp(logit_scale) * cos + logit_bias, to be read through a sigmoid
(p(image i matches text j) = sigmoid(logits[i, j]), each pair on its own), not a softmax over texts.

Towers and positions are CLIP's (the vision tower has no CLS token). The text tower pools the last position,
so texts are padded to max_position_embeddings as the processor does; those pad tokens are
attended to (there is no attention mask), so positions type them special, not pad.
"""

from __future__ import annotations

from vlmscope.model.adapters.base import Adapter, Extra
from vlmscope.model.adapters.clip import positions, towers

ADAPTER = Adapter(
    name="siglip",
    classes=("SiglipModel",),
    towers=towers,
    extras=(
        Extra("vision.proj", "vision_model.head", "output", "vision", pooled=True,
              width="vision_model.head.mlp.fc2.weight:0"),
        Extra("text.proj", "text_model.head", "output", "text", pooled=True,
              width="text_model.head.weight:0"),
        Extra("logits", "", "model_output", "vision", arg="logits_per_image"),
    ),
    positions=positions,
    dual_encoder=True,
)
