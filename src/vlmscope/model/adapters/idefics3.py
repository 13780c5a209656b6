"""Idefics3 and SmolVLM (`Idefics3ForConditionalGeneration`, `SmolVLMForConditionalGeneration`).

The processor splits an image into rows x cols sub-images and adds the whole image resized (the
global image), each an S x S tile; pixel_values are (batch, max_tiles, 3, S, S), all-zero tiles
being padding. The SigLIP-style tower sees one row per real tile (g x g patches, no CLS); the
connector pixel-shuffles scale x scale patches into one token and projects it, so each tile
puts (g/scale)^2 tokens into the LM. In the text, each sub-image is
<fake_token_around_image><row_r_col_c> + tokens, rows end with "\\n", then
<fake_token_around_image><global-img> + tokens + <fake_token_around_image>.

The model reads only the image-token ids; vlmscope recovers the tiles from the runs of image
tokens and the layout above: the tile tag before each run (the global image's tag is the one
before the last run of every image), and the row breaks (one more token between two sub-images
than within a row). Positions: `tile` (order within the image: sub-images in raster order, then
the global image), `row`/`col` in the tile's token grid, and extras "tile_row"/"tile_col" (-1 for
the global image) and "orig_row"/"orig_col" (the token's place in the whole split image).
"""

from __future__ import annotations

import torch

from vlmscope.errors import InputError
from vlmscope.model.adapters.base import Adapter, Extra
from vlmscope.model.adapters.common import (
    Layout,
    as_positions,
    cat_layouts,
    check_total,
    grid_layout,
    place_images,
    rows_stream,
    text_stream,
)
from vlmscope.model.adapters.towers import decoder_tower, encoder_tower
from vlmscope.model.positions import SPECIAL

VISION = "model.vision_model"


def towers(model):
    return encoder_tower(model, VISION), decoder_tower(model, "model.text_model")


def _grids(model) -> tuple[int, int]:
    """(patches per tile side, tokens per tile side)."""
    vc = model.config.vision_config
    g = vc.image_size // vc.patch_size
    return g, g // model.config.scale_factor


def _runs(ids: torch.Tensor, image_id: int, per_tile: int) -> list[tuple[int, int]]:
    """(start, stop) of each tile's run of image tokens in one row."""
    where = (ids == image_id).nonzero().flatten()
    return [(int(where[k]), int(where[k]) + per_tile) for k in range(0, len(where), per_tile)]


def _tags(ids: torch.Tensor, image_id: int, per_tile: int) -> torch.Tensor:
    """(batch, pos) mask of the tokens framing the tiles: <fake_token_around_image> and the tile tag
    before each run, the <fake_token_around_image> after each global image."""
    mask = torch.zeros_like(ids, dtype=torch.bool)
    for b, row in enumerate(ids):
        for image in split_rows(row, image_id, per_tile, spans=True):
            for start, _ in image:
                mask[b, max(start - 2, 0):start] = True
            mask[b, image[-1][1]:image[-1][1] + 1] = True
    return mask & (ids != image_id)


def split_rows(ids: torch.Tensor, image_id: int, per_tile: int,
               spans: bool = False) -> list[list[tuple[int, int]]]:
    """For one row of ids: each image's tiles as (tile_row, tile_col), -1 for the global image (or,
    with spans=True, as the (start, stop) of their runs of image tokens)."""
    runs = _runs(ids, image_id, per_tile)
    if not runs:
        return []
    tags = [int(ids[s - 1]) if s > 0 else -1 for s, _ in runs]
    global_tag = tags[-1]  # every image ends with its global tile
    images, current = [], []
    for k, tag in enumerate(tags):
        current.append(k)
        if tag == global_tag:
            images.append(current)
            current = []
    if current:
        raise InputError("a row's image tokens do not end with a global image (<global-img> tile); build "
                         "Idefics3 inputs with its processor")
    if spans:
        return [[runs[k] for k in tiles] for tiles in images]
    out = []
    for tiles in images:
        subs = tiles[:-1]
        gaps = [runs[b][0] - runs[a][1] for a, b in zip(subs, subs[1:], strict=False)]
        # within a row of sub-images two tokens separate the runs (fake token, tag); a row break adds "\n"
        cols = next((j + 1 for j, gap in enumerate(gaps) if gap != 2), len(subs))
        grid_ok = cols > 0 and len(subs) % cols == 0
        out.append([divmod(j, cols) if grid_ok else (-1, -1) for j in range(len(subs))] + [(-1, -1)])
    return out


