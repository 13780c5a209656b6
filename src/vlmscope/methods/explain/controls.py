"""The controlled scenes of the verification loop: single-object bases of the shapes world and
their variations, one attribute at a time (`controlled_scenes`), the object moved through every
cell and removed (`patch_variants`), or every combination of the attributes a formula names
(`formula_scenes`)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from vlmscope.data.scene import CELL, JITTER, Scene, place, random_attrs
from vlmscope.data.vocab import DOMAINS, GRID
from vlmscope.methods.explain.compose import atoms, parse_formula
from vlmscope.methods.explain.concepts import (
    MID_GREY,
    OBJECT_ATTRIBUTES,
    PLACES,
    SCENE_ATTRIBUTES,
    SEEN,
    VALUES,
    WHOLE,
    parse,
    tone,
)


def base_scenes(n: int, seed: int = 0) -> list[Scene]:
    """n random single-object scenes (random shape, colour, size, cell, background)."""
    rng = np.random.default_rng([seed, 4241])
    return [place(rng, random_attrs(rng, 1), domain=DOMAINS[int(rng.integers(len(DOMAINS)))]) for _ in range(n)]


def vary(scene: Scene, attribute: str, value: str) -> Scene:
    """The scene with its first object's `attribute` (or the background's domain or tone) set to
    `value`; a tone change mirrors the grey level about the middle of its range (dark 100 <-> light 155)."""
    if attribute == "domain":
        return replace(scene, domain=value)
    if attribute == "tone":
        return scene if tone(scene) == value else replace(scene, grey=2 * MID_GREY - 1 - scene.grey)
    if attribute == "cell":
        o, k = scene.objects[0], int(value)
        dx, dy = o.x - (o.col * CELL + CELL // 2), o.y - (o.row * CELL + CELL // 2)
        return scene.with_object(0, cell=k, x=(k % GRID) * CELL + CELL // 2 + dx, y=(k // GRID) * CELL + CELL // 2 + dy)
    if attribute == "size":  # a large object tolerates less jitter: pull the centre in if needed
        o, j = scene.objects[0], JITTER[value]
        cx, cy = o.col * CELL + CELL // 2, o.row * CELL + CELL // 2
        x, y = cx + max(-j, min(j, o.x - cx)), cy + max(-j, min(j, o.y - cy))
        return scene.with_object(0, size=value, x=x, y=y)
    return scene.with_object(0, **{attribute: value})


def controlled_scenes(attribute: str, bases: Sequence[Scene]) -> list[Scene]:
    """Every base with `attribute` set to each of its values, base-major (base * values + value)."""
    return [vary(b, attribute, v) for b in bases for v in VALUES[attribute]]


def empty_scenes(bases: Sequence[Scene]) -> list[Scene]:
    """Every base with its object removed: the same background, nothing on it."""
    return [replace(b, objects=()) for b in bases]


def patch_variants(bases: Sequence[Scene]) -> list[Scene]:
    """Every base with its object in each cell, then empty, base-major (base * (cells + 1) + variant)."""
    cells = controlled_scenes("cell", bases)
    n = len(VALUES["cell"])
    return [s for i, e in enumerate(empty_scenes(bases)) for s in (*cells[i * n:(i + 1) * n], e)]


def object_values() -> tuple[str, ...]:
    """The values `judge_object` sees, attribute-major: "colour=red", ..., "cell=8"."""
    return tuple(f"{a}={v}" for a in OBJECT_ATTRIBUTES for v in VALUES[a])


def _moves_object(explanation: str) -> tuple[set[str], bool]:
    """The attributes a formula names, and whether it speaks of places, objects, background or what
    earlier patches show (its scenes then move the object through every cell and remove it)."""
    kinds = {parse(a)[0] for a in atoms(parse_formula(explanation))}
    return kinds, bool(kinds & {*PLACES, *WHOLE, *SEEN})


def formula_axes(explanation: str) -> tuple[str, ...]:
    """The attributes a formula's controlled scenes vary together: those it names ("patch",
    "object", "background" and the `SEEN` concepts move the object through every cell, "cell";
    "seen_colour" varies the object's colour)."""
    return scene_axes(*_moves_object(explanation))


