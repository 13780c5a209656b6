"""BLIP-2 and InstructBLIP (`Blip2ForConditionalGeneration`, `InstructBlipForConditionalGeneration`).

An EVA ViT (CLS + patches), then the Q-Former as the connector: `num_query_tokens` learned
queries (and, in InstructBLIP, the instruction's tokens, `qformer_input_ids`) run through
BERT-style post-norm layers; the queries cross-attend into the image. `language_projection` maps
the queries' outputs into the LM (OPT for BLIP-2-OPT, Vicuna/Llama for InstructBLIP), where they
replace the image-token ids, one token per query.

Streams: "vision" (one row per image), "qformer" (the Q-Former's self-attention sequence: the
queries, then the instruction tokens), "connector" (the queries alone: cross-attention, the
queries' MLP, connector.out) and "lm". Query tokens have role image and no patch grid (row/col
-1, `grid` None); extra "query" gives their index. Sites: connector.in (the image features the
queries attend to), connector.embed, connector.blocks.{i}.* (see towers.QFormerLayout),
connector.out.
"""

from __future__ import annotations

import torch

from vlmscope.errors import InputError
from vlmscope.model.adapters.base import Adapter, Extra, Tower
from vlmscope.model.adapters.common import (
    as_positions,
    check_count,
    grid_layout,
    place_images,
    rows_stream,
    text_stream,
)
from vlmscope.model.adapters.towers import decoder_tower, encoder_tower
from vlmscope.model.positions import IMAGE, Positions

QFORMER = "qformer.encoder.layer"


def towers(model):
    return (
        encoder_tower(model, "vision_model"),
        Tower("connector", QFORMER, "qformer", embed=(f"{QFORMER}.0", "input", "hidden_states")),
        decoder_tower(model, "language_model"),
    )


def _queries(model) -> dict[str, torch.Tensor]:
    q = torch.arange(model.config.num_query_tokens)
    return {"role": torch.full_like(q, IMAGE), "query": q}


def _instructed(model) -> bool:
    return type(model).__name__.startswith("InstructBlip")


def positions(model, inputs, special_ids):
    cfg = model.config
    vc = cfg.vision_config
    queries = _queries(model)
    f = text_stream("lm", inputs, special_ids)
    ids = torch.as_tensor(inputs["input_ids"]).cpu()
    is_image = ids == cfg.image_token_id
    owners, within = place_images(f, is_image, [queries] * -(-int(is_image.sum()) // cfg.num_query_tokens))
    n = len(owners)
    g = vc.image_size // vc.patch_size
    out = {
        "lm": as_positions(f, None),
        "vision": rows_stream("vision", [grid_layout(g, g, cls=True)] * n, owners, within, (g, g)),
        "connector": rows_stream("connector", [queries] * n, owners, within, None),
        "qformer": rows_stream("qformer", [queries] * n, owners, within, None),
    }
    if _instructed(model) and "qformer_input_ids" in inputs:
        out["qformer"] = _with_instruction(out["qformer"], inputs)
    return out


def _with_instruction(q: Positions, inputs) -> Positions:
    """The queries' positions followed by the instruction tokens'."""
    t = text_stream("qformer", inputs, frozenset(), "qformer_input_ids", "qformer_attention_mask")
    fields = {k: torch.cat([getattr(q, k), t[k]], dim=1) for k in ("role", "image", "row", "col", "tile")}
    fields["image"][:, q.shape[1]:] = q.image[:, :1]  # the instruction belongs to the row's image
    extra = {"query": torch.cat([q.extra["query"], torch.full_like(t["role"], -1)], dim=1)}
    return Positions("qformer", **fields, example=q.example, grid=None, extra=extra)


def check(model, inputs) -> None:
    if "input_ids" not in inputs:  # precomputed inputs_embeds: nothing to count
        return
    cfg = model.config
    ids = torch.as_tensor(inputs["input_ids"])
    pixels = inputs.get("pixel_values")
    n_images = 0 if pixels is None else pixels.shape[0]
    n_tokens = int((ids == cfg.image_token_id).sum())
    check_count(n_tokens, n_images, cfg.num_query_tokens,
                f"num_query_tokens={cfg.num_query_tokens}; transformers does not check this and would "
                "silently leave image tokens unfilled, or fail inside masked_scatter")
    if _instructed(model) and pixels is not None:
        q = inputs.get("qformer_input_ids")
        if q is None:
            raise InputError("InstructBLIP inputs need qformer_input_ids (the instruction in the Q-Former's "
                             "vocabulary, and its qformer_attention_mask); the processor returns them")
        if q.shape[0] != n_images:
            raise InputError(f"qformer_input_ids has {q.shape[0]} rows but pixel_values {n_images} images; "
                             "give one instruction per image")


ADAPTER = Adapter(
    name="blip2",
    classes=("Blip2ForConditionalGeneration", "InstructBlipForConditionalGeneration"),
    towers=towers,
    extras=(
        Extra("connector.in", "qformer", "input", "vision", arg="encoder_hidden_states",
              width="vision_model.post_layernorm.weight:0"),
        Extra("connector.out", "language_projection", "output", "connector",
              width="language_projection.weight:0"),
        Extra("lm.logits", "language_model.lm_head", "output", "lm", width="language_model.lm_head.weight:0"),
    ),
    positions=positions,
    check=check,
)
