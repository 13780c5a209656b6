"""The concepts explanations speak of on the shapes world: "colour=red", "shape=circle",
"size=large", "cell=4", "domain=noisy", and their ground-truth masks over a patch grid."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from vlmscope.data import COLOURS, DOMAINS, SHAPES, SIZES, patch_objects
from vlmscope.data.vocab import GRID
from vlmscope.errors import InputError

VALUES: dict[str, tuple[str, ...]] = {
    "colour": COLOURS, "shape": SHAPES, "size": SIZES, "cell": tuple(str(k) for k in range(GRID * GRID)),
    "domain": DOMAINS,
}


def parse(explanation: str) -> tuple[str, str]:
    """"colour=red" -> ("colour", "red"), checked against the world's values."""
    attr, sep, value = explanation.partition("=")
    attr, value = attr.strip(), value.strip()
    if not sep or attr not in VALUES or value not in VALUES[attr]:
        valid = "; ".join(f"{a}={'|'.join(v)}" for a, v in VALUES.items())
        raise InputError(f"cannot read explanation {explanation!r}; valid: {valid}")
    return attr, value


def all_concepts(attributes: Sequence[str] = tuple(VALUES)) -> list[str]:
    return [f"{a}={v}" for a in attributes for v in VALUES[a]]


def concept_masks(scenes: Sequence, grid: int | tuple[int, int] = GRID,
                  concepts: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """concept -> (scene, rows, cols) bool: the patches of objects with that attribute value
    (`patch_objects` decides which object a patch shows); "domain=d" covers whole images of domain d."""
    concepts = list(concepts) if concepts is not None else all_concepts()
    owners = np.stack([patch_objects(s, grid) for s in scenes])  # (scene, rows, cols)
    out = {}
    for c in concepts:
        attr, value = parse(c)
        m = np.zeros(owners.shape, dtype=bool)
        for i, s in enumerate(scenes):
            if attr == "domain":
                m[i] = s.domain == value
                continue
            for k, o in enumerate(s.objects):
                v = str(o.cell) if attr == "cell" else getattr(o, attr)
                if v == value:
                    m[i] |= owners[i] == k
        out[c] = torch.from_numpy(m)
    return out
