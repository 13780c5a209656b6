"""Questions about scenes: six families with one-word answers, each a template with slots whose
answer is computed from the scene alone (`answer_of`), plus captions for contrastive training."""

from __future__ import annotations

from dataclasses import dataclass

from vlmscope.data.scene import Scene
from vlmscope.data.vocab import COUNTS, FAMILIES, PLURALS, POSITIONS

RELATION_WORDS = {"left": "left of", "right": "right of", "above": "above", "below": "below"}
SLOTS = {  # slot names per family, in template order
    "colour": ("shape",), "shape": ("colour",), "count": ("shape",), "where": ("colour", "shape"),
    "exists": ("colour", "shape"), "relation": ("colour", "shape", "relation", "colour", "shape"),
}


@dataclass(frozen=True)
class Question:
    """A question, its one-word answer, and the object(s) the answer is read from (None if none)."""

    family: str
    slots: tuple[str, ...]  # slot words in template order, see SLOTS
    answer: str
    target_object: int | None = None
    other_object: int | None = None  # the second object of a relation question

    @property
    def text(self) -> str:
        return question_text(self.family, self.slots)


def question_text(family: str, slots: tuple[str, ...]) -> str:
    """The question's words, space separated (one token per word)."""
    if family not in SLOTS or len(slots) != len(SLOTS[family]):
        raise ValueError(f"bad question {family!r} {slots!r}; families and slots: {SLOTS}")
    s = slots
    if family == "colour":
        return f"what colour is the {s[0]} ?"
    if family == "shape":
        return f"what shape is the {s[0]} object ?"
    if family == "count":
        return f"how many {PLURALS[s[0]]} are there ?"
    if family == "where":
        return f"where is the {s[0]} {s[1]} ?"
    if family == "exists":
        return f"is there a {s[0]} {s[1]} ?"
    return f"is the {s[0]} {s[1]} {RELATION_WORDS[s[2]]} the {s[3]} {s[4]} ?"


def _find(scene: Scene, colour: str | None, shape: str | None) -> list[int]:
    return [
        i for i, o in enumerate(scene.objects)
        if (colour is None or o.colour == colour) and (shape is None or o.shape == shape)
    ]


def holds(relation: str, a_cell: int, b_cell: int) -> bool:
    """Whether object at cell a is `relation` (left/right/above/below) of object at cell b."""
    (ar, ac), (br, bc) = divmod(a_cell, 3), divmod(b_cell, 3)
    table = {"left": ac < bc, "right": ac > bc, "above": ar < br, "below": ar > br}
    if relation not in table:
        raise ValueError(f"unknown relation {relation!r}; valid: {tuple(table)}")
    return table[relation]


def answer_of(scene: Scene, family: str, slots: tuple[str, ...]) -> Question | None:
    """The question with its answer read from the scene; None when a "the ..." phrase does not pick
    out exactly one object (the question would be ill-posed)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; valid: {FAMILIES}")
    objs = scene.objects
    if family == "count":
        return Question(family, slots, COUNTS[len(_find(scene, None, slots[0]))])
    if family == "exists":
        hits = _find(scene, slots[0], slots[1])
        return Question(family, slots, "yes" if hits else "no", hits[0] if hits else None)
    if family == "colour":
        hits = _find(scene, None, slots[0])
    elif family == "shape":
        hits = _find(scene, slots[0], None)
    else:
        hits = _find(scene, slots[0], slots[1])
    if len(hits) != 1:
        return None
    t = hits[0]
    if family == "colour":
        return Question(family, slots, objs[t].colour, t)
    if family == "shape":
        return Question(family, slots, objs[t].shape, t)
    if family == "where":
        return Question(family, slots, POSITIONS[objs[t].cell], t)
    other = _find(scene, slots[3], slots[4])
    if len(other) != 1 or other[0] == t:
        return None
    yes = holds(slots[2], objs[t].cell, objs[other[0]].cell)
    return Question(family, slots, "yes" if yes else "no", t, other[0])


def caption(scene: Scene) -> str:
    """A full description, objects in reading order: "a large red circle at top-left and ... ."."""
    ordered = sorted(scene.objects, key=lambda o: o.cell)
    parts = [f"a {o.size} {o.colour} {o.shape} at {o.position}" for o in ordered]
    return " and ".join(parts) + f" on a {scene.domain} background ."
