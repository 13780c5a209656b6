"""Tuning curves (explain/tuning.py): the variance share in closed form, and planted graded features
computed from the rendered pixels, whose curves are known exactly."""

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from vlmscope.data.render import RGB
from vlmscope.errors import InputError
from vlmscope.methods.explain.concepts import VALUES
from vlmscope.methods.explain.tuning import (
    TuningCurves,
    TuningVerification,
    explain_tuning,
    parse_tuning,
    score_tuning,
    tuning_curves,
    variance_share,
    verify_tuning,
)
from vlmscope.results import Result

OPPONENT = {c: (r - g + 255) / 510 for c, (r, g, _) in RGB.items()}  # the planted feature's level per colour
COLUMN = torch.tensor([1.0, 0.6, 0.3])


def _opponent(images) -> torch.Tensor:
    """(n, 3, 3) per patch, the mean red-minus-green of its object's pixels, scaled to 0..1: an
    opponent colour channel, graded along red > orange > purple > yellow > blue > green."""
    x = torch.from_numpy(np.stack(images)).float()
    obj = (x.amax(-1) - x.amin(-1)) > 100  # saturated pixels: the object's, not the grey background's
    rg = (x[..., 0] - x[..., 1] + 255) / 510
    total = (rg * obj).view(len(images), 3, 24, 3, 24).sum((2, 4))
    count = obj.view(len(images), 3, 24, 3, 24).sum((2, 4))
    return torch.where(count > 5, total / count.clamp_min(1), torch.zeros_like(total))


def _placed(images) -> torch.Tensor:
    """The opponent channel, weaker column by column (1, 0.6, 0.3): graded on colour and on place."""
    return _opponent(images) * COLUMN


def _grain(images) -> torch.Tensor:
    """(n, 3, 3) per patch, the mean step between neighbouring pixels' grey, scaled down: high on noisy
    and striped (textured) backgrounds, low on plain ones."""
    x = torch.from_numpy(np.stack(images)).float().mean(-1)
    step = (x[:, :, 1:] - x[:, :, :-1]).abs()
    step = torch.cat([step, step[:, :, -1:]], 2)
    return step.view(len(images), 3, 24, 3, 24).mean((2, 4)) / 200


def _object_then_grain(images) -> torch.Tensor:
    """The opponent channel on the object's patch, the background's grain (at most ~0.1) elsewhere."""
    obj = _opponent(images)
    return torch.where(obj > 0, obj, _grain(images))


def _both(images) -> torch.Tensor:
    return torch.stack([_opponent(images), _placed(images)], -1)


def test_variance_share_in_closed_form():
    # 2 bases x 2 values: grand mean 2, total SS 8, between 4, so 1 - (4 / 2) / (8 / 3) = 0.25
    assert variance_share(torch.tensor([[0.0, 2.0], [2.0, 4.0]])) == pytest.approx(0.25)
    assert variance_share(torch.arange(6.0).repeat(5, 1)) == pytest.approx(1.0)  # the value is everything
    assert variance_share(torch.arange(5.0)[:, None].repeat(1, 6)) == 0.0  # only the bases differ
    assert variance_share(torch.ones(4, 3)) == 0.0


@pytest.fixture(scope="module")
def tuned():
    return explain_tuning(_both, n_bases=10, names=["opponent", "placed"])


def test_planted_graded_features_are_described_by_their_curves(tuned):
    curves, checks, sim = tuned
    colour = curves.attributes.index("colour")
    # the opponent channel: colour explains all of it, in the palette's red-minus-green order
    assert curves.named(0) == ["colour"] and float(curves.share[0, colour]) > 0.99
    want = torch.tensor([OPPONENT[c] for c in VALUES["colour"]])
    assert float(np.corrcoef(curves.curve(0, "colour"), want)[0, 1]) > 0.99
    order = [part.split()[0] for part in curves.explanation(0).split(": ", 1)[1].split(" > ")]
    assert order == sorted(OPPONENT, key=OPPONENT.get, reverse=True)
    assert parse_tuning(curves.explanation(0))["colour"]["red"] == 1.0
    # the placed one: the cell first, its levels the column weights, then colour
    assert set(curves.named(1)) == {"cell", "colour"}
    cells = curves.curve(1, "cell").view(3, 3).mean(0)
    torch.testing.assert_close(cells / cells[0], COLUMN, atol=0.02, rtol=0)
    assert curves.matters(0) == ["colour"] and set(curves.matters(1)) == {"cell", "colour"}
    assert all(curves.span(i, a) < 0.05 for i in (0, 1) for a in ("shape", "size", "domain", "tone"))
    # both replicate on fresh bases, and the curves predict fresh scenes (additively: the placed one
    # is a product, so less than exactly)
    assert checks.verdicts == ("holds", "holds")
    assert float(sim[0]) > 0.99 and float(sim[1]) > 0.99


