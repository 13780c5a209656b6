"""The concepts explanations speak of on the shapes world, and their ground-truth masks over a patch grid.

Object attributes: "colour=red", "shape=circle", "size=large", "cell=4" (an object whose grid cell is
4); the image: "domain=noisy" (every patch of a noisy-background image), "tone=dark" (every patch
of an image whose background grey level is below the middle of its range, `tone`); the patch itself:
"patch=4" (the patch at grid position 4, whatever it shows), "row=1" and "column=2" (every patch of
that grid row or column), "object" (a patch showing any object: the union of every value of every
attribute) and "background" (a patch showing none). Without these, a feature that fires at one
position whatever is there, or on every object, can only be named by an object attribute it does
not select.

What a patch has seen (`SEEN`): "seen_colour=red" (a patch read after a patch showing a red object),
"seen_shape=...", "seen_size=...", and "seen=object" / "seen=none" (after some object / none). A
language model reads the image tokens in order and each attends to those before it, so its state at
a background patch can carry the objects read earlier; these concepts name that. They mean
nothing in a vision tower, whose patches all see each other.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from vlmscope.data import COLOURS, DOMAINS, SHAPES, SIZES, patch_objects
from vlmscope.data.vocab import GRID
from vlmscope.errors import InputError

VALUES: dict[str, tuple[str, ...]] = {
    "colour": COLOURS, "shape": SHAPES, "size": SIZES, "cell": tuple(str(k) for k in range(GRID * GRID)),
    "domain": DOMAINS, "patch": tuple(str(k) for k in range(GRID * GRID)),
    "row": tuple(str(k) for k in range(GRID)), "column": tuple(str(k) for k in range(GRID)),
    "tone": ("dark", "light"),
    "seen": ("none", "object"), "seen_colour": COLOURS, "seen_shape": SHAPES, "seen_size": SIZES,
}
SCENE_ATTRIBUTES = ("domain", "tone")  # properties of the whole image
MID_GREY = 128  # scenes draw their background grey from 96..160: below 128 is "dark"
PLACES = ("patch", "row", "column")  # where a patch is, whatever it shows
OBJECT_ATTRIBUTES = ("colour", "shape", "size", "cell")  # what the verification loop varies on an object
WHOLE = ("object", "background")  # concepts without a value
SEEN = ("seen", "seen_colour", "seen_shape", "seen_size")  # what patches read earlier show (a causal reader)


def tone(scene) -> str:
    """"dark" or "light": the scene's background grey level against the middle of its range."""
    return "dark" if scene.grey < MID_GREY else "light"


def scene_value(scene, attribute: str) -> str:
    """The scene's value of a whole-image attribute ("domain" or "tone")."""
    return scene.domain if attribute == "domain" else tone(scene)


def parse(explanation: str) -> tuple[str, str]:
    """"colour=red" -> ("colour", "red"), "object" -> ("object", ""), checked against the world's values."""
    if explanation.strip() in WHOLE:
        return explanation.strip(), ""
    attr, sep, value = explanation.partition("=")
    attr, value = attr.strip(), value.strip()
    if not sep or attr not in VALUES or value not in VALUES[attr]:
        valid = "; ".join([f"{a}={'|'.join(v)}" for a, v in VALUES.items()] + list(WHOLE))
        raise InputError(f"cannot read explanation {explanation!r}; valid: {valid}")
    return attr, value


def all_concepts(attributes: Sequence[str] = tuple(a for a in (*VALUES, *WHOLE) if a not in SEEN)) -> list[str]:
    """Every concept of the given attributes ("object" and "background" stand for themselves); by
    default every attribute but the `SEEN` ones, which only a causal reader's states can carry."""
    unknown = [a for a in attributes if a not in VALUES and a not in WHOLE]
    if unknown:
        raise InputError(f"unknown attributes {unknown}; valid: {[*VALUES, *WHOLE]}")
    return [c for a in attributes for c in ([a] if a in WHOLE else [f"{a}={v}" for v in VALUES[a]])]


def concept_masks(scenes: Sequence, grid: int | tuple[int, int] = GRID,
                  concepts: Sequence[str] | None = None, order: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
    """concept -> (scene, rows, cols) bool: the patches of objects with that attribute value
    (`patch_objects` decides which object a patch shows); "domain=d" and "tone=t" cover whole images,
    "patch=k" the patch at row k // cols, column k % cols of every image; a `SEEN` concept the patches
    read after one that shows such an object. order: the reading order, patch indices (row * cols +
    col) first to last; row by row by default."""
    concepts = list(concepts) if concepts is not None else all_concepts()
    owners = np.stack([patch_objects(s, grid) for s in scenes])  # (scene, rows, cols)
    rank = _ranks(owners.shape[1] * owners.shape[2], order)
    out = {}
    for c in concepts:
        attr, value = parse(c)
        m = np.zeros(owners.shape, dtype=bool)
        if attr in WHOLE:
            m = owners >= 0 if attr == "object" else owners < 0
        elif attr in PLACES:
            k, (rows, cols) = int(value), owners.shape[1:]
            if k >= {"patch": rows * cols, "row": rows, "column": cols}[attr]:
                raise InputError(f"{c!r} lies outside a {rows}x{cols} patch grid")
            if attr == "patch":
                m[:, k // cols, k % cols] = True
            elif attr == "row":
                m[:, k, :] = True
            else:
                m[:, :, k] = True
        elif attr in SEEN:
            m = _seen(scenes, owners, rank, attr, value)
        for i, s in enumerate(scenes):
            if attr in SCENE_ATTRIBUTES:
                m[i] = scene_value(s, attr) == value
                continue
            if attr not in OBJECT_ATTRIBUTES:
                continue
            for k, o in enumerate(s.objects):
                v = str(o.cell) if attr == "cell" else getattr(o, attr)
                if v == value:
                    m[i] |= owners[i] == k
        out[c] = torch.from_numpy(m)
    return out


def _ranks(n: int, order: Sequence[int] | None) -> np.ndarray:
    """(n,) each patch's place in the reading order."""
    if order is None:
        return np.arange(n)
    order = np.asarray(order)
    if sorted(order.tolist()) != list(range(n)):
        raise InputError(f"a reading order must list each of the {n} patches once; got {order.tolist()}")
    rank = np.empty(n, dtype=int)
    rank[order] = np.arange(n)
    return rank


def _seen(scenes, owners: np.ndarray, rank: np.ndarray, attr: str, value: str) -> np.ndarray:
    """(scene, rows, cols) bool: patches read after a patch showing an object with `attr`'s value
    ("seen=object": any object; "seen=none": no object before)."""
    flat = owners.reshape(len(owners), -1)  # (scene, patch)
    out = np.zeros(flat.shape, dtype=bool)
    for i, s in enumerate(scenes):
        if attr == "seen":
            shown = flat[i] >= 0
        else:
            key = attr.removeprefix("seen_")
            shown = np.array([k >= 0 and getattr(s.objects[k], key) == value for k in flat[i]], dtype=bool)
        if shown.any():
            out[i] = rank > rank[shown].min()
    if attr == "seen" and value == "none":
        out = ~out
    return out.reshape(owners.shape)
