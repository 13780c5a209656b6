"""The concepts explanations speak of on the shapes world, and their ground-truth masks over a patch grid.

Object attributes: "colour=red", "shape=circle", "size=large", "cell=4" (an object whose grid cell is
4); the image: "domain=noisy" (every patch of a noisy-background image), "tone=dark" (every patch
of an image whose background grey level is below the middle of its range, `tone`); the patch itself:
"patch=4" (the patch at grid position 4, whatever it shows), "row=1" and "column=2" (every patch of
that grid row or column), "object" (a patch showing any object: the union of every value of every
attribute) and "background" (a patch showing none). Without these, a feature that fires at one
position whatever is there, or on every object, can only be named by an object attribute it does
not select.
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
}
SCENE_ATTRIBUTES = ("domain", "tone")  # properties of the whole image
MID_GREY = 128  # scenes draw their background grey from 96..160: below 128 is "dark"
PLACES = ("patch", "row", "column")  # where a patch is, whatever it shows
OBJECT_ATTRIBUTES = ("colour", "shape", "size", "cell")  # what the verification loop varies on an object
WHOLE = ("object", "background")  # concepts without a value


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


def all_concepts(attributes: Sequence[str] = (*VALUES, *WHOLE)) -> list[str]:
    """Every concept of the given attributes ("object" and "background" stand for themselves)."""
    unknown = [a for a in attributes if a not in VALUES and a not in WHOLE]
    if unknown:
        raise InputError(f"unknown attributes {unknown}; valid: {[*VALUES, *WHOLE]}")
    return [c for a in attributes for c in ([a] if a in WHOLE else [f"{a}={v}" for v in VALUES[a]])]


def concept_masks(scenes: Sequence, grid: int | tuple[int, int] = GRID,
                  concepts: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """concept -> (scene, rows, cols) bool: the patches of objects with that attribute value
    (`patch_objects` decides which object a patch shows); "domain=d" and "tone=t" cover whole images,
    "patch=k" the patch at row k // cols, column k % cols of every image."""
    concepts = list(concepts) if concepts is not None else all_concepts()
    owners = np.stack([patch_objects(s, grid) for s in scenes])  # (scene, rows, cols)
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
