"""Typed token positions: what each position of a token stream is (image patch, text, special).

Users select positions by role ("image", "text", "last"), by a patch box, or explicitly; the
selection is resolved here into a boolean mask (batch, pos), so methods never count indices.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import torch

from vlmscope.errors import InterventionError

ROLES = ("pad", "text", "image", "special")
PAD, TEXT, IMAGE, SPECIAL = range(4)


@dataclass(frozen=True)
class PatchBox:
    """Image tokens whose patch row is in [row0, row1) and column in [col0, col1).

    `image` restricts to one image of each example (its index within the example); `tile`
    to one tile of tiled (any-resolution) inputs.
    """

    row0: int
    row1: int
    col0: int
    col1: int
    image: int | None = None
    tile: int | None = None


PositionSpec = Union[None, str, int, slice, Sequence[int], PatchBox, torch.Tensor, Sequence[Any]]


@dataclass(frozen=True)
class Positions:
    """Per-position facts for one token stream of a batch, each a (batch, pos) long tensor.

    `image` is the image's index within its example, `row`/`col` the patch's place in its
    image's (or tile's) grid, `tile` the tile index; -1 where it does not apply. `example`
    maps each row to the example it belongs to (vision streams hold one row per image); a packed
    stream (one row holding the tokens of every image, as Qwen2-VL's vision tower sees them) has
    `example` -1 and says whose each position is in `extra["example"]`. Families add their own
    facts in `extra` (see docs/adapters.md), e.g. "orig_row"/"orig_col", "tile_row"/"tile_col".
    """

    stream: str
    role: torch.Tensor
    image: torch.Tensor
    row: torch.Tensor
    col: torch.Tensor
    tile: torch.Tensor
    example: torch.Tensor
    grid: tuple[int, int] | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # e.g. "orig_row"/"orig_col"

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.role.shape)  # type: ignore[return-value]

    def __repr__(self) -> str:
        counts = {r: int((self.role == i).sum()) for i, r in enumerate(ROLES)}
        return f"Positions(stream={self.stream!r}, shape={self.shape}, roles={counts}, grid={self.grid})"

    def example_of(self, rows: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """The example each (row, position) pair belongs to."""
        if "example" in self.extra:
            return self.extra["example"][rows, pos]
        return self.example[rows]

    def roles(self, b: int = 0) -> list[str]:
        """Role names of row `b`, one per position."""
        return [ROLES[int(r)] for r in self.role[b]]

    def valid(self) -> torch.Tensor:
        return self.role != PAD

    @property
    def has_patches(self) -> bool:
        """Whether any position is an image patch (a resampler's queries, e.g. BLIP-2's, are not)."""
        return bool((self.row >= 0).any())

    def last(self) -> torch.Tensor:
        """Index of each row's last non-pad position (right or left padding alike)."""
        t = self.role.shape[1]
        idx = torch.arange(t).expand_as(self.role)
        return torch.where(self.valid(), idx, -1).max(dim=1).values

    def select(self, spec: PositionSpec) -> torch.Tensor:
        """Resolve a position spec into a boolean mask (batch, pos)."""
        b, t = self.role.shape
        if spec is None or (isinstance(spec, str) and spec == "all"):
            return self.valid()
        if isinstance(spec, str):
            if spec == "last":
                mask = torch.zeros(b, t, dtype=torch.bool)
                mask[torch.arange(b), self.last()] = True
                return mask
            if spec in ROLES:
                return self.role == ROLES.index(spec)
            raise InterventionError(
                f"unknown position role {spec!r}; valid: 'all', 'last', {', '.join(map(repr, ROLES))}, "
                "an index, a list of indices, a slice, a PatchBox or a (batch, pos) bool tensor"
            )
        if isinstance(spec, PatchBox):
            mask = (
                (self.role == IMAGE)
                & (self.row >= spec.row0) & (self.row < spec.row1)
                & (self.col >= spec.col0) & (self.col < spec.col1)
            )
            if spec.image is not None:
                mask &= self.image == spec.image
            if spec.tile is not None:
                mask &= self.tile == spec.tile
            return mask
        if isinstance(spec, torch.Tensor) and spec.dtype == torch.bool:
            if spec.shape == (t,):
                return spec.expand(b, t).clone()
            if spec.shape == (b, t):
                return spec.clone()
            raise InterventionError(
                f"a boolean position mask must have shape ({t},) or ({b}, {t}); got {tuple(spec.shape)}")
        if isinstance(spec, slice):
            mask = torch.zeros(b, t, dtype=torch.bool)
            mask[:, spec] = True
            return mask
        if isinstance(spec, int) or (isinstance(spec, torch.Tensor) and spec.ndim == 0):
            return self._indices([int(spec)])
        if isinstance(spec, torch.Tensor):
            return self._indices(spec.tolist())
        if isinstance(spec, Sequence) and len(spec) == b and any(not isinstance(s, int) for s in spec):
            # one spec per row
            rows = [self.select(s)[i] for i, s in enumerate(spec)]
            return torch.stack(rows)
        if isinstance(spec, Sequence) and all(isinstance(s, int) for s in spec):
            return self._indices(list(spec))
        raise InterventionError(f"cannot read positions from {spec!r} ({type(spec).__name__})")

    def _indices(self, idx: list[int]) -> torch.Tensor:
        b, t = self.role.shape
        bad = [i for i in idx if not -t <= i < t]
        if bad:
            raise InterventionError(
                f"position(s) {bad} out of range for the {self.stream!r} stream of length {t} "
                f"(valid: {-t}..{t - 1})"
            )
        mask = torch.zeros(b, t, dtype=torch.bool)
        mask[:, [i % t for i in idx]] = True
        return mask

    def to_dataframe(self, tokens: Sequence[Sequence[str]] | None = None):
        """One row per (batch row, position): role, image, row, col, tile (and token if given)."""
        import pandas as pd

        b, t = self.role.shape
        data = {
            "row_in_batch": torch.arange(b).repeat_interleave(t).tolist(),
            "example": self.example.repeat_interleave(t).tolist(),
            "position": torch.arange(t).repeat(b).tolist(),
            "role": [ROLES[int(r)] for r in self.role.flatten()],
            "image": self.image.flatten().tolist(),
            "patch_row": self.row.flatten().tolist(),
            "patch_col": self.col.flatten().tolist(),
            "tile": self.tile.flatten().tolist(),
        }
        for k, v in self.extra.items():
            data[k] = v.flatten().tolist()
        if tokens is not None:
            data["token"] = [tok for row in tokens for tok in row]
        return pd.DataFrame(data)


def blank(stream: str, batch: int, length: int, example: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Fields of a Positions filled with 'text' roles and -1 image coordinates, to be edited."""
    minus = torch.full((batch, length), -1, dtype=torch.long)
    return {
        "stream": stream,
        "role": torch.full((batch, length), TEXT, dtype=torch.long),
        "image": minus.clone(),
        "row": minus.clone(),
        "col": minus.clone(),
        "tile": minus.clone(),
        "example": torch.arange(batch) if example is None else example,
    }


def patch_grid_stream(stream: str, n_images: int, rows: int, cols: int, cls: bool,
                      example: torch.Tensor | None = None,
                      image_in_example: torch.Tensor | None = None) -> Positions:
    """Positions of a vision-tower stream (one row per image): an optional CLS token, then the
    patches in raster order. `example`/`image_in_example` say whose image each row is."""
    length = rows * cols + int(cls)
    f = blank(stream, n_images, length, example)
    f["role"][:] = IMAGE
    start = int(cls)
    if cls:
        f["role"][:, 0] = SPECIAL
    idx = torch.arange(rows * cols)
    f["row"][:, start:] = idx // cols
    f["col"][:, start:] = idx % cols
    img = torch.zeros(n_images, dtype=torch.long) if image_in_example is None else image_in_example
    f["image"][:, start:] = img[:, None]
    return Positions(**f, grid=(rows, cols))
