"""Ground truth of the shapes world, aligned with a zoo model's token positions.

These helpers turn world facts (the object at every patch, the answer of every question, the
changed object of a counterfactual pair) into per-position labels and token ids, so that every
method's output can be scored against what is known to be true.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from vlmscope.data import COLOURS, POSITIONS, SHAPES, SIZES, patch_objects, render
from vlmscope.data.counterfactual import CounterfactualPair, sip_pair, str_pair
from vlmscope.data.sampling import Example, ask, standard_examples

ATTRIBUTES = {"colour": COLOURS, "shape": SHAPES, "size": SIZES, "cell": POSITIONS}


def inputs_for(vlm, examples: Sequence[Example]) -> dict[str, Any]:
    """Model inputs for (scene, question) examples, through the model's own processor."""
    images = [render(ex.scene) for ex in examples]
    return vlm.prepare(images, [ex.question.text for ex in examples])


def answer_ids(vlm, examples: Sequence[Example]) -> torch.Tensor:
    tok = vlm.tokenizer
    return torch.tensor(tok.convert_tokens_to_ids([ex.question.answer for ex in examples]))


def object_value(obj, attribute: str) -> int:
    if attribute == "cell":
        return obj.cell
    if attribute not in ATTRIBUTES:
        raise ValueError(f"unknown attribute {attribute!r}; valid: {', '.join(ATTRIBUTES)}")
    return ATTRIBUTES[attribute].index(getattr(obj, attribute))


def patch_labels(vlm, inputs, scenes: Sequence, attribute: str, stream: str = "lm",
                 background: int | None = None) -> torch.Tensor:
    """(batch, pos) label of the object at each image-patch position of a stream: the index of its
    `attribute` value; background patches get `background` (None: -1, i.e. skipped), and
    non-patch positions -1. Rows of vision streams are images (one per example here)."""
    pos = vlm.positions(inputs)[stream]
    labels = torch.full(pos.shape, -1, dtype=torch.long)
    patch = pos.row >= 0
    rows = int(pos.row[patch].max()) + 1
    cols = int(pos.col[patch].max()) + 1
    for b in range(pos.shape[0]):
        scene = scenes[int(pos.example[b])]
        owner = patch_objects(scene, (rows, cols))
        for p in patch[b].nonzero().flatten().tolist():
            k = owner[int(pos.row[b, p]), int(pos.col[b, p])]
            if k >= 0:
                labels[b, p] = object_value(scene.objects[k], attribute)
            elif background is not None:
                labels[b, p] = background
    return labels


def examples(seed: int, n: int, family: str | None = None) -> list[Example]:
    """n fresh examples of a seed: all six families in turn, or one family."""
    if family is None:
        return standard_examples(seed, n)
    rng = np.random.default_rng([seed, 104729])
    return [ask(rng, family) for _ in range(n)]


def counterfactual_pairs(seed: int, n: int, kind: str = "sip", families: Sequence[str] = ("colour", "shape"),
                         ) -> list[CounterfactualPair]:
    """n SIP or STR pairs whose answers differ, from the given question families."""
    make = {"sip": sip_pair, "str": str_pair}[kind]
    rng = np.random.default_rng([seed, 1299709])
    out: list[CounterfactualPair] = []
    while len(out) < n:
        ex = ask(rng, families[len(out) % len(families)])
        pair = make(ex, rng)
        if pair is not None:
            out.append(pair)
    return out


def pair_inputs(vlm, seed: int, n: int, kind: str = "sip"):
    """Model inputs of n counterfactual pairs (clean, corrupt) and their answer ids (clean, corrupt)."""
    pairs = counterfactual_pairs(seed, n, kind)
    clean = inputs_for(vlm, [p.clean for p in pairs])
    corrupt = inputs_for(vlm, [p.corrupt for p in pairs])
    return clean, corrupt, answer_ids(vlm, [p.clean for p in pairs]), answer_ids(vlm, [p.corrupt for p in pairs])