def test_wrong_or_partial_curves_do_not_hold(tuned):
    curves = tuned[0]
    colour_only = next(p for p in curves.explanation(1).split("; ") if p.startswith("colour"))
    reversed_colour = "colour 90%: " + " > ".join(f"{c} {1 - OPPONENT[c]:.2f}" for c in VALUES["colour"])
    size_only = "size 50%: small 1.00 > large 0.50"
    checks = verify_tuning(_placed, [colour_only], n_bases=8)
    assert checks.verdicts == ("incomplete",) and "cell" in checks.details[0]
    for text in (reversed_colour, size_only):
        v = verify_tuning(_opponent, [text], n_bases=8)
        assert v.verdicts == ("does not hold",), text
    # the simulation score says the same: the reversed curve predicts the opposite of the feature
    s = score_tuning(_opponent, [reversed_colour, size_only, ""], n=120)
    assert float(s[0]) < -0.9 and abs(float(s[1])) < 0.2 and s[2].isnan()


def test_where_the_response_is_read_and_features_that_go_negative():
    """Read anywhere, a feature strongest on objects is tuned to their colour; read on the background,
    to its style (plain lowest). Shifted below zero, a feature keeps its explanation: levels run from
    its lowest mean response to its peak."""
    anywhere = tuning_curves(_object_then_grain, n_bases=8)
    background = tuning_curves(_object_then_grain, n_bases=8, where="background")
    assert anywhere.named(0)[0] == "colour" and "domain" not in anywhere.named(0)
    assert background.named(0)[0] == "domain" and background.where == "background"
    told = parse_tuning(background.explanation(0))["domain"]
    assert min(told, key=told.get) == "plain" and "colour" not in background.named(0)
    obj = tuning_curves(_object_then_grain, n_bases=8, where="object")
    assert obj.named(0) == ["colour"]
    shifted = tuning_curves(lambda images: _opponent(images) - 0.5, n_bases=8)
    assert shifted.floor(0) < 0 and shifted.named(0) == ["colour"]
    levels = shifted.levels(0, "colour")
    assert float(levels.min()) == pytest.approx(0.0, abs=0.01) and float(levels.max()) == pytest.approx(1.0, abs=0.01)
    want = torch.tensor([OPPONENT[c] for c in VALUES["colour"]])
    assert float(np.corrcoef(levels, want)[0, 1]) > 0.99
    assert verify_tuning(lambda images: _opponent(images) - 0.5, [shifted.explanation(0)],
                         n_bases=8).verdicts == ("holds",)
    with pytest.raises(InputError, match="read at one of"):
        tuning_curves(_opponent, n_bases=2, where="edges")


def test_tuning_results_save_load_and_tabulate(tuned, tmp_path):
    curves, checks, _ = tuned
    back = Result.load(curves.save(tmp_path / "curves"))
    assert isinstance(back, TuningCurves) and back.explanations() == curves.explanations()
    again = Result.load(checks.save(tmp_path / "checks"))
    assert isinstance(again, TuningVerification) and again.verdicts == checks.verdicts
    torch.testing.assert_close(again.fresh.share, checks.fresh.share)
    df = curves.to_dataframe()
    assert len(df) == 2 * sum(len(VALUES[a]) for a in curves.attributes)
    top = df[(df.feature == "opponent") & (df.attribute == "colour")].sort_values("level").iloc[-1]
    assert top.value == "red" and top.level == pytest.approx(1.0, abs=0.01)
    fig, text = curves.plot(), checks.plot()
    assert len(fig.axes) == 2 * len(curves.attributes) and text.axes[0].get_title().startswith("tuning curves: 2 of 2")
    plt.close(fig)
    plt.close(text)


def test_tuning_views_show_the_preferred_scene_varied(tuned):
    """The image view of the curves: the opponent feature's preferred scene (a red object: the top of
    its curve) with its colour changed, the map peaking on the object's patch, strongest for red."""
    from vlmscope.methods.explain.tuning import preferred_scene, tuning_views
    from vlmscope.report.plots_features import tuning_grid

    curves = tuned[0]
    base = preferred_scene(curves, 0)
    assert base.objects[0].colour in ("red", "orange")  # the two highest levels, jitter decides
    views = tuning_views(_both, curves, 0)
    assert list(views) == ["colour"]
    scenes, maps = views["colour"]
    assert [s.objects[0].colour for s in scenes] == list(VALUES["colour"]) and maps.shape == (6, 3, 3)
    cell = base.objects[0].cell
    assert all(int(m.flatten().argmax()) == cell for m in maps)
    peaks = maps.flatten(1).amax(1)
    assert VALUES["colour"][int(peaks.argmax())] == "red"
    fig = tuning_grid(tuning_views(_both, curves, 1), "placed")
    assert len([ax for ax in fig.axes if ax.get_images()]) == 6 + 9  # colour's and cell's values
    plt.close(fig)


def test_bad_tuning_input_is_refused():
    with pytest.raises(InputError, match="tuning curves vary"):
        tuning_curves(_opponent, n_bases=2, attributes=("colour", "row"))
    with pytest.raises(InputError, match="unknown attribute 'hue'"):
        parse_tuning("hue 50%: red 1 > blue 0")
    with pytest.raises(InputError, match="value of colour"):
        parse_tuning("colour 50%: red 1 > teal 0")
    with pytest.raises(InputError, match="every value"):
        parse_tuning("size 50%: small 1.00")
    with pytest.raises(InputError, match="reads 'attribute NN%"):
        parse_tuning("colour: red 1 > blue 0")