def formula_key(explanation: str) -> tuple[tuple[str, ...], bool]:
    """What fixes a formula's controlled scenes (`formula_scenes`): the attributes varied together, and
    whether an object is read after the varied one (it names a `SEEN` concept). Formulas with one key
    can share their scenes; "colour=red AND column=1" and "colour=red AND seen_colour=green" cannot."""
    kinds, moves = _moves_object(explanation)
    return scene_axes(kinds, moves), bool(kinds & set(SEEN))


def scene_axes(kinds, moves: bool) -> tuple[str, ...]:
    """The object and scene attributes among `kinds` (a `SEEN` attribute stands for the object's:
    "seen_colour" for "colour"), in a fixed order, with "cell" when the object is to move through
    every cell (`moves`)."""
    kinds = {k.removeprefix("seen_") if k in SEEN else k for k in kinds}
    return tuple(a for a in (*OBJECT_ATTRIBUTES, *SCENE_ATTRIBUTES) if a in kinds or (a == "cell" and moves))


def formula_scenes(explanation: str, bases: Sequence[Scene], max_scenes: int = 3000) -> list[Scene]:
    """Controlled scenes for a formula: from each base, every combination of values of the attributes
    it names (`formula_axes`), everything else held fixed, plus the base emptied when it speaks of
    patches, objects or background; only as many bases (at least 8) as keep it under `max_scenes`.
    A formula of what earlier patches show (`SEEN`) also gets each scene with a second object read
    after the varied one (`seen_scenes`)."""
    return kind_scenes(_moves_object(explanation)[0], bases, max_scenes)


def kind_scenes(kinds, bases: Sequence[Scene], max_scenes: int = 3000) -> list[Scene]:
    """The controlled scenes for the attribute kinds `kinds` (a formula's, or those a reading adds):
    their values varied together; the object moved through every cell and removed when they speak
    of places, objects, background or what earlier patches show; an object read after it for the
    last (`seen_scenes`)."""
    kinds = set(kinds)
    moves = bool(kinds & {*PLACES, *WHOLE, *SEEN})
    return seen_scenes(scene_axes(kinds, moves), bases, moves, max_scenes, bool(kinds & set(SEEN)))


def seen_scenes(axes: Sequence[str], bases: Sequence[Scene], empty: bool, max_scenes: int = 3000,
                seen: bool = True) -> list[Scene]:
    """`axis_scenes`, and when `seen`, within the same budget, each of them again with the base's own
    object added in the cell read last (row by row, as the zoo's language model reads its image
    tokens): an object read after the varied one, so that "seen_colour=red AND object" can be tested."""
    if not seen:
        return axis_scenes(axes, bases, empty, max_scenes)
    scenes = axis_scenes(axes, bases, empty, max_scenes // 2)
    per = math.prod(len(VALUES[a]) for a in axes) + empty  # scenes per base
    last = GRID * GRID - 1
    return scenes + [read_after(s, bases[i // per], last) for i, s in enumerate(scenes)
                     if s.objects and s.objects[0].cell != last]


def read_after(scene: Scene, base: Scene, cell: int) -> Scene:
    """`scene` with the base's object added in `cell`, at the same offset from its cell's centre."""
    o = vary(base, "cell", str(cell)).objects[0]
    return replace(scene, objects=(*scene.objects, o))


def axis_scenes(axes: Sequence[str], bases: Sequence[Scene], empty: bool = False, max_scenes: int = 3000
                ) -> list[Scene]:
    """From each base, every combination of values of the object and scene attributes `axes`, then the
    base emptied when `empty`, base-major; only as many bases (at least 8) as keep it under `max_scenes`."""
    combos = list(itertools.product(*(VALUES[a] for a in axes)))
    n = max(8, min(len(bases), max_scenes // (len(combos) + empty)))
    out = []
    for b in bases[:n]:
        for combo in combos:
            s = b
            for a, v in zip(axes, combo):
                s = vary(s, a, v)
            out.append(s)
        if empty:
            out.append(replace(b, objects=()))
    return out
