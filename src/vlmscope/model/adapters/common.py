"""Helpers shared by adapters: typing token streams from input ids and per-image token layouts.

A *layout* says what each token one image (or one tile) puts into a stream is: a dict of 1-D long
tensors, one entry per token, with keys among "role", "row", "col", "tile" and any family-specific
extra ("orig_row", "query", ...). Adapters build layouts from the config and the inputs, then
place them: into the LM stream where the image-token ids are (`place_images`), as one row per
image / tile (`rows_stream`), or packed into one row (`packed_stream`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from vlmscope.errors import InputError
from vlmscope.model.positions import IMAGE, PAD, SPECIAL, Positions, blank

Layout = dict[str, torch.Tensor]
_FIELDS = ("role", "image", "row", "col", "tile")


def text_stream(stream: str, inputs: Mapping[str, Any], special_ids: frozenset[int],
                ids_key: str = "input_ids", mask_key: str = "attention_mask") -> dict[str, Any]:
    """Positions fields of a token stream with text / special / pad roles filled in."""
    if ids_key not in inputs:
        raise InputError(f"inputs have no {ids_key!r}; keys given: {', '.join(inputs)}")
    ids = torch.as_tensor(inputs[ids_key]).cpu()
    f: dict[str, Any] = blank(stream, *ids.shape)
    f["extra"] = {}
    if special_ids:
        f["role"][torch.isin(ids, torch.tensor(sorted(special_ids)))] = SPECIAL
    mask = inputs.get(mask_key)
    if mask is not None:
        f["role"][torch.as_tensor(mask).cpu() == 0] = PAD
    return f


def grid_layout(rows: int, cols: int, cls: bool = False, **extra: int) -> Layout:
    """An image's patches in raster order, after a CLS token (role special, no grid place) when `cls`.
    Keyword arguments add constant fields (tile=2, ...)."""
    k = torch.arange(rows * cols)
    lay = {"role": torch.full((rows * cols,), IMAGE), "row": k // cols, "col": k % cols}
    if cls:
        first = {key: torch.tensor([SPECIAL if key == "role" else -1]) for key in lay}
        lay = {key: torch.cat([first[key], v]) for key, v in lay.items()}
    n = len(lay["role"])
    lay.update({key: torch.full((n,), v) for key, v in extra.items()})
    return lay


def cat_layouts(layouts: Sequence[Layout]) -> Layout:
    """Layouts one after the other (the tiles of one image); keys missing in one are -1 there."""
    keys = list(dict.fromkeys(k for lay in layouts for k in lay))
    out = {}
    for key in keys:
        out[key] = torch.cat([lay.get(key, torch.full((len(lay["role"]),), -1)) for lay in layouts])
    return out


def drop_first(lay: Layout) -> Layout:
    """The layout without its first token (LLaVA's "default" feature strategy drops it)."""
    return {k: v[1:] for k, v in lay.items()}


def image_tokens(lay: Layout) -> Layout:
    """The layout as the LM sees it: every token is image content (a CLS token too), role image."""
    return {**lay, "role": torch.full_like(lay["role"], IMAGE)}


def _put(f: dict[str, Any], key: str, b, idx, value) -> None:
    if key in _FIELDS:
        f[key][b, idx] = value
    else:
        f["extra"].setdefault(key, torch.full_like(f["role"], -1))[b, idx] = value


def place_images(f: dict[str, Any], is_image: torch.Tensor, layouts: Sequence[Layout]) -> tuple[torch.Tensor,
                                                                                                torch.Tensor]:
    """Type the image tokens of a stream: image k's layout fills the next len(layout) image tokens,
    row by row in order (as transformers' masked_scatter fills them). Returns each image's example
    and its index within the example."""
    owners, within, k = [], [], 0
    for b in range(is_image.shape[0]):
        where = is_image[b].nonzero().flatten()
        start, i = 0, 0
        while start < len(where):
            if k == len(layouts):
                raise InputError(f"row {b} holds more image tokens than {len(layouts)} image(s) account for")
            n = len(layouts[k]["role"])
            if start + n > len(where):
                raise InputError(f"row {b} ends inside image {k}: it needs {n} image tokens, "
                                 f"{len(where) - start} are left. Build inputs with VLM.prepare or the "
                                 "model's processor.")
            idx = where[start:start + n]
            for key, v in layouts[k].items():
                _put(f, key, b, idx, v)
            f["image"][b, idx] = i
            owners.append(b)
            within.append(i)
            start, i, k = start + n, i + 1, k + 1
    if k != len(layouts):
        raise InputError(f"the inputs hold {len(layouts)} image(s) but image tokens for only {k}")
    return torch.tensor(owners, dtype=torch.long), torch.tensor(within, dtype=torch.long)


def rows_stream(stream: str, layouts: Sequence[Layout], example: torch.Tensor, image: torch.Tensor,
                grid: tuple[int, int] | None) -> Positions:
    """A stream holding one row per layout (a vision tower's batch of images or tiles), each row of
    `example` and its `image` within the example."""
    n = max((len(lay["role"]) for lay in layouts), default=0)
    f: dict[str, Any] = blank(stream, len(layouts), n, example)
    f["role"][:] = PAD
    f["extra"] = {}
    for r, lay in enumerate(layouts):
        idx = torch.arange(len(lay["role"]))
        f["image"][r, idx] = image[r]
        for key, v in lay.items():
            _put(f, key, r, idx, v)
    return Positions(**f, grid=grid)


def packed_stream(stream: str, layouts: Sequence[Layout], example: torch.Tensor, image: torch.Tensor,
                  grid: tuple[int, int] | None, order: torch.Tensor | None = None,
                  extra: Layout | None = None) -> Positions:
    """A stream packing every layout into one row (Qwen2-VL's vision tower), optionally reordered
    by `order` and given more per-position fields (`extra`, after the reordering);
    extra["example"] says whose each position is, `image` which of its example's images."""
    parts = [{**lay, "example": torch.full_like(lay["role"], int(e)),
              "image": torch.full_like(lay["role"], int(i))}
             for lay, e, i in zip(layouts, example, image, strict=True)]
    lay = cat_layouts(parts) if parts else {"role": torch.zeros(0, dtype=torch.long)}
    if order is not None:
        lay = {k: v[order] for k, v in lay.items()}
    lay.update(extra or {})
    return rows_stream(stream, [lay], torch.tensor([-1]), torch.tensor([-1]), grid)


def common_grid(grids: Sequence[tuple[int, int]]) -> tuple[int, int] | None:
    """The grid shared by all images, or None when sizes differ (dynamic resolution)."""
    return grids[0] if grids and all(g == grids[0] for g in grids) else None


def check_count(n_tokens: int, n_images: int, per_image: int, why: str) -> None:
    if n_tokens != n_images * per_image:
        raise InputError(
            f"the inputs hold {n_images} image(s) but {n_tokens} image tokens; each image takes {per_image} "
            f"tokens here ({why}), so {n_images * per_image} were expected. Build inputs with VLM.prepare or "
            "the model's processor."
        )


def check_total(n_tokens: int, expected: int, why: str) -> None:
    if n_tokens != expected:
        raise InputError(
            f"the inputs hold {n_tokens} image tokens but their images take {expected} ({why}). Build inputs "
            "with VLM.prepare or the model's processor."
        )


def as_positions(f: dict[str, Any], grid) -> Positions:
    return Positions(**f, grid=grid)
