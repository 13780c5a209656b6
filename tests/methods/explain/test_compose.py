"""Compositional explanations: the formula grammar, beam-search dissection and formula verification."""

from itertools import product

import numpy as np
import pytest
import torch

from vlmscope.data import COLOURS, SHAPES
from vlmscope.data.render import RGB
from vlmscope.data.scene import sample_scene
from vlmscope.errors import InputError
from vlmscope.methods.explain.compose import (
    FormulaDissection,
    atoms,
    beam_search,
    dissect_formulas,
    evaluate,
    mask_of,
    parse_formula,
    to_text,
)
from vlmscope.methods.explain.concepts import all_concepts, concept_masks
from vlmscope.methods.explain.score import score_explanations
from vlmscope.methods.explain.verify import formula_scenes, verify, verify_many
from vlmscope.results import Result


def test_grammar_precedence_and_round_trip():
    assert parse_formula("colour=red OR shape=circle AND NOT size=small") == (
        "or", "colour=red", ("and", "shape=circle", ("not", "size=small")))
    assert parse_formula("(patch=4 OR patch=5) AND background") == ("and", ("or", "patch=4", "patch=5"), "background")
    for text in ("colour=red", "(patch=4 OR patch=5) AND background", "object AND NOT size=small",
                 "colour=red OR colour=orange OR colour=yellow", "NOT (colour=red OR object)",
                 "colour=red AND shape=circle OR size=large"):
        assert parse_formula(to_text(parse_formula(text))) == parse_formula(text)
    assert to_text(parse_formula("((colour=red))")) == "colour=red"
    assert atoms(parse_formula("(patch=4 OR patch=5) AND patch=4")) == ["patch=4", "patch=5"]
    with pytest.raises(InputError, match="colour=red"):  # an unknown value lists the valid ones
        parse_formula("colour=pink OR object")
    with pytest.raises(InputError, match="not closed"):
        parse_formula("(colour=red OR object")
    with pytest.raises(InputError, match="ends early"):
        parse_formula("colour=red AND")
    with pytest.raises(InputError, match="unexpected"):
        parse_formula("colour=red shape=circle")


def test_evaluate_matches_numpy_logic():
    g = torch.Generator().manual_seed(0)
    masks = {c: torch.rand(50, generator=g) > 0.5 for c in ("colour=red", "shape=circle", "size=small", "object")}
    a, b, c, o = (masks[k].numpy() for k in ("colour=red", "shape=circle", "size=small", "object"))
    cases = {"colour=red OR shape=circle AND NOT size=small": a | (b & ~c),
             "(colour=red OR shape=circle) AND NOT size=small": (a | b) & ~c,
             "NOT (colour=red OR object) OR size=small": ~(a | o) | c}
    for text, ref in cases.items():
        assert np.array_equal(evaluate(text, masks).numpy(), ref)
        assert np.array_equal(mask_of(text, masks).numpy(), ref)
    with pytest.raises(InputError, match="no mask for concepts"):
        mask_of("colour=blue OR object", masks)


@pytest.fixture(scope="module")
def world():
    rng = np.random.default_rng(3)
    scenes = [sample_scene(rng) for _ in range(120)]
    concepts = all_concepts(["colour", "shape", "size", "patch", "object", "background"])
    return scenes, concept_masks(scenes, 3, concepts)


def test_beam_search_recovers_a_planted_formula(world):
    _, masks = world
    flat = {c: m.flatten() for c, m in masks.items()}
    for planted in ("(patch=4 OR patch=5) AND background", "colour=purple OR colour=blue",
                    "size=large AND NOT shape=triangle"):
        text, iou = beam_search(evaluate(planted, flat), flat, length=3)
        assert iou == pytest.approx(1.0)
        assert torch.equal(evaluate(text, flat), evaluate(planted, flat))  # the same patches, maybe other words
    # a single concept stays single: no longer formula gains min_gain on a perfect fit
    text, iou = beam_search(flat["colour=red"], flat, length=3)
    assert (text, iou) == ("colour=red", 1.0)
    # a feature that is red plus a few stray patches: a third concept would gain < min_gain, so none is added
    stray = flat["colour=red"].clone()
    stray[torch.nonzero(flat["background"])[:3, 0]] = True
    assert beam_search(stray, flat, length=3, min_gain=0.05)[0] == "colour=red"


