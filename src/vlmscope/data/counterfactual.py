"""Counterfactual pairs for causal methods (activation patching, Zhang & Nanda 2024 terminology):
SIP, semantic image pairs (the same scene with one object's colour or shape changed so that the answer
changes; the changed object and its patches are known), and STR, symmetric token replacement (one
question word swapped for another of its kind so that the answer changes)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vlmscope.data.questions import SLOTS, answer_of
from vlmscope.data.render import patch_objects
from vlmscope.data.sampling import Example
from vlmscope.data.vocab import COLOURS, RELATIONS, SHAPES

_VALUES = {"shape": SHAPES, "colour": COLOURS, "relation": RELATIONS}


@dataclass(frozen=True)
class CounterfactualPair:
    """A clean and a corrupt example whose answers differ. kind "sip": images differ in
    `changed_object` only (same question); kind "str": questions differ in word `changed_word`."""

    kind: str
    clean: Example
    corrupt: Example
    changed_object: int | None = None
    changed_word: int | None = None  # index into the question's words (the prompt's text part)

    @property
    def clean_answer(self) -> str:
        return self.clean.question.answer

    @property
    def corrupt_answer(self) -> str:
        return self.corrupt.question.answer

    def answer_ids(self, vocab: dict[str, int]) -> tuple[int, int]:
        """Token ids of the clean and the corrupt answer (e.g. for a logit-difference metric)."""
        return vocab[self.clean_answer], vocab[self.corrupt_answer]

    def changed_patches(self, grid: int | tuple[int, int]) -> np.ndarray:
        """(rows, cols) bool: patches the changed object occupies in either image (SIP only)."""
        if self.changed_object is None:
            raise ValueError("changed_patches is defined for SIP pairs only (kind 'sip')")
        a = patch_objects(self.clean.scene, grid) == self.changed_object
        return a | (patch_objects(self.corrupt.scene, grid) == self.changed_object)


def sip_pair(example: Example, rng: np.random.Generator) -> CounterfactualPair | None:
    """Change one object's colour or shape so that the same question gets another (well-posed) answer;
    None when no single change does (e.g. "where" questions, whose referent would vanish)."""
    scene, q = example.scene, example.question
    options = [(i, attr, v) for i, o in enumerate(scene.objects) for attr in ("colour", "shape")
               for v in _VALUES[attr] if v != getattr(o, attr)]
    for k in rng.permutation(len(options)):
        i, attr, value = options[int(k)]
        changed = scene.with_object(i, **{attr: value})
        new_q = answer_of(changed, q.family, q.slots)
        if new_q is not None and new_q.answer != q.answer:
            return CounterfactualPair("sip", example, Example(changed, new_q), changed_object=i)
    return None


def str_pair(example: Example, rng: np.random.Generator) -> CounterfactualPair | None:
    """Swap one question word (a shape, colour or relation) for another of its kind so that the
    question stays well-posed on the same image and its answer changes; None if no swap does."""
    q = example.question
    kinds = SLOTS[q.family]
    options = [(j, v) for j, kind in enumerate(kinds) for v in _VALUES[kind] if v != q.slots[j]]
    for k in rng.permutation(len(options)):
        j, value = options[int(k)]
        slots = q.slots[:j] + (value,) + q.slots[j + 1 :]
        new_q = answer_of(example.scene, q.family, slots)
        # "left of" -> "above" would change the length: not a symmetric replacement
        same_length = new_q is not None and len(new_q.text.split()) == len(q.text.split())
        if same_length and new_q.answer != q.answer:
            word = _word_index(q.text, new_q.text)
            return CounterfactualPair("str", example, Example(example.scene, new_q), changed_word=word)
    return None


def _word_index(a: str, b: str) -> int:
    """Index of the single word in which two equally long questions differ."""
    diff = [i for i, (x, y) in enumerate(zip(a.split(), b.split(), strict=True)) if x != y]
    if len(diff) != 1:
        raise AssertionError(f"STR questions must differ in one word: {a!r} vs {b!r}")
    return diff[0]
