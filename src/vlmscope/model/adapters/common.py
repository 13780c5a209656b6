"""Helpers shared by adapters: typing a token stream from input ids."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from vlmscope.errors import InputError
from vlmscope.model.positions import IMAGE, PAD, SPECIAL, Positions, blank


def text_stream(stream: str, inputs: Mapping[str, Any], special_ids: frozenset[int],
                ids_key: str = "input_ids", mask_key: str = "attention_mask") -> dict[str, torch.Tensor]:
    """Positions fields of a token stream with text / special / pad roles filled in."""
    if ids_key not in inputs:
        raise InputError(f"inputs have no {ids_key!r}; keys given: {', '.join(inputs)}")
    ids = torch.as_tensor(inputs[ids_key]).cpu()
    f = blank(stream, *ids.shape)
    if special_ids:
        f["role"][torch.isin(ids, torch.tensor(sorted(special_ids)))] = SPECIAL
    mask = inputs.get(mask_key)
    if mask is not None:
        f["role"][torch.as_tensor(mask).cpu() == 0] = PAD
    return f


def place_images(f: dict[str, torch.Tensor], is_image: torch.Tensor, per_image: int, grid: tuple[int, int],
                 cls: bool) -> torch.Tensor:
    """Type the image tokens of a stream, `per_image` consecutive tokens per image in raster order
    (after one CLS token when `cls`). Returns the example of each image, in order."""
    rows, cols = grid
    owners = []
    for b in range(is_image.shape[0]):
        where = is_image[b].nonzero().flatten()
        k = torch.arange(len(where))
        j = k % per_image - int(cls)
        f["role"][b, where] = IMAGE
        f["image"][b, where] = k // per_image
        f["row"][b, where] = torch.where(j >= 0, j // cols, -1)
        f["col"][b, where] = torch.where(j >= 0, j % cols, -1)
        owners += [b] * (len(where) // per_image)
    return torch.tensor(owners, dtype=torch.long)


def image_index_in_example(owners: torch.Tensor) -> torch.Tensor:
    """For images listed in order with their example index, each image's index within its example."""
    out = torch.zeros_like(owners)
    for b in owners.unique():
        sel = owners == b
        out[sel] = torch.arange(int(sel.sum()))
    return out


def check_count(n_tokens: int, n_images: int, per_image: int, why: str) -> None:
    if n_tokens != n_images * per_image:
        raise InputError(
            f"the inputs hold {n_images} image(s) but {n_tokens} image tokens; each image takes {per_image} "
            f"tokens here ({why}), so {n_images * per_image} were expected. Build inputs with VLM.prepare or "
            "the model's processor."
        )


def as_positions(f: dict[str, torch.Tensor], grid) -> Positions:
    return Positions(**f, grid=grid)