def test_dissect_formulas_labels_and_round_trip(world, tmp_path):
    _, masks = world
    planted = ["(patch=0 OR patch=1) AND background", "colour=green", "shape=circle AND size=small"]
    maps = torch.stack([mask_of(p, masks).float() * (1 + i) for i, p in enumerate(planted)])  # (feature, scene, 3, 3)
    maps[2] += 0.1 * masks["object"].float()  # weakly on every object: the quantile threshold cuts it off
    res = dissect_formulas(maps, masks, quantile=0.8, features=["a", "b", "c"], length=3)
    for lab, p in zip(res.labels, planted):
        assert torch.equal(mask_of(lab, masks), mask_of(p, masks))
    assert res.iou.tolist() == pytest.approx([1.0, 1.0, 1.0])
    assert bool((res.iou >= res.concept_iou).all()) and float(res.concept_iou[0]) < 0.6
    assert res.concepts[1] == "colour=green"
    sim = score_explanations(maps, res.labels, masks, quantile=0.8)  # formulas simulate exactly
    assert sim.correlation[:2].tolist() == pytest.approx([1.0, 1.0])
    back = Result.load(res.save(tmp_path / "f"))
    assert isinstance(back, FormulaDissection) and back.labels == res.labels and torch.equal(back.iou, res.iou)
    with pytest.raises(InputError, match="length"):
        dissect_formulas(maps, masks, length=0)


def _colour(images, colours):
    x = torch.from_numpy(np.stack(images)).int()
    hit = torch.zeros(x.shape[:3], dtype=torch.bool)
    for c in colours:
        hit |= (x - torch.tensor(RGB[c])).abs().amax(-1) < 12
    return (hit.view(len(images), 3, 24, 3, 24).float().mean((2, 4)) > 0.02).float()


def _background_at_4(images):
    """Fires at patch 4 only when it shows background."""
    x = torch.from_numpy(np.stack(images)).int()
    obj = (x.max(-1).values - x.min(-1).values > 100).view(len(images), 3, 24, 3, 24).float().mean((2, 4)) > 0.02
    out = torch.zeros(len(images), 3, 3)
    out[:, 1, 1] = (~obj[:, 1, 1]).float()
    return out


def test_verification_of_formulas():
    """A red-or-green detector holds as "colour=red OR colour=green"; a red detector is too narrow for
    it and an any-colour detector too broad; a feature of background at patch 4 holds as the
    conjunction and is too narrow for "patch=4" alone."""
    either = verify(lambda im: _colour(im, ["red", "green"]), "colour=red OR colour=green", n_bases=12)
    assert either.verdict == "holds", either.detail
    assert set(np.array(either.values)[either.explained.numpy()]) == {"colour=red", "colour=green"}
    red = verify(lambda im: _colour(im, ["red"]), "colour=red OR colour=green", n_bases=12)
    assert red.verdict == "too narrow" and "colour=green" in red.detail
    every = verify(lambda im: _colour(im, list(RGB)), "colour=red OR colour=green", n_bases=12)
    assert every.verdict == "too broad" and "also fires on" in every.detail
    assert verify(_background_at_4, "patch=4 AND background", n_bases=8).verdict == "holds"
    assert verify(_background_at_4, "patch=4", n_bases=8).verdict == "too narrow"
    # many features and explanations at once: each column judged against its own explanation
    both = lambda im: torch.stack([_colour(im, ["red", "green"]), _background_at_4(im)], -1)  # noqa: E731
    out = verify_many(both, ["colour=red OR colour=green", "patch=4 AND background"], n_bases=8)
    assert [v.verdict for v in out] == ["holds", "holds"]


def test_formula_scenes_vary_named_attributes_together():
    from vlmscope.methods.explain.verify import base_scenes

    bases = base_scenes(10, seed=0)
    scenes = formula_scenes("colour=red AND shape=circle", bases)
    assert len(scenes) == 10 * 6 * 5  # every colour x every shape per base
    assert {(s.objects[0].colour, s.objects[0].shape) for s in scenes[:30]} == set(product(COLOURS, SHAPES))
    assert {s.objects[0].size for s in scenes[:30]} == {bases[0].objects[0].size}  # the rest held fixed
    cells = formula_scenes("patch=4 AND background", bases)
    assert len(cells) == 10 * (9 + 1) and cells[9].objects == ()  # the object in each cell, then none
    capped = formula_scenes("colour=red AND shape=circle AND cell=4", bases, max_scenes=500)
    assert len(capped) == 8 * 6 * 5 * 9  # at least 8 bases even past the cap
