"""Scenes of the shapes world: frozen values that fully determine an image (the pixel centre of each
object, including its jitter, and the seed of the background texture/noise are part of the scene)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from vlmscope.data.vocab import COLOURS, DOMAINS, GRID, POSITIONS, SHAPES, SIZES

IMAGE_SIZE = 72  # pixels per side
CELL = IMAGE_SIZE // GRID  # 24 px: one 24-px ViT patch per cell
RADIUS = {"small": 6, "large": 10}  # half-extent of an object's stencil, in pixels
JITTER = {"small": 3, "large": 1}  # max centre offset; keeps every object inside its own cell


@dataclass(frozen=True)
class Obj:
    """One object: attributes, grid cell (row * 3 + col) and pixel centre (x, y)."""

    shape: str
    colour: str
    size: str
    cell: int
    x: int
    y: int

    @property
    def row(self) -> int:
        return self.cell // GRID

    @property
    def col(self) -> int:
        return self.cell % GRID

    @property
    def position(self) -> str:
        """The one-word position of the object's cell, e.g. "top-left"."""
        return POSITIONS[self.cell]


@dataclass(frozen=True)
class Scene:
    """1-4 objects in distinct cells on a background of one domain (plain, textured or noisy)."""

    objects: tuple[Obj, ...]
    domain: str = "plain"
    grey: int = 128  # background grey level
    seed: int = 0  # seed of the background texture / noise
    size: int = IMAGE_SIZE

    def with_object(self, index: int, **changes: str) -> Scene:
        """The same scene with object `index` changed (e.g. colour="red"): a counterfactual."""
        objs = list(self.objects)
        objs[index] = replace(objs[index], **changes)
        return replace(self, objects=tuple(objs))


def place(rng: np.random.Generator, attrs: list[tuple[str, str]], cells: list[int] | None = None,
          domain: str | None = None) -> Scene:
    """A scene holding objects with the given (shape, colour) pairs, in random distinct cells (or the
    given ones), random sizes, jitter, background domain and grey level."""
    for shape, colour in attrs:
        if shape not in SHAPES or colour not in COLOURS:
            raise ValueError(f"bad object ({shape!r}, {colour!r}); shapes {SHAPES}, colours {COLOURS}")
    if cells is None:
        cells = [int(c) for c in rng.permutation(GRID * GRID)[: len(attrs)]]
    objs = []
    for (shape, colour), cell in zip(attrs, cells, strict=True):
        size = SIZES[int(rng.integers(len(SIZES)))]
        j = JITTER[size]
        dx, dy = (int(v) for v in rng.integers(-j, j + 1, size=2))
        x = (cell % GRID) * CELL + CELL // 2 + dx
        y = (cell // GRID) * CELL + CELL // 2 + dy
        objs.append(Obj(shape, colour, size, cell, x, y))
    return Scene(
        objects=tuple(objs),
        domain=domain if domain is not None else DOMAINS[int(rng.integers(len(DOMAINS)))],
        grey=int(rng.integers(96, 161)),
        seed=int(rng.integers(2**31)),
    )


def random_attrs(rng: np.random.Generator, n: int) -> list[tuple[str, str]]:
    """n independent uniformly random (shape, colour) pairs."""
    return [(SHAPES[int(rng.integers(len(SHAPES)))], COLOURS[int(rng.integers(len(COLOURS)))])
            for _ in range(n)]


def sample_scene(rng: np.random.Generator, min_objects: int = 1, max_objects: int = 4) -> Scene:
    """A scene of uniformly random objects (count uniform in [min_objects, max_objects])."""
    n = int(rng.integers(min_objects, max_objects + 1))
    return place(rng, random_attrs(rng, n))
