"""What earlier patches show (concepts.SEEN): masks in closed form, the reading order, the two-object
controls, and planted features that a causal reader's states would carry, dissected and verified."""

import numpy as np
import pytest
import torch

from vlmscope.data import COLOURS, SHAPES, SIZES
from vlmscope.data.render import RGB
from vlmscope.data.scene import CELL, Obj, Scene, sample_scene
from vlmscope.errors import InputError
from vlmscope.methods.explain.compose import beam_search, evaluate
from vlmscope.methods.explain.concepts import SEEN, all_concepts, concept_masks
from vlmscope.methods.explain.verify import base_scenes, formula_scenes, verify


def _obj(shape, colour, cell):
    return Obj(shape, colour, "large", cell, (cell % 3) * CELL + CELL // 2, (cell // 3) * CELL + CELL // 2)


SCENE = Scene((_obj("circle", "red", 1), _obj("square", "blue", 5)))


def _patches(mask) -> list[int]:
    return torch.nonzero(mask.flatten()).flatten().tolist()


def test_seen_masks_in_closed_form_and_in_another_reading_order():
    names = ["seen_colour=red", "seen_colour=blue", "seen_shape=square", "seen=none", "seen=object", "seen_size=large"]
    m = concept_masks([SCENE], 3, names)
    assert _patches(m["seen_colour=red"][0]) == [2, 3, 4, 5, 6, 7, 8]  # read after the red circle at patch 1
    assert _patches(m["seen_colour=blue"][0]) == [6, 7, 8]
    assert torch.equal(m["seen_shape=square"], m["seen_colour=blue"])
    assert _patches(m["seen=none"][0]) == [0, 1] and torch.equal(m["seen=object"], ~m["seen=none"])
    assert torch.equal(m["seen_size=large"], m["seen=object"])
    backwards = concept_masks([SCENE], 3, names, order=list(range(8, -1, -1)))  # patch 8 read first
    assert _patches(backwards["seen_colour=blue"][0]) == [0, 1, 2, 3, 4]
    assert _patches(backwards["seen_colour=red"][0]) == [0]
    with pytest.raises(InputError, match="each of the 9 patches once"):
        concept_masks([SCENE], 3, names, order=[0, 1, 2])
    # the default vocabulary leaves them out (a vision tower's patches all see each other); asked, they come
    assert not any(c.startswith("seen") for c in all_concepts())
    assert len(all_concepts(SEEN)) == 2 + len(COLOURS) + len(SHAPES) + len(SIZES)


def test_seen_formulas_get_scenes_with_an_object_read_after_the_varied_one():
    bases = base_scenes(10, seed=0)
    scenes = formula_scenes("seen_colour=red AND object", bases)
    single = [s for s in scenes if len(s.objects) == 1]
    assert len(single) == 10 * len(COLOURS) * 9  # every colour in every cell, per base
    pairs = [s for s in scenes if len(s.objects) == 2]
    assert len(pairs) == 10 * len(COLOURS) * 8  # those not in the last cell, with the base's object there
    assert all(s.objects[1].cell == 8 and s.objects[0].cell != 8 for s in pairs)
    assert {(s.objects[1].shape, s.objects[1].colour) for s in pairs[:len(COLOURS) * 8]} == {(bases[0].objects[0].shape,
                                                                              bases[0].objects[0].colour)}
    m = concept_masks(pairs, 3, ["seen_colour=red", "object"])
    reds = [i for i, s in enumerate(pairs) if s.objects[0].colour == "red"]
    assert bool((m["seen_colour=red"][reds, 2, 2] & m["object"][reds, 2, 2]).all())  # a red object, then one


def _per_patch(images, hit, share: float = 0.02) -> torch.Tensor:
    x = torch.from_numpy(np.stack(images)).int()
    return (hit(x).view(len(images), 3, 24, 3, 24).float().mean((2, 4)) > share).flatten(1)  # (n, 9) bool


def _red(images):  # a small red object on a noisy background keeps few exact pixels: a wider match
    return _per_patch(images, lambda x: (x - torch.tensor(RGB["red"])).abs().amax(-1) < 30, 0.01)


def _objects(images):
    return _per_patch(images, lambda x: x.max(-1).values - x.min(-1).values > 100)


def _after(shown: torch.Tensor) -> torch.Tensor:
    """(n, 9) patches read (row by row) after one where `shown` holds."""
    return (shown.long().cumsum(1) - shown.long()) > 0


def _background_after_red(images):
    return (_after(_red(images)) & ~_objects(images)).float().view(-1, 3, 3)


def _object_after_object(images):
    obj = _objects(images)
    return (_after(obj) & obj).float().view(-1, 3, 3)


def test_planted_features_of_what_was_read_before_are_named_and_verified():
    """A feature firing on background read after a red object, and one firing on an object read after
    another: dissection names them with SEEN concepts (IoU 1), the verification loop says they hold,
    and says a broader explanation does not hold and a narrower one is too broad; the refinement loop
    turns the broader one into the planted rule."""
    from vlmscope.data import render

    rng = np.random.default_rng(7)
    scenes = [sample_scene(rng) for _ in range(150)]
    masks = concept_masks(scenes, 3, all_concepts(("colour", "shape", "patch", "object", "background", *SEEN)))
    flat = {c: v.flatten() for c, v in masks.items()}
    images = [render(s) for s in scenes]
    for feature, want in ((_background_after_red, "seen_colour=red AND background"),
                          (_object_after_object, "seen=object AND object")):
        fired = feature(images).flatten() > 0
        assert torch.equal(fired, evaluate(want, flat))  # the planted feature is the concept, on real renders
        text, iou = beam_search(fired, flat, length=3)
        assert iou == pytest.approx(1.0) and torch.equal(evaluate(text, flat), fired)
        assert verify(feature, want, n_bases=8).verdict == "holds"
    # after any object: it fires on the sixth of those patches that follow a red one
    assert verify(_background_after_red, "seen=object AND background", n_bases=8).verdict == "does not hold"
    # the loop closed: read on new scenes, the colour of what was seen joins, and the proposal holds
    from vlmscope.methods.explain.refine import refine

    r = refine(_background_after_red, "seen=object AND background", rounds=2, n_bases=12)
    assert r.verdicts == ("does not hold", "holds") and r.final == "background AND seen_colour=red"
    assert verify(_background_after_red, "seen_colour=red AND background AND seen_shape=circle",
                  n_bases=8).verdict == "too broad"


def test_formulas_with_the_same_axes_keep_their_own_scenes():
    """"object AND column=2" and "seen=object AND object" vary the same attribute (the cell), but only the
    second needs an object read after the varied one: verified together, each gets its own scenes."""
    from vlmscope.methods.explain.verify import formula_key, verify_many

    assert formula_key("object AND column=2") == (("cell",), False)
    assert formula_key("seen=object AND object") == (("cell",), True)
    both = verify_many(lambda images: torch.stack([_objects(images).float().view(-1, 3, 3),
                                                   _object_after_object(images)], -1),
                       ["object AND column=2", "seen=object AND object"], n_bases=8)
    assert [v.verdict for v in both] == ["too broad", "holds"]
    # a formula no controlled patch satisfies is untested, and the others in its batch are still judged
    three = verify_many(lambda images: torch.stack([_object_after_object(images)] * 2, -1),
                        ["seen=object AND object", "colour=red AND colour=green"], n_bases=8)
    assert [v.verdict for v in three] == ["holds", "untested"] and "no controlled patch" in three[1].detail
