"""Counterfactual pairs: SIP images differ exactly in the stated object, STR questions in one word,
and in both the answer changes to the one the scene implies."""

import numpy as np

from vlmscope.data import object_mask, render, sip_pair, standard_examples, str_pair, vocabulary
from vlmscope.data.questions import answer_of


def test_sip_pairs_differ_exactly_in_the_stated_object():
    rng = np.random.default_rng(0)
    n_pairs = 0
    for ex in standard_examples(21, 300):
        pair = sip_pair(ex, rng)
        if pair is None:
            continue
        n_pairs += 1
        i = pair.changed_object
        a, b = pair.clean.scene, pair.corrupt.scene
        changed = [j for j in range(len(a.objects)) if a.objects[j] != b.objects[j]]
        assert changed == [i] and len(a.objects) == len(b.objects)
        assert (a.objects[i].colour != b.objects[i].colour) + (a.objects[i].shape != b.objects[i].shape) == 1
        assert (a.domain, a.grey, a.seed) == (b.domain, b.grey, b.seed)
        assert pair.clean.question.text == pair.corrupt.question.text
        assert pair.clean_answer != pair.corrupt_answer
        assert answer_of(b, ex.question.family, ex.question.slots).answer == pair.corrupt_answer
        # pixels differ only where the changed object is, in either image
        obj_pixels = (object_mask(a) == i) | (object_mask(b) == i)
        diff = (render(a) != render(b)).any(-1)
        assert diff.any() and not (diff & ~obj_pixels).any()
        patches = pair.changed_patches(3)
        assert patches.sum() == 1 and patches.ravel()[a.objects[i].cell]
        clean_id, corrupt_id = pair.answer_ids(vocabulary())
        assert clean_id != corrupt_id
    assert n_pairs > 150


def test_sip_is_impossible_for_where_and_relation():
    rng = np.random.default_rng(1)
    for ex in standard_examples(22, 60):
        if ex.question.family in ("where", "relation"):
            assert sip_pair(ex, rng) is None


def test_str_pairs_swap_one_word_and_change_the_answer():
    rng = np.random.default_rng(2)
    n_pairs = 0
    for ex in standard_examples(23, 300):
        pair = str_pair(ex, rng)
        if pair is None:
            continue
        n_pairs += 1
        assert pair.clean.scene == pair.corrupt.scene
        a, b = pair.clean.question.text.split(), pair.corrupt.question.text.split()
        assert len(a) == len(b) and [k for k in range(len(a)) if a[k] != b[k]] == [pair.changed_word]
        assert pair.clean_answer != pair.corrupt_answer
        corrupt = pair.corrupt.question
        assert answer_of(pair.corrupt.scene, ex.question.family, corrupt.slots) == corrupt
    assert n_pairs > 150
