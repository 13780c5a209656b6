"""TEXTSPAN on tiny CLIP: the decomposition is exact, the greedy basis is checked on planted data,
and mean-ablating heads moves zero-shot accuracy."""

import pytest
import torch

import vlmscope as vs
from vlmscope import testing as T
from vlmscope.errors import InputError
from vlmscope.methods.explain.textspan import (
    HeadAblation,
    HeadContributions,
    TextSpanResult,
    head_ablation,
    head_contributions,
    textspan,
)
from vlmscope.results import Result


@pytest.fixture(scope="module")
def clip():
    model = T.tiny_clip()
    return vs.load(model), T.clip_inputs(model, n_images=6, n_texts=3, seed=1)


def test_head_contributions_sum_to_the_image_embedding(clip):
    m, x = clip
    hc = head_contributions(m, x)
    ref = m.model.get_image_features(pixel_values=x["pixel_values"])
    ref = getattr(ref, "pooler_output", ref)
    assert torch.allclose(hc.embedding, ref, atol=1e-5)
    assert torch.allclose(hc.values.sum(1), hc.embedding, atol=1e-5)
    assert len(hc.heads()) == 2 * 4 and len(hc.heads([1])) == 4
    # each head's part is what remains when only that head's output is zeroed at CLS (frozen norm: linear)
    contrib = hc.values[:, hc.components.index("L1.H2")]
    assert contrib.norm() > 0


def test_head_contributions_refuse_siglip():
    model = T.tiny_siglip()
    with pytest.raises(InputError, match="TEXTSPAN"):
        head_contributions(vs.load(model), T.siglip_inputs(model))


def test_textspan_finds_the_planted_text_direction(tmp_path):
    g = torch.Generator().manual_seed(0)
    d, n = 12, 40
    texts = torch.randn(8, d, generator=g)
    names = [f"text{i}" for i in range(8)]
    # head 0 varies along text 5 only, head 1 along text 2 (plus small noise)
    h0 = torch.randn(n, 1, generator=g) * texts[5] + 0.01 * torch.randn(n, d, generator=g)
    h1 = torch.randn(n, 1, generator=g) * texts[2] + 0.01 * torch.randn(n, d, generator=g)
    values = torch.stack([h0, h1, torch.zeros(n, d)], 1)
    hc = HeadContributions(("L0.H0", "L0.H1", "bias"), values, values.sum(1))
    ts = textspan(hc, texts, names, n_texts=2)
    assert ts.texts[0][0] == "text5" and ts.texts[1][0] == "text2"
    assert float(ts.explained[0, 0]) > 0.99
    assert (ts.explained[:, 1] >= ts.explained[:, 0] - 1e-9).all()
    assert ts.attributes({"text5": "colour", "text2": "shape"}, k=1) == {"L0.H0": "colour", "L0.H1": "shape"}
    back = Result.load(ts.save(tmp_path / "ts"))
    assert isinstance(back, TextSpanResult) and back.texts == ts.texts
    assert torch.equal(back.explained, ts.explained)


def test_head_ablation_matches_a_hand_written_mean_ablation(clip, tmp_path):
    m, x = clip
    text = {k: x[k] for k in ("input_ids", "attention_mask")}
    _, ref = m.run_with_cache(x, "vision.blocks.*.attn.z")

    def to_mean(t, *, site):  # heads 0 and 1 of block 1 at their mean over these images
        t = t.clone()
        t[:, :, :2] = ref[site].mean(0)[:, :2]
        return t

    manual = m.run(x, [vs.hook("vision.blocks.1.attn.z", to_mean)]).logits_per_image.argmax(-1)
    clean = m.run(x).logits_per_image.argmax(-1)
    res = head_ablation(m, x["pixel_values"], {"a": text}, {"a": manual}, {"two": ["L1.H0", "L1.H1"]})
    assert float(res.accuracy[1, 0]) == 1.0
    assert float(res.accuracy[0, 0]) == pytest.approx(float((clean == manual).float().mean()))
    assert res.groups == ("none", "two") and res.heads == ((), ("L1.H0", "L1.H1"))
    back = Result.load(res.save(tmp_path / "ha"))
    assert isinstance(back, HeadAblation) and back.heads == res.heads and torch.equal(back.accuracy, res.accuracy)


def test_direct_ablation_replaces_a_component_by_its_mean(clip):
    m, x = clip
    hc = head_contributions(m, x)
    i = hc.components.index("L1.H2")
    out = hc.ablated(["L1.H2"])
    by_hand = hc.values.sum(1) - hc.values[:, i] + hc.values[:, i].mean(0)
    assert torch.allclose(out, by_hand, atol=1e-5)
    assert torch.allclose(hc.ablated([]), hc.embedding)
    with pytest.raises(InputError, match="unknown components"):
        hc.ablated(["L9.H0"])


def test_attribute_shares_sum_the_explained_variance_gains():
    explained = torch.tensor([[0.5, 0.7, 0.9], [0.1, 0.6, 0.6]])
    ts = TextSpanResult(("L0.H0", "L0.H1"), (("red", "circle", "blue"), ("circle", "red", "noise")),
                        torch.tensor([[0, 1, 2], [1, 0, 3]]), explained, torch.ones(2))
    attrs, share = ts.attribute_shares({"red": "colour", "blue": "colour", "circle": "shape"})
    assert attrs == ("colour", "shape")
    assert torch.allclose(share, torch.tensor([[0.7, 0.2], [0.5, 0.1]]))  # "noise" names no attribute


def test_textspan_does_not_renormalise_a_text_already_explained():
    """A near-copy of the first pick keeps only a sliver of its own (unit) length after removal: the
    paper scores that sliver as it is, so the near-copy is not picked for the variance it points at."""
    g = torch.Generator().manual_seed(1)
    e = torch.eye(6)
    texts = torch.stack([e[0], e[0] + 1e-3 * e[1], e[2]])
    c = torch.randn(200, 3, generator=g) * torch.tensor([3.0, 2.0, 1.0])
    values = (c @ e[:3])[:, None]  # one head varying along e0 (std 3), e1 (2), e2 (1)
    hc = HeadContributions(("L0.H0",), values, values[:, 0])
    ts = textspan(hc, texts, ["first", "near-copy", "third"], n_texts=2)
    assert ts.texts[0][0] in ("first", "near-copy") and ts.texts[0][1] == "third"
