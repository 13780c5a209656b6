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


def test_row_column_and_tone_concepts():
    rng = np.random.default_rng(5)
    scenes = [sample_scene(rng) for _ in range(40)]
    masks = concept_masks(scenes, 3, ["row=1", "column=2", "tone=dark", "tone=light", "patch=5"])
    assert masks["row=1"][:, 1].all() and not masks["row=1"][:, [0, 2]].any()
    assert masks["column=2"][:, :, 2].all() and not masks["column=2"][:, :, :2].any()
    assert torch.equal(mask_of("row=1 AND column=2", masks), masks["patch=5"])
    dark = torch.tensor([s.grey < 128 for s in scenes])
    assert 0 < int(dark.sum()) < len(scenes) and torch.equal(masks["tone=dark"].all((1, 2)), dark)
    assert torch.equal(masks["tone=light"], ~masks["tone=dark"])
    with pytest.raises(InputError, match="outside a 3x2"):
        concept_masks(scenes, (3, 2), ["column=2"])
    from vlmscope.methods.explain.verify import vary

    s = scenes[0]
    flipped = vary(s, "tone", "light" if s.grey < 128 else "dark")
    assert flipped.grey == 255 - s.grey and flipped.objects == s.objects
    assert vary(s, "tone", "dark" if s.grey < 128 else "light") == s  # already that tone: unchanged


def _dark(images) -> torch.Tensor:
    """(n,) whether each image's background (its median grey) is dark."""
    x = torch.from_numpy(np.stack(images)).float().mean(-1)
    return x.flatten(1).median(1).values < 128


def test_verification_names_what_a_narrower_feature_depends_on():
    """A red detector that fires only on dark backgrounds: "colour=red" is too narrow and the loop says
    it depends on tone; "colour=red AND tone=dark" holds; in a formula the missed group gets the same note."""
    def dark_red(images):
        return _colour(images, ["red"]) * _dark(images)[:, None, None].float()

    single = verify(dark_red, "colour=red", n_bases=24)
    assert single.verdict == "too narrow" and single.detail == "depends on tone: fires for dark"
    assert verify(dark_red, "colour=red AND tone=dark", n_bases=12).verdict == "holds"

    def red_dark_green(images):
        return torch.maximum(_colour(images, ["red"]), _colour(images, ["green"]) * _dark(images)[:, None, None])

    either = verify(red_dark_green, "colour=red OR colour=green", n_bases=24)
    assert either.verdict == "too narrow"
    assert "misses colour=green" in either.detail and "depends on tone: fires for dark" in either.detail


def test_dissect_at_a_share_of_the_peak_and_verify_at_a_given_threshold(world):
    from vlmscope.methods.explain.describe import dissect

    _, masks = world
    red, obj = masks["colour=red"].float(), masks["object"].float()
    maps = (4 * red + obj)[None]  # 5 on red objects, 1 on the others, 0 on background
    assert dissect(maps, masks, quantile=0.5, ratio=0.1).labels == ("object",)  # above 0.5: every object
    assert dissect(maps, masks, quantile=0.5, ratio=0.25).labels == ("colour=red",)  # above 1.25: red only
    with pytest.raises(InputError, match="ratio"):
        dissect(maps, masks, ratio=1.5)
    two = lambda im: _colour(im, ["red"]) + _colour(im, ["red", "green"])  # noqa: E731  2 on red, 1 on green
    assert verify(two, "colour=red", n_bases=12).verdict == "too broad"  # a quarter of the peak: 0.5 < 1
    at = verify_many(two, ["colour=red"], n_bases=12, thresholds=[1.5])[0]
    assert at.verdict == "holds" and at.threshold == 1.5
    with pytest.raises(InputError, match="thresholds"):
        verify_many(two, ["colour=red"], n_bases=4, thresholds=[1.0, 2.0])


def test_dissection_picks_each_features_share_of_the_peak_and_verification_judges_at_it(world, tmp_path):
    """A graded feature, 4 on red objects, 1 on green ones and 0.6 on the background of patch 0: above
    0.1 of its peak it fires on all three (no short formula fits exactly), above 0.25 on red alone (IoU
    1). Given several shares, dissection labels it at 0.25, precision is scored at that threshold, and
    verification at the same share says it holds, where a tenth of the peak would call it too broad."""
    scenes, masks = world
    red, green, bg0 = (masks[c].float() for c in ("colour=red", "colour=green", "background"))
    bg0 = bg0 * masks["patch=0"].float()
    graded = 4 * red + green + 0.6 * bg0
    both = torch.stack([graded, 4 * red + green])  # the second: red or green at 0.1 and red at 0.25, equally
    dis = dissect_formulas(both, masks, ratio=(0.25, 0.1), features=["graded", "tied"])
    assert dis.labels == ("colour=red", "colour=red OR colour=green") and dis.ratio.tolist() == [0.25, 0.1]
    assert float(dis.iou[0]) == 1.0 and torch.allclose(dis.threshold, torch.tensor([1.0, 0.4]))
    assert float(dissect_formulas(graded[None], masks, ratio=0.1).iou[0]) < 1.0
    back = Result.load(dis.save(tmp_path / "fd"))
    assert back.labels == dis.labels and torch.equal(back.ratio, dis.ratio)
    assert dissect_formulas(both, masks).ratio.isnan().all()  # a quantile: no share of the peak
    with pytest.raises(InputError, match="ratio"):
        dissect_formulas(both, masks, ratio=())
    sim = score_explanations(both[:1], ["colour=red"], masks, thresholds=dis.threshold[:1])
    assert float(sim.precision[0]) == 1.0 and float(sim.recall[0]) == 1.0
    assert float(score_explanations(both[:1], ["colour=red"], masks, quantile=0.5).precision[0]) < 1.0
    feature = lambda im: 4 * _colour(im, ["red"]) + _colour(im, ["green"])  # noqa: E731
    at = verify_many(feature, ["colour=red", "colour=red"], n_bases=12, ratios=[0.25, 0.1])
    assert [v.verdict for v in at] == ["holds", "too broad"]
    with pytest.raises(InputError, match="ratios"):
        verify_many(feature, ["colour=red"], n_bases=4, ratios=[0.25, 0.1])
