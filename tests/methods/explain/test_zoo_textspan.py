"""TEXTSPAN on shapes-clip, checked by ablation (skipped when no shapes-clip is shipped).

What holds on the shipped model (v3, train_clip.DEEP_RECIPE: 4 vision blocks with MLPs of 128;
seeds 0 and 1, 300 scenes): every attribute gets heads that ablation confirms, shape included
(three heads; ablated in total they take 0.39 of shape's evidence against 0.09 of the others'),
and the heads write half of shape's direct evidence. On v2 (3 blocks with MLPs of 256) the MLPs
wrote 71 % of it and no head was named for shape (docs/explain.md)."""

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


def test_every_attribute_has_heads_that_ablation_confirms(heads):
    res, ts, scores = heads
    assert res.named == ("colour", "shape", "size", "position", "background")  # every attribute's texts differ
    assert res.learned() == res.attributes and res.confirmed() == res.attributes
    assert res.heads_for("shape") == ["L0.H0", "L1.H1", "L1.H2"] and res.heads_for("size") == ["L0.H2"]
    assert res.heads_for("colour") == ["L0.H1", "L2.H1", "L3.H1", "L3.H3"]
    assert res.heads_for("background") == ["L0.H3", "L1.H3", "L2.H3"]
    own, other = res.own_other("total")["shape"]
    assert own > 0.3 and own > 3 * other  # shape's heads: 0.39 of its evidence, 0.09 of the others'
    own, other = res.own_other("direct")["shape"]
    assert own > 0.15 and own > 1.5 * other
    for a in ("colour", "position", "background"):
        own, other = res.own_other("direct")[a]
        assert own > 0.45 and own > 5 * other, a
    assert scores["TEXTSPAN: attributes with heads"] == 5
    assert scores["TEXTSPAN: colour, shape, position with confirmed heads"] == 3  # the check
    assert len(ts.heads) == 16 and set(res.assigned) <= set(res.named)
    assert float(res.spread.min()) > 0.05  # the text tower tells every attribute's prompts apart
    assert float(res.accuracy[0, 0].min()) > 0.95  # zero-shot, before any ablation


def test_the_same_heads_on_other_scenes():
    res, _, _ = zoo_textspan(vlmscope.zoo.load("shapes-clip"), n=300, seed=1)
    assert res.confirmed() == res.attributes and res.heads_for("shape") == ["L0.H0", "L1.H1", "L1.H2"]


def test_heads_write_half_of_shape_and_nearly_all_of_the_rest(heads):
    """The direct evidence each component writes (it sums to 1 over components): shape is split
    between heads and MLPs (v2: 71 % MLPs, no shape head), every other attribute is written by heads."""
    scores = heads[2]
    assert 0.4 < scores["TEXTSPAN: shape evidence written directly by heads"] < 0.6
    for a in ("colour", "size", "position", "background"):
        assert scores[f"TEXTSPAN: {a} evidence written directly by heads"] > 0.8
        assert scores[f"TEXTSPAN: {a} evidence written directly by MLPs"] < 0.2


def test_single_head_ablation_and_the_names(heads):
    """Each head mean-ablated alone, in total: the head shape depends on most is L1.H2 (0.17 of its
    evidence, 0.04 of colour's), one of the heads TEXTSPAN names shape; colour's, position's and
    background's strongest heads are named for them too (size's, L0.H1, is named colour), and the
    report says so."""
    res, _, scores = heads
    causal = res.causal_heads()
    for a in ("shape", "colour", "position", "background"):
        assert causal[a][2] == a and causal[a][1] > 0.1, (a, causal[a])
    assert causal["shape"][0] == "L1.H2" and causal["size"][2] == "colour"
    assert scores["TEXTSPAN: attributes whose most causal head is named for them"] >= 4
    from vlmscope.report.html import _explain_reading

    reading = _explain_reading(scores)
    assert "shape L0.H0 L1.H1 L1.H2" in reading and "no single head is named for it" not in reading


def test_shape_heads_from_the_time_shape_is_learned():
    """Across shapes-clip's checkpoints: at initialisation nothing is learned and nothing is confirmed
    (shape's ablation shares there are noise); from step 3,500 (zero-shot shape 0.66) to the end
    TEXTSPAN names shape heads that ablation confirms; background gets confirmed heads once it is
    learned (step 15,000)."""
    first, _, _ = zoo_textspan(vlmscope.zoo.load("shapes-clip", step=0), n=300, seed=0)
    assert first.confirmed() == () and "shape" not in first.learned()
    mid, _, _ = zoo_textspan(vlmscope.zoo.load("shapes-clip", step=3500), n=300, seed=0)
    assert {"colour", "shape", "size", "position"} <= set(mid.confirmed()) and "background" not in mid.learned()


def test_evidence_shares_sum_to_one_over_components():
    from types import SimpleNamespace

    from vlmscope.methods.explain.zoo_textspan import evidence_by_component

    g = torch.Generator().manual_seed(0)
    labels = {"a": torch.randint(0, 3, (40,), generator=g)}
    texts = {"a": torch.nn.functional.normalize(torch.randn(3, 6, generator=g), dim=-1)}
    values = 0.1 * torch.randn(40, 4, 6, generator=g)
    values[:, 2] += 2 * texts["a"][labels["a"]]  # component 2 writes the class direction
    share = evidence_by_component(SimpleNamespace(values=values), texts, labels)  # (component, attribute)
    assert share.shape == (4, 1) and float(share.sum()) == pytest.approx(1.0)
    assert float(share[2, 0]) > 0.9


def test_attribute_heads_round_trip(heads, tmp_path):
    res = heads[0]
    back = Result.load(res.save(tmp_path / "ah"))
    assert isinstance(back, AttributeHeads) and back.assigned == res.assigned
    assert torch.equal(back.evidence, res.evidence) and back.own_other("total") == res.own_other("total")
    assert torch.equal(back.head_drop, res.head_drop) and back.causal_heads() == res.causal_heads()
    df = res.to_dataframe()
    assert len(df) == len(res.modes) * len(res.groups) * len(res.attributes)
    fig = back.plot()
    assert len(fig.axes) == 3  # direct, total, colour bar
    plt.close(fig)


def test_textspan_over_training_finds_background_heads_when_background_is_learned():
    """TEXTSPAN as an experiment method (kind "textspan") traced over shapes-clip's checkpoints: shape
    heads are confirmed at 12,000 and 15,000 alike; background's appear between them, with the
    background itself (0.57 -> 0.98 zero-shot), a phase change the curves report; on a model without
    a dual encoder the method kind is refused."""
    from vlmscope.errors import InputError
    from vlmscope.experiments.across import over_training
    from vlmscope.experiments.run import run_method
    from vlmscope.experiments.spec import Experiment, method

    exp = Experiment(model="shapes-clip", methods=(method("textspan"),))
    curves = over_training("shapes-clip", exp, steps=[12000, 15000], n_eval=60)
    row = curves.metrics.index("textspan: TEXTSPAN shape heads confirmed by ablation")
    assert curves.values[row].tolist() == [1.0, 1.0]
    row = curves.metrics.index("textspan: TEXTSPAN background heads confirmed by ablation")
    assert curves.values[row].tolist() == [0.0, 1.0]
    assert {"metric": "textspan: TEXTSPAN background heads confirmed by ablation", "step": 15000, "before": 0.0,
            "after": 1.0} in curves.changes
    assert "accuracy shape" in curves.metrics  # zero-shot accuracy per attribute beside the heads
    with pytest.raises(InputError, match="dual encoder"):
        run_method(vlmscope.zoo.load("shapes-llava"), method("textspan"), seed=0)
