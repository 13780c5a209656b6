"""TEXTSPAN on shapes-clip, checked by ablation (skipped when no shapes-clip is shipped).

What holds on the shipped model (seeds 0 and 1, 300 scenes): colour heads (mostly layer 0) write
colour directly into the embedding (direct ablation takes ~0.6 of colour's evidence, ~2x the other
attributes'); shape heads act through later layers (total ablation ~2.5x own/other, direct < 1).
Position and background are not represented: the text tower maps their prompts to one point."""

import matplotlib.pyplot as plt
import pytest
import torch

import vlmscope.zoo
from vlmscope.methods.explain.zoo_textspan import AttributeHeads, attribute_texts, zoo_textspan
from vlmscope.results import Result

pytestmark = pytest.mark.skipif("shapes-clip" not in vlmscope.zoo.names(), reason="no shapes-clip in the zoo")


@pytest.fixture(scope="module")
def heads():
    torch.set_num_threads(1)
    return zoo_textspan(vlmscope.zoo.load("shapes-clip"), n=300, seed=0)


def test_prompts_have_the_training_form():
    texts = attribute_texts()
    assert texts["colour"][0] == "a red object" and texts["shape"][0] == "a circle"
    assert texts["position"][0] == "a object at top-left"  # shapes_clip.describe({"position": ...})


def test_colour_and_shape_heads_are_found_and_confirmed(heads):
    res, ts, scores = heads
    assert res.heads_for("colour") and res.heads_for("shape")
    assert float(res.accuracy[0, 0, res.attributes.index("colour")]) == 1.0
    own, other = res.own_other("direct")["colour"]
    assert own > 0.4 and own > 1.5 * other  # colour is written directly
    own, other = res.own_other("total")["shape"]
    assert own > 0.3 and own > 2 * other  # shape heads act through later layers ...
    own, other = res.own_other("direct")["shape"]
    assert own < other  # ... not directly
    assert scores["TEXTSPAN: attributes with heads"] == 2 and res.confirmed() == ("colour", "shape")
    assert scores["TEXTSPAN: colour, shape, position with confirmed heads"] == 2  # the issue asks for 3
    assert len(ts.heads) == 12 and set(res.assigned) <= set(res.named)


def test_position_and_background_cannot_be_named(heads):
    res, _, scores = heads
    assert res.named == ("colour", "shape", "size")
    for a in ("position", "background"):
        i = res.attributes.index(a)
        assert float(res.spread[i]) < 1e-4  # the text tower maps every position (background) prompt to one point
        assert float(res.accuracy[0, 0, i]) < 0.4  # chance: 1/9 (1/3)
        assert scores[f"TEXTSPAN: {a} heads"] == "none"


def test_attribute_heads_round_trip(heads, tmp_path):
    res = heads[0]
    back = Result.load(res.save(tmp_path / "ah"))
    assert isinstance(back, AttributeHeads) and back.assigned == res.assigned
    assert torch.equal(back.evidence, res.evidence) and back.own_other("total") == res.own_other("total")
    df = res.to_dataframe()
    assert len(df) == len(res.modes) * len(res.groups) * len(res.attributes)
    fig = back.plot()
    assert len(fig.axes) == 3  # direct, total, colour bar
    plt.close(fig)
