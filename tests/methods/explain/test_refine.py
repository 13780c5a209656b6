"""The refinement loop: formulas read off a feature's firing (`cover_text`) and the verify → read →
propose → verify loop on planted features whose true rule is known."""

import itertools

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from test_describe_score_verify import _fixed_patch, _round_red, object_feature, red_feature

from vlmscope.data import COLOURS, SHAPES, SIZES
from vlmscope.errors import InputError
from vlmscope.methods.explain.compose import atoms, evaluate, parse_formula
from vlmscope.methods.explain.concepts import VALUES, concept_masks, parse
from vlmscope.methods.explain.controls import base_scenes, controlled_scenes
from vlmscope.methods.explain.cover import cover, cover_text
from vlmscope.methods.explain.refine import Refinement, decisive_table, read_attributes, refine
from vlmscope.results import Result


def _truth(formula: str, attrs, keys) -> torch.Tensor:
    """The formula on each group key (value index per attribute, -1: no object at the patch)."""
    keys = torch.tensor(keys)
    masks = {}
    for a in atoms(parse_formula(formula)):
        kind, value = parse(a)
        if kind in ("object", "background"):
            has = (keys[:, attrs.index("object")] == 1 if "object" in attrs
                   else (keys[:, [i for i, x in enumerate(attrs) if x in ("colour", "shape", "size")]] >= 0).all(1))
            masks[a] = has if kind == "object" else ~has
        elif kind in ("row", "column"):
            p = keys[:, attrs.index("patch")]
            masks[a] = (p // 3 if kind == "row" else p % 3) == int(value)
        else:
            masks[a] = keys[:, attrs.index(kind)] == VALUES[kind].index(value)
    return evaluate(formula, masks)


def _table(attrs):
    """Every combination of the attributes' values, plus the no-object key (-1 everywhere)."""
    keys = list(itertools.product(*(range(len(VALUES[a])) for a in attrs)))
    return [*keys, tuple(-1 for _ in attrs)]


def test_cover_text_is_exact_on_every_group_and_short():
    attrs = ["colour", "size"]
    keys = _table(attrs)
    red = [k[0] == COLOURS.index("red") for k in keys]
    assert cover_text(attrs, keys, red) == "colour=red"
    objects = [k[0] >= 0 for k in keys]
    assert cover_text(attrs, keys, objects) == "object"
    assert cover_text(attrs, keys, [not o for o in objects]) == "background"
    assert cover_text(attrs, keys, [False] * len(keys)) is None
    assert cover_text(attrs, keys, [True] * len(keys)) == ""
    # every colour but blue, large only: the NOT form, with no "object" (size=large already says it)
    rule = [k[0] not in (-1, COLOURS.index("blue")) and k[1] == SIZES.index("large") for k in keys]
    text = cover_text(attrs, keys, rule)
    assert sorted(atoms(parse_formula(text))) == ["colour=blue", "size=large"]
    assert _truth(text, attrs, keys).tolist() == rule
    # random rules over three attributes: the formula is exactly true on the on groups
    attrs3 = ["colour", "shape", "size"]
    keys3 = _table(attrs3)
    rng = np.random.default_rng(0)
    for _ in range(20):
        c = set(rng.choice(len(COLOURS), 2, replace=False).tolist())
        s = set(rng.choice(len(SHAPES), 3, replace=False).tolist())
        rule = [(k[0] in c and k[2] == 0) or (k[1] in s and k[0] >= 0 and rng.random() < 0.2) for k in keys3]
        text = cover_text(attrs3, keys3, rule)
        assert _truth(text, attrs3, keys3).tolist() == rule, text


def test_cover_uses_unobserved_groups_either_way_and_names_rows():
    keys = [(0,), (1,), (2,)]  # patches 0-2 only: on everywhere observed
    assert cover(keys, [True, True, True]) == [[frozenset({0, 1, 2})]]
    patches = [(p,) for p in range(9)]
    assert cover_text(["patch"], patches, [p // 3 == 2 for p in range(9)]) == "row=2"
    assert cover_text(["patch"], patches, [p % 3 == 0 for p in range(9)]) == "column=0"
    assert cover_text(["patch"], patches, [p in (0, 4) for p in range(9)]) == "patch=0 OR patch=4"
    assert read_attributes("(row=1 OR patch=0) AND background AND tone=dark") == ["patch", "object", "tone"]


def test_refine_recovers_planted_rules(tmp_path):
    narrow = refine(_round_red, "colour=red", n_bases=16)  # large red objects of the fuller shapes
    assert narrow.verdicts == ("too narrow", "holds") and narrow.holds
    assert narrow.final == "colour=red AND size=large AND NOT shape=triangle"
    assert narrow.read[0] == "colour, size, shape" and narrow.ratios == (0.25, 0.25)
    broad = refine(object_feature, "colour=red", n_bases=16)
    assert broad.explanations == ("colour=red", "object") and broad.verdicts == ("too broad", "holds")
    place = refine(_fixed_patch, "cell=4", n_bases=8)  # fires at patch 4 whatever it shows
    assert place.final == "patch=4" and place.holds
    assert refine(red_feature, "object", n_bases=16).final == "colour=red"
    same = refine(red_feature, "colour=red", n_bases=16)
    assert same.explanations == ("colour=red",) and same.stopped == "holds"
    capped = refine(_round_red, "colour=red", n_bases=16, max_concepts=2)
    assert not capped.holds and "more than 2 concepts" in capped.stopped and len(capped.explanations) == 1
    off = refine(_round_red, "colour=red", n_bases=16, rounds=0)
    assert off.verdicts == ("too narrow",) and off.stopped == "0 rounds done"
    back = Result.load(narrow.save(tmp_path / "r"))
    assert isinstance(back, Refinement) and back.explanations == narrow.explanations and back.holds
    assert len(back.to_dataframe()) == 2 and "->" in repr(back)
    fig = back.plot()
    assert len(fig.axes) == 1 and "holds" in fig.axes[0].get_title()
    plt.close(fig)
    with pytest.raises(InputError, match="rounds"):
        refine(_round_red, "colour=red", rounds=-1)
    with pytest.raises(InputError, match="ratios"):
        refine(_round_red, "colour=red", ratios=(0.25, 1.5))
    with pytest.raises(InputError, match="colour=red"):
        refine(_round_red, "colour=pink")


def test_decisive_table_picks_the_ratio_that_decides_every_group():
    """A graded feature: 1 on red patches, uniform in [0, 0.5) on orange ones. Above 0.25 of its peak
    orange fires about half the time (no verdict can call it); above 0.55 never."""
    scenes = controlled_scenes("colour", base_scenes(40, seed=3))
    masks = concept_masks(scenes, 3, ["colour=red", "colour=orange"])
    g = torch.Generator().manual_seed(0)
    maps = masks["colour=red"].float() + masks["colour=orange"].float() * torch.rand(len(scenes), 3, 3, generator=g) / 2
    table, ratio = decisive_table(maps, scenes, ["colour"], (0.25, 0.55))
    assert ratio == 0.55
    orange = (table.keys[:, 0] == COLOURS.index("orange")).nonzero().item()
    assert float(table.rate[orange]) == 0.0
    low, first = decisive_table(maps, scenes, ["colour"], (0.25,))
    assert first == 0.25 and 0.3 < float(low.rate[orange]) < 0.7
    assert cover_text(["colour"], [tuple(k) for k in table.keys.tolist()], (table.rate >= 0.5).tolist()) == "colour=red"
    tie, r = decisive_table(masks["colour=red"].float(), scenes, ["colour"], (0.4, 0.25))  # binary: every ratio decides
    assert r == 0.4


def test_epsilon_squared_matches_the_textbook_formula():
    """(SS_between − (k − 1) MS_within) / SS_total, computed by hand; rows of 2-d labels are one group."""
    from vlmscope.methods.explain.verdicts import epsilon_squared

    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, 200)
    fired = rng.random(200) < np.array([0.1, 0.5, 0.6, 0.9])[labels]
    x = fired.astype(float)
    groups = [x[labels == g] for g in range(4)]
    ss_t = ((x - x.mean()) ** 2).sum()
    ss_b = sum(len(g) * (g.mean() - x.mean()) ** 2 for g in groups)
    ms_w = (ss_t - ss_b) / (200 - 4)
    ref = (ss_b - 3 * ms_w) / ss_t
    assert epsilon_squared(torch.from_numpy(fired), torch.from_numpy(labels)) == pytest.approx(ref, rel=1e-9)
    pairs = torch.from_numpy(np.stack([labels // 2, labels % 2], 1))  # the same 4 groups as (a, b) rows
    assert epsilon_squared(torch.from_numpy(fired), pairs) == pytest.approx(ref, rel=1e-9)
    assert epsilon_squared(torch.ones(10, dtype=torch.bool), torch.arange(10) % 2) == float("-inf")  # no variance