def tile_layout(model, tile: int, tile_row: int, tile_col: int, merged: bool) -> Layout:
    g, t = _grids(model)
    side = t if merged else g
    lay = grid_layout(side, side, tile=tile, tile_row=tile_row, tile_col=tile_col)
    inside = tile_row >= 0
    lay["orig_row"] = lay["row"] + tile_row * side if inside else torch.full_like(lay["row"], -1)
    lay["orig_col"] = lay["col"] + tile_col * side if inside else torch.full_like(lay["col"], -1)
    return lay


def positions(model, inputs, special_ids):
    g, t = _grids(model)
    image_id = model.config.image_token_id
    f = text_stream("lm", inputs, special_ids)
    ids = torch.as_tensor(inputs["input_ids"]).cpu()
    images = [img for row in ids for img in split_rows(row, image_id, t * t)]
    tiles = [(k, tr, tc) for img in images for k, (tr, tc) in enumerate(img)]
    lm = [cat_layouts([tile_layout(model, k, tr, tc, merged=True) for k, (tr, tc) in enumerate(img)])
          for img in images]
    owners, within = place_images(f, ids == image_id, lm)
    f["role"][_tags(ids, image_id, t * t)] = SPECIAL
    per_image = torch.tensor([len(img) for img in images], dtype=torch.long)
    ex, im = owners.repeat_interleave(per_image), within.repeat_interleave(per_image)
    return {
        "lm": as_positions(f, (t, t)),
        "vision": rows_stream("vision", [tile_layout(model, *tile, merged=False) for tile in tiles], ex, im,
                              (g, g)),
        "connector": rows_stream("connector", [tile_layout(model, *tile, merged=True) for tile in tiles], ex,
                                 im, (t, t)),
    }


def check(model, inputs) -> None:
    if "input_ids" not in inputs:  # precomputed inputs_embeds: nothing to count
        return
    _, t = _grids(model)
    ids = torch.as_tensor(inputs["input_ids"])
    n_tokens = int((ids == model.config.image_token_id).sum())
    pixels = inputs.get("pixel_values")
    if pixels is None:
        return
    if pixels.dim() != 5:
        raise InputError("Idefics3 / SmolVLM pixel_values must be 5-D (batch, tiles, 3, height, width), got "
                         f"shape {tuple(pixels.shape)}; the processor returns them so")
    if pixels.device.type == "meta":
        return
    real = int((pixels.flatten(2) != 0).any(-1).sum())  # all-zero tiles are padding
    check_total(n_tokens, real * t * t,
                f"{real} real tiles (sub-images and global images) of {t * t} tokens each")


def prompt(text: str, n_images: int, processor) -> str:
    token = getattr(processor, "image_token", "<image>")
    return text if token in text else token * n_images + text


ADAPTER = Adapter(
    name="idefics3",
    classes=("Idefics3ForConditionalGeneration", "SmolVLMForConditionalGeneration"),
    towers=towers,
    extras=(
        Extra("connector.in", "model.connector", "input", "vision",
              width=f"{VISION}.post_layernorm.weight:0"),
        Extra("connector.out", "model.connector", "output", "connector",
              width="model.connector.modality_projection.proj.weight:0"),
        Extra("lm.logits", "lm_head", "output", "lm", width="lm_head.weight:0"),
    ),
    positions=positions,
    check=check,
    prompt=prompt,
)
