"""Domain-specific neuron selection on a planted neuron, its deactivation, and modality importance."""

import pytest
import torch

import vlmscope as vs
from vlmscope import testing as T
from vlmscope.errors import InputError
from vlmscope.methods.explain.neurons import (
    Deactivation,
    DomainNeurons,
    ModalityNeurons,
    deactivate,
    domain_neurons,
    entropy_selection,
    hidden_change,
    mmneuron_selection,
    modality_deactivation,
    modality_neurons,
)
from vlmscope.results import Result

NEURON = 7


@pytest.fixture(scope="module")
def planted():
    """A tiny LLaVA whose lm.blocks.0 MLP neuron 7 fires only on the token "w2": its embedding is a
    large, fresh direction that the neuron's gate and up rows read."""
    words = [f"w{i}" for i in range(123)]
    model = T.tiny_llava(image_token=4)
    m = vs.load(model, T.word_processor(words))
    w2 = m.tokenizer.convert_tokens_to_ids("w2")
    g = torch.Generator().manual_seed(3)
    e = torch.nn.functional.normalize(torch.randn(64, generator=g), dim=0)
    mlp = model.model.language_model.layers[0].mlp
    with torch.no_grad():
        model.get_input_embeddings().weight[w2] = 8 * e
        mlp.gate_proj.weight[NEURON] = 3 * e
        mlp.up_proj.weight[NEURON] = 3 * e
    fillers = [[f"w{10 + 4 * r + j}" for j in range(4)] for r in range(6)]  # shared by the domains

    def texts(word):  # the domain's word among fillers
        return dict(m.tokenizer([f"{a} {word} {b} {c} {word} {d}" for a, b, c, d in fillers], return_tensors="pt"))
    return m, {"plain": texts("w1"), "noisy": texts("w2"), "textured": texts("w3")}


def test_entropy_selection_closed_form():
    prob = torch.tensor([[[0.5, 0.0, 0.0], [0.2, 0.2, 0.2], [0.0, 0.1, 0.3], [0.0, 0.0, 0.0]]])
    ent, flat, dom = entropy_selection(prob, top_fraction=0.25)  # one neuron per domain
    assert float(ent[0, 0]) == pytest.approx(0.0, abs=1e-6)
    assert float(ent[0, 1]) == pytest.approx(torch.log(torch.tensor(3.0)).item(), abs=1e-6)
    assert ent[0, 3].isinf()  # never fires: never selected
    assert dict(zip(dom.tolist(), flat.tolist())) == {0: 0, 2: 2}  # no neuron fires most in domain 1 (ties go to 0)


def test_mmneuron_selection_closed_form():
    """MMNeuron's rule: lowest entropy over all neurons, among those above the bar somewhere; each
    kept neuron belongs to every domain where it tops the bar (two here), and a domain no neuron
    singles out gets none."""
    prob = torch.tensor([[[0.9, 0.0, 0.0], [0.0, 0.8, 0.8], [0.3, 0.3, 0.3], [0.0, 0.05, 0.05],
                          [0.0, 0.0, 0.0], [0.1, 0.1, 0.1]]])  # (site, neuron, domain)
    # 18 probabilities; the 0.75 quantile (14th smallest) is 0.3: only 0.8, 0.8 and 0.9 are above it
    ent, flat, mine = mmneuron_selection(prob, top_fraction=0.5, bar=0.75)
    ln2 = torch.log(torch.tensor(2.0)).item()
    assert float(ent[0, 0]) == pytest.approx(0.0, abs=1e-6) and float(ent[0, 1]) == pytest.approx(ln2, abs=1e-6)
    # k = 3, but neuron 3 (entropy ln 2, like neuron 1) never tops the bar and neuron 4 never fires
    assert flat.tolist() == [0, 1]
    assert mine.tolist() == [[True, False, False], [False, True, True]]
    with pytest.raises(InputError, match="bar"):
        mmneuron_selection(prob, 0.5, bar=1.0)


def test_groups_and_selectivity_of_a_neuron_shared_by_two_domains():
    """A group named "b+c" is judged on b and c against a; a target naming every group has no other."""
    dn = DomainNeurons(("s",), ("a", "b", "c"), torch.zeros(1, 3, 3), torch.zeros(1, 3), torch.tensor([0, 0, 0]),
                       torch.tensor([0, 1, 2]), torch.tensor([0, 1, 1]), "quantile", torch.zeros(1, 3),
                       torch.zeros(1, 3), torch.tensor([[True, False, False], [False, True, True],
                                                        [False, True, True]]), "mmneuron")
    assert dn.groups() == {"b+c": {"s": [1, 2]}, "a": {"s": [0]}}
    assert dn.neurons_for("c") == {"s": [1, 2]} and dn.neurons_for("a") == {"s": [0]}
    with pytest.raises(InputError, match="valid: a, b, c"):
        dn.neurons_for("d")
    eff = Deactivation(("b+c", "a", "a+b+c"), ("a", "b", "c"), torch.tensor([[1.0, 4.0, 6.0], [3.0, 1.0, 2.0],
                                                                            [1.0, 1.0, 1.0]]), (2, 1, 3), "x")
    assert eff.selectivity == {"b+c": pytest.approx(5.0), "a": pytest.approx(2.0)}


