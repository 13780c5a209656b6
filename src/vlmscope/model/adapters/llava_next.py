"""LLaVA-NeXT (`LlavaNextForConditionalGeneration`): LLaVA with any-resolution tiles.

Each image of size (H, W) (`image_sizes`) is resized onto the best pinpoint grid of
tiles_h x tiles_w tiles of S x S, plus a base tile (the whole image resized to S x S). The vision
tower sees one row per tile (base first, then the grid tiles in raster order). The LM sees the
base tile's tokens, then the grid tiles' patches re-joined into one (tiles_h*g) x (tiles_w*g)
grid with the padding the resize added cut away ("unpadded"), row by row, each row ended by the
learned `image_newline` embedding.

Positions: `tile` (0 = base, 1.. = grid tiles), `row`/`col` within the tile, and extras
"tile_row"/"tile_col" (the tile's place in the tile grid; -1 for the base tile), "orig_row"/
"orig_col" (the patch's place in the unpadded grid, i.e. in the original image, in patches; -1
for the base tile and for padding), "newline" (1 on the newline tokens, which are typed special,
belong to their image and carry the orig_row they end; 0 on the image's other tokens).
"""

from __future__ import annotations

import torch
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

from vlmscope.errors import InputError
from vlmscope.model.adapters import llava
from vlmscope.model.adapters.base import Adapter
from vlmscope.model.adapters.common import (
    Layout,
    as_positions,
    cat_layouts,
    check_total,
    image_tokens,
    place_images,
    rows_stream,
    text_stream,
)
from vlmscope.model.positions import IMAGE, SPECIAL


def _plan(model, size) -> tuple[int, int, torch.Tensor]:
    """(tiles_h, tiles_w, kept): kept[i, j] is the padded-grid index (R * width + C) of the patch at
    row i, column j of the unpadded grid (transformers' own `unpad_image` on an index grid)."""
    cfg = model.config
    g, _ = llava.patch_grid(model)
    th, tw = get_anyres_image_grid_shape(list(size), cfg.image_grid_pinpoints, cfg.vision_config.image_size)
    idx = torch.arange(th * g * tw * g).view(1, th * g, tw * g)
    return th, tw, unpad_image(idx, [int(v) for v in size])[0]


def tile_layouts(model, size) -> list[Layout]:
    """The vision-tower rows of one image: the base tile, then the grid tiles in raster order."""
    g, _ = llava.patch_grid(model)
    th, tw, kept = _plan(model, size)
    top, left = divmod(int(kept[0, 0]), tw * g)
    h, w = kept.shape
    tiles = [llava.vision_layout(model, tile=0, tile_row=-1, tile_col=-1, orig_row=-1, orig_col=-1)]
    for t in range(th * tw):
        tr, tc = divmod(t, tw)
        lay = llava.vision_layout(model, tile=t + 1, tile_row=tr, tile_col=tc)
        patch = lay["row"] >= 0
        r, c = lay["row"] + tr * g - top, lay["col"] + tc * g - left  # place in the unpadded grid
        inside = patch & (r >= 0) & (r < h) & (c >= 0) & (c < w)
        lay["orig_row"], lay["orig_col"] = torch.where(inside, r, -1), torch.where(inside, c, -1)
        tiles.append(lay)
    return tiles


def lm_layout(model, size) -> Layout:
    """The LM tokens of one image: the base tile, then the unpadded grid row by row, each row
    followed by a newline token."""
    g, _ = llava.patch_grid(model)
    th, tw, kept = _plan(model, size)
    top, left = divmod(int(kept[0, 0]), tw * g)
    h, w = kept.shape
    base = image_tokens(llava.connector_layout(model, tile_layouts(model, size)[0]))
    base["newline"] = torch.zeros_like(base["role"])
    R = torch.arange(h)[:, None].expand(h, w + 1) + top  # (row, col) in the padded grid; col w = newline
    C = torch.arange(w + 1)[None].expand(h, w + 1) + left
    newline = (torch.arange(w + 1) == w)[None].expand(h, w + 1)
    grid = {
        "role": torch.where(newline, SPECIAL, IMAGE),
        "tile": torch.where(newline, -1, 1 + (R // g) * tw + C // g),
        "row": torch.where(newline, -1, R % g), "col": torch.where(newline, -1, C % g),
        "tile_row": torch.where(newline, -1, R // g), "tile_col": torch.where(newline, -1, C // g),
        "orig_row": R - top, "orig_col": torch.where(newline, -1, C - left),
        "newline": newline.long(),
    }
    return cat_layouts([base, {k: v.flatten() for k, v in grid.items()}])


def _sizes(inputs) -> list[tuple[int, int]]:
    sizes = inputs.get("image_sizes")
    if sizes is None:
        raise InputError("LLaVA-NeXT inputs need image_sizes (one (height, width) per image) next to "
                         "pixel_values; the processor returns it")
    return [tuple(int(v) for v in s) for s in torch.as_tensor(sizes).tolist()]


def positions(model, inputs, special_ids):
    f = text_stream("lm", inputs, special_ids)
    ids = torch.as_tensor(inputs["input_ids"]).cpu()
    sizes = _sizes(inputs) if (ids == model.config.image_token_id).any() else []
    owners, within = place_images(f, ids == model.config.image_token_id, [lm_layout(model, s) for s in sizes])
    tiles = [tile_layouts(model, s) for s in sizes]
    per_tile = [len(t) for t in tiles]
    rows = [lay for t in tiles for lay in t]
    ex, im = owners.repeat_interleave(torch.tensor(per_tile, dtype=torch.long)), \
        within.repeat_interleave(torch.tensor(per_tile, dtype=torch.long))
    grid = llava.patch_grid(model)
    return {
        "lm": as_positions(f, grid),
        "vision": rows_stream("vision", rows, ex, im, grid),
        "connector": rows_stream("connector", [llava.connector_layout(model, lay) for lay in rows], ex, im,
                                 grid),
    }


def check(model, inputs) -> None:
    if "input_ids" not in inputs:  # precomputed inputs_embeds: nothing to count
        return
    ids = torch.as_tensor(inputs["input_ids"])
    n_tokens = int((ids == model.config.image_token_id).sum())
    if inputs.get("pixel_values") is None and n_tokens == 0:
        return
    sizes = _sizes(inputs)
    pixels = inputs.get("pixel_values")
    if pixels is not None and pixels.shape[0] != len(sizes) and pixels.dim() == 5:
        raise InputError(f"pixel_values hold {pixels.shape[0]} images but image_sizes {len(sizes)}")
    expected = sum(len(lm_layout(model, s)["role"]) for s in sizes)
    check_total(n_tokens, expected,
                f"{len(sizes)} image(s) of sizes {sizes}: base tile + unpadded tile grid + one newline per "
                "grid row")


ADAPTER = Adapter(
    name="llava_next",
    classes=("LlavaNextForConditionalGeneration",),
    towers=llava.towers,
    extras=llava.EXTRAS,  # the same projector (its `image_newline` is a parameter, not a site)
    positions=positions,
    check=check,
    prompt=llava.prompt,
)
