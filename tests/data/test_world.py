"""Ground truth of the shapes world: masks, patch ownership, answers, determinism."""


import numpy as np
import pytest

from vlmscope.data import (
    FAMILIES,
    Scene,
    answer_of,
    ask,
    caption,
    object_mask,
    patch_objects,
    render,
    render_with_mask,
    sample_scene,
    standard_examples,
)  # fmt: skip
from vlmscope.data.questions import holds
from vlmscope.data.render import RGB, stencil
from vlmscope.data.scene import RADIUS
from vlmscope.data.vocab import PLURALS, POSITIONS, words


def _scenes(n: int, seed: int = 0) -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [sample_scene(rng) for _ in range(n)]


def test_mask_matches_scene():
    for scene in _scenes(200):
        image, mask = render_with_mask(scene)
        assert image.shape == (72, 72, 3) and image.dtype == np.uint8
        assert np.array_equal(mask, object_mask(scene))
        assert set(np.unique(mask)) == set(range(-1, len(scene.objects)))
        for i, o in enumerate(scene.objects):
            r = RADIUS[o.size]
            expected = np.zeros_like(mask, dtype=bool)
            expected[o.y - r : o.y + r + 1, o.x - r : o.x + r + 1] = stencil(o.shape, r)
            assert np.array_equal(mask == i, expected)
            assert o.row * 24 <= o.y - r and o.y + r < (o.row + 1) * 24  # inside its own cell
            assert o.col * 24 <= o.x - r and o.x + r < (o.col + 1) * 24
            if scene.domain != "noisy":  # light noise only: the object's pixels carry its colour
                assert np.abs(image[mask == i].mean(0) - RGB[o.colour]).max() < 3


def _brute_patch_objects(mask: np.ndarray, rows: int, cols: int, min_fraction: float) -> np.ndarray:
    h, w = mask.shape
    ys = [round(k * h / rows) for k in range(rows + 1)]
    xs = [round(k * w / cols) for k in range(cols + 1)]
    out = np.full((rows, cols), -1)
    for r in range(rows):
        for c in range(cols):
            patch = mask[ys[r] : ys[r + 1], xs[c] : xs[c + 1]]
            counts = [(patch == i).sum() for i in range(int(mask.max()) + 1)]
            if counts and max(counts) > 0 and max(counts) >= min_fraction * patch.size:
                out[r, c] = int(np.argmax(counts))
    return out


@pytest.mark.parametrize("grid", [1, 2, 3, 4, 5, 6, 7, 9, 12, (3, 6), (8, 5), 24, 72])
def test_patch_objects_matches_mask(grid):
    rows, cols = (grid, grid) if isinstance(grid, int) else grid
    for scene in _scenes(30, seed=1):
        mask = object_mask(scene)
        got = patch_objects(scene, grid)
        assert got.shape == (rows, cols)
        assert np.array_equal(got, _brute_patch_objects(mask, rows, cols, 0.1))
    if grid == 72:  # one pixel per patch: the map is the mask itself
        assert np.array_equal(patch_objects(mask, 72), mask)


def test_each_object_owns_its_cell_patch_on_the_3x3_grid():
    for scene in _scenes(300, seed=2):
        expected = np.full(9, -1)
        for i, o in enumerate(scene.objects):
            expected[o.cell] = i
        assert np.array_equal(patch_objects(scene, 3).ravel(), expected)


def _expected_answer(scene: Scene, family: str, slots: tuple[str, ...]) -> str:
    """An independent reading of the scene (no code shared with questions.answer_of)."""
    objs = scene.objects
    if family == "colour":
        return next(o.colour for o in objs if o.shape == slots[0])
    if family == "shape":
        return next(o.shape for o in objs if o.colour == slots[0])
    if family == "count":
        return ["zero", "one", "two", "three", "four"][sum(o.shape == slots[0] for o in objs)]
    if family == "where":
        return next(POSITIONS[o.row * 3 + o.col] for o in objs if (o.colour, o.shape) == slots)
    if family == "exists":
        return "yes" if any((o.colour, o.shape) == slots for o in objs) else "no"
    a = next(o for o in objs if (o.colour, o.shape) == slots[:2])
    b = next(o for o in objs if (o.colour, o.shape) == slots[3:])
    ok = {"left": a.col < b.col, "right": a.col > b.col, "above": a.row < b.row, "below": a.row > b.row}
    return "yes" if ok[slots[2]] else "no"


@pytest.mark.parametrize("hard", [False, True])
def test_answers_follow_from_scenes(hard):
    rng = np.random.default_rng(3)
    for family in FAMILIES:
        answers = []
        for _ in range(150):
            ex = ask(rng, family, hard=hard)
            q = ex.question
            assert q.family == family and q.answer == _expected_answer(ex.scene, family, q.slots)
            assert answer_of(ex.scene, family, q.slots) == q
            if family in ("colour", "where", "relation"):  # the target's shape is named
                assert ex.scene.objects[q.target_object].shape in q.text.split()
            if family == "count":
                assert PLURALS[q.slots[0]] in q.text.split()
            if hard and family in ("colour", "shape"):  # curriculum: no distractor shares the answer
                assert sum(getattr(o, family) == q.answer for o in ex.scene.objects) == 1
            if hard and family == "exists" and q.answer == "no":  # colour and shape both present
                assert any(o.colour == q.slots[0] for o in ex.scene.objects)
                assert any(o.shape == q.slots[1] for o in ex.scene.objects)
            cells = [o.cell for o in ex.scene.objects]
            assert 1 <= len(cells) <= 4 and len(set(cells)) == len(cells)
            assert all(w in words() for w in q.text.split()) and q.answer in words()
            answers.append(q.answer)
        if family in ("exists", "relation"):  # balanced yes/no
            assert 0.35 < answers.count("yes") / len(answers) < 0.65


def test_relation_semantics():
    assert holds("left", 0, 1) and not holds("left", 1, 0) and not holds("left", 0, 3)
    assert holds("above", 0, 3) and holds("below", 8, 2) and holds("right", 5, 3)
    with pytest.raises(ValueError, match="unknown relation"):
        holds("near", 0, 1)


def test_ill_posed_questions_have_no_answer():
    scene = _scenes(1)[0]
    twin = scene.with_object(0, shape="circle", colour="red")
    if len(twin.objects) > 1:
        twin = twin.with_object(1, shape="circle", colour="red")
        assert answer_of(twin, "colour", ("circle",)) is None
        assert answer_of(twin, "exists", ("red", "circle")).answer == "yes"


def test_deterministic_for_a_seed():
    a, b, c = standard_examples(11, 60), standard_examples(11, 60), standard_examples(12, 60)
    assert a == b and a != c
    assert all(np.array_equal(render(x.scene), render(y.scene)) for x, y in zip(a, b, strict=True))
    assert [e.question.family for e in a[:6]] == list(FAMILIES)


def test_caption_lists_every_object_in_reading_order():
    scene = _scenes(5, seed=4)[4]
    text = caption(scene)
    parts = text.split(" and ")
    assert len(parts) == len(scene.objects) and text.endswith(f"on a {scene.domain} background .")
    cells = sorted(o.cell for o in scene.objects)
    assert [p.split(" at ")[1].split()[0] for p in parts] == [POSITIONS[c] for c in cells]