def test_planted_domain_neuron_is_selected_and_its_deactivation_hits_its_domain(planted, tmp_path):
    m, inputs = planted
    res = domain_neurons(m, inputs, "lm.blocks.0.mlp.post", positions="text", top_fraction=0.01)
    # 1 % of 128 neurons keeps one: of the neurons that fire on one domain's word only (entropy 0),
    # the planted one, whose firing gap is the largest
    assert res.groups() == {"noisy": {"lm.blocks.0.mlp.post": [NEURON]}}
    assert res.neurons_for("noisy") == {"lm.blocks.0.mlp.post": [NEURON]} and res.neurons_for("plain") == {}
    assert float(res.entropy[0, NEURON]) == pytest.approx(0.0, abs=1e-6)
    per = domain_neurons(m, inputs, "lm.blocks.0.mlp.post", positions="text", top_fraction=0.01, select="per-domain")
    assert per.neurons_for("noisy") == {"lm.blocks.0.mlp.post": [NEURON]} and len(per.groups()) == 3  # one each
    with pytest.raises(InputError, match="per-domain"):
        domain_neurons(m, inputs, "lm.blocks.0.mlp.post", positions="text", select="lowest")
    text_change = hidden_change()
    effect = deactivate(m, {"noisy": inputs["noisy"], "plain": inputs["plain"]},
                        {"noisy": res.neurons_for("noisy")}, lambda vlm, g, x, ivs: text_change(vlm, "text", x, ivs))
    assert effect.selectivity["noisy"] >= 2.0
    # clamping at the firing threshold switches off the firing only: as selective as zeroing here
    clamped = deactivate(m, {"noisy": inputs["noisy"], "plain": inputs["plain"]}, {"noisy": res.neurons_for("noisy")},
                         lambda vlm, g, x, ivs: text_change(vlm, "text", x, ivs), how="clamp",
                         reference=res.reference("clamp"))
    assert clamped.selectivity["noisy"] >= 2.0
    # mean-ablation writes the (large) mean where the sparse neuron was silent: the other domain is hit harder
    ref = torch.cat([m.run_with_cache(x, "lm.blocks.0.mlp.post")[1]["lm.blocks.0.mlp.post"][m.select(x, "text")]
                     for x in inputs.values()]).mean(0)
    assert torch.allclose(res.reference("mean")["lm.blocks.0.mlp.post"], ref, atol=1e-5)
    by_mean = deactivate(m, {"noisy": inputs["noisy"], "plain": inputs["plain"]}, {"noisy": res.neurons_for("noisy")},
                         lambda vlm, g, x, ivs: text_change(vlm, "text", x, ivs), how="mean",
                         reference=res.reference("mean"))
    assert by_mean.selectivity["noisy"] < 1.0
    with pytest.raises(InputError, match="reference"):
        deactivate(m, inputs, {"noisy": res.neurons_for("noisy")}, lambda *a: 0.0, how="clamp")
    back = Result.load(res.save(tmp_path / "dn"))
    assert isinstance(back, DomainNeurons) and back.neurons_for("noisy") == res.neurons_for("noisy")
    back = Result.load(effect.save(tmp_path / "de"))
    assert isinstance(back, Deactivation) and torch.equal(back.hit, effect.hit)


def test_modality_importance_and_deactivation(tmp_path):
    model = T.tiny_llava()
    m = vs.load(model)
    x = T.llava_inputs(model, batch=3, text_len=5)
    res = modality_neurons(m, x, "lm.blocks.*.mlp.post", top_fraction=0.02)
    _, cache = m.run_with_cache(x, "lm.blocks.1.mlp.post")
    img = cache["lm.blocks.1.mlp.post"][m.select(x, "image")].abs().mean(0)
    txt = cache["lm.blocks.1.mlp.post"][m.select(x, "text")].abs().mean(0)
    expected = (img / img.mean()).log() - (txt / txt.mean()).log()
    assert torch.allclose(res.specificity[1], expected, atol=1e-4)
    s, n = res.image_neurons[0].tolist()
    assert float(res.specificity[s, n]) == float(res.specificity.max())
    eff = modality_deactivation(m, x, res)
    assert eff.targets == ("image", "text") and (eff.hit > 0).all()
    back = Result.load(res.save(tmp_path / "mn"))
    assert isinstance(back, ModalityNeurons) and back.neurons_for("text") == res.neurons_for("text")


def test_explain_results_plot(planted, tmp_path):
    """Every explain result kind has a plot (drawn from a saved-and-loaded result)."""
    import matplotlib.pyplot as plt

    from vlmscope.methods.explain.describe import dissect
    from vlmscope.methods.explain.verify import verify
    from vlmscope.methods.explain.word_match import word_match

    m, inputs = planted
    dn = domain_neurons(m, inputs, "lm.blocks.0.mlp.post", positions="text")
    eff = deactivate(m, inputs, {d: dn.neurons_for(d) for d in inputs}, lambda *a: 1.0)
    results = [eff, dissect(torch.rand(2, 3, 3, 3), {"a": torch.rand(3, 3, 3) > 0.5}),
               verify(lambda ims: torch.ones(len(ims), 3, 3), "size=large", n_bases=2),
               word_match(torch.randn(4), torch.randn(6, 4), [f"w{i}" for i in range(6)], k=3)]
    for i, r in enumerate(results):
        fig = Result.load(r.save(tmp_path / str(i))).plot()
        assert fig.axes
        plt.close(fig)
