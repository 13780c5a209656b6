"""Sampling (scene, question) examples: the standard generator (uniform scenes of 1-4 objects,
balanced answers) and the binding curriculum ("hard": 2-3 objects sharing attributes with the target,
so that answering from a random object is wrong), as in the zoo training pilots (pilot 3)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vlmscope.data.questions import Question, answer_of, holds
from vlmscope.data.scene import Scene, place
from vlmscope.data.vocab import COLOURS, FAMILIES, GRID, RELATIONS, SHAPES

Pair = tuple[str, str]  # (shape, colour)


@dataclass(frozen=True)
class Example:
    """A scene and one question about it."""

    scene: Scene
    question: Question


def _pick(rng: np.random.Generator, values: tuple[str, ...], exclude: tuple[str, ...] = ()) -> str:
    pool = [v for v in values if v not in exclude]
    return pool[int(rng.integers(len(pool)))]


def _pair(rng: np.random.Generator, shapes: tuple[str, ...] = (), colours: tuple[str, ...] = ()) -> Pair:
    """A random (shape, colour) avoiding the given shapes and colours."""
    return _pick(rng, SHAPES, shapes), _pick(rng, COLOURS, colours)


def _pair_not(rng: np.random.Generator, banned: list[Pair]) -> Pair:
    """A random (shape, colour) that is none of `banned`."""
    while True:
        p = _pair(rng)
        if p not in banned:
            return p


def _sharing_one(rng: np.random.Generator, target: Pair) -> Pair:
    """A distractor with the target's shape or its colour, never both."""
    if rng.random() < 0.5:
        return target[0], _pick(rng, COLOURS, (target[1],))
    return _pick(rng, SHAPES, (target[0],)), target[1]


def _n_objects(rng: np.random.Generator, hard: bool, lo: int) -> int:
    if hard and rng.random() < 0.9:
        return int(rng.integers(max(lo, 2), 4))
    return int(rng.integers(lo, 5))


def _scene(rng: np.random.Generator, attrs: list[Pair], cells: list[int] | None = None) -> Scene:
    """Place attrs (and their cells, if given) in shuffled order, so the target is not always object 0."""
    order = [int(i) for i in rng.permutation(len(attrs))]
    shuffled = [attrs[i] for i in order]
    return place(rng, shuffled, None if cells is None else [cells[i] for i in order])


def _colour_or_shape(rng: np.random.Generator, family: str, hard: bool) -> Example:
    t = _pair(rng)
    n = _n_objects(rng, hard, 1)
    if family == "colour":  # the shape names the target: others have other shapes
        others = [_pair(rng, (t[0],), (t[1],) if hard else ()) for _ in range(n - 1)]
    else:  # the colour names the target
        others = [_pair(rng, (t[0],) if hard else (), (t[1],)) for _ in range(n - 1)]
    scene = _scene(rng, [t, *others])
    slots = (t[0],) if family == "colour" else (t[1],)
    return Example(scene, answer_of(scene, family, slots))


def _count(rng: np.random.Generator, hard: bool) -> Example:
    k = int(rng.integers(0, 4))
    shape = _pick(rng, SHAPES)
    n = min(4, k + int(rng.integers(1, 3))) if hard else int(rng.integers(max(k, 1), 5))
    attrs = [(shape, _pick(rng, COLOURS)) for _ in range(k)] + [_pair(rng, (shape,)) for _ in range(n - k)]
    scene = _scene(rng, attrs)
    return Example(scene, answer_of(scene, "count", (shape,)))


def _where(rng: np.random.Generator, hard: bool) -> Example:
    t = _pair(rng)
    n = _n_objects(rng, hard, 1)
    others = [_sharing_one(rng, t) if hard else _pair_not(rng, [t]) for _ in range(n - 1)]
    scene = _scene(rng, [t, *others])
    return Example(scene, answer_of(scene, "where", (t[1], t[0])))


def _exists(rng: np.random.Generator, hard: bool) -> Example:
    t = _pair(rng)
    yes = rng.random() < 0.5
    n = _n_objects(rng, hard, 1 if yes else 2 if hard else 1)
    if hard and not yes:  # the colour and the shape are both present, on different objects
        attrs = [(t[0], _pick(rng, COLOURS, (t[1],))), (_pick(rng, SHAPES, (t[0],)), t[1])]
        attrs += [_sharing_one(rng, t) for _ in range(n - 2)]
    else:
        others = [_sharing_one(rng, t) if hard else _pair_not(rng, [t]) for _ in range(n - 1)]
        attrs = [t, *others] if yes else [_pair_not(rng, [t]), *others]
    scene = _scene(rng, attrs)
    return Example(scene, answer_of(scene, "exists", (t[1], t[0])))


def _relation(rng: np.random.Generator, hard: bool) -> Example:
    a = _pair(rng)
    b = _pair_not(rng, [a])
    n = _n_objects(rng, hard, 2)
    others = [_sharing_one(rng, (a, b)[int(rng.integers(2))]) if hard else _pair_not(rng, [a, b])
              for _ in range(n - 2)]
    others = [p if p not in (a, b) else _pair_not(rng, [a, b]) for p in others]
    rel = RELATIONS[int(rng.integers(len(RELATIONS)))]
    want = rng.random() < 0.5
    while True:
        cells = [int(c) for c in rng.permutation(GRID * GRID)[:n]]
        if holds(rel, cells[0], cells[1]) == want:
            break
    scene = _scene(rng, [a, b, *others], cells)
    return Example(scene, answer_of(scene, "relation", (a[1], a[0], rel, b[1], b[0])))


def ask(rng: np.random.Generator, family: str, hard: bool = False) -> Example:
    """One example of a family; hard=True draws from the binding curriculum."""
    if family in ("colour", "shape"):
        ex = _colour_or_shape(rng, family, hard)
    elif family == "count":
        ex = _count(rng, hard)
    elif family == "where":
        ex = _where(rng, hard)
    elif family == "exists":
        ex = _exists(rng, hard)
    elif family == "relation":
        ex = _relation(rng, hard)
    else:
        raise ValueError(f"unknown family {family!r}; valid: {FAMILIES}")
    assert ex.question is not None, "generator built an ill-posed question"
    return ex


def standard_examples(seed: int, n: int) -> list[Example]:
    """The standard evaluation set of a seed: n examples, families in turn (example i asks family
    i % 6), so that each family gets n // 6 or one more."""
    rng = np.random.default_rng([seed, 7919])
    return [ask(rng, FAMILIES[i % len(FAMILIES)]) for i in range(n)]


def example_batch(n: int, seed: int = 0) -> tuple[list[np.ndarray], list[str]]:
    """n standard examples as processor inputs: uint8 HWC images and prompts ("<image> question")."""
    from vlmscope.data.render import render
    from vlmscope.data.tokenizer import prompt

    examples = standard_examples(seed, n)
    return [render(e.scene) for e in examples], [prompt(e.question.text) for e in examples]
