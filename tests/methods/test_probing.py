import pytest
import torch
from sklearn.linear_model import LogisticRegression

from vlmscope.methods.probing import ProbeConfig, ProbeResult, _split, fit_probes
from vlmscope.results import Result


def _planted(p=3, n=600, d=16, c=4, noise=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(p, d, c, generator=g)
    x = torch.randn(p, n, d, generator=g)
    y = (x @ w + noise * torch.randn(p, n, c, generator=g)).argmax(-1)
    return x, y, w


def test_ridge_recovers_a_planted_direction_exactly():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 300, 8, generator=g)
    w = torch.randn(2, 8, generator=g)
    y = torch.einsum("pnd,pd->pn", x, w) + 0.5
    r = fit_probes(x, y, ProbeConfig(kind="ridge", l2=0.0, control=False))
    torch.testing.assert_close(r.score, torch.ones(2))
    # weights act on standardised features: undo the scaling to compare with the planted ones
    torch.testing.assert_close(r.weight[..., 0] / r.std, w, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(r.predict(x), y, atol=1e-4, rtol=1e-4)


def test_separable_planted_classes_are_decoded_and_selective():
    x, y, _ = _planted()
    r = fit_probes(x, y)
    assert (r.score > 0.85).all()  # C=1 regularisation on 420 rows: sklearn scores .90-.93 here
    assert (r.control_score < 0.45).all()  # 4 classes: a shuffled control sits near chance
    assert (r.selectivity > 0.5).all()


def test_batched_training_equals_training_each_probe_alone():
    x, y, _ = _planted(noise=1.0)
    together = fit_probes(x, y, ProbeConfig(control=False))
    for i in range(3):
        alone = fit_probes(x[i:i + 1], y[i:i + 1], ProbeConfig(control=False))
        torch.testing.assert_close(alone.score[0], together.score[i], atol=0.02, rtol=0)


def test_accuracy_within_two_points_of_sklearn_on_the_same_split():
    x, y, _ = _planted(p=4, n=1500, d=32, c=5, noise=1.5)
    cfg = ProbeConfig(control=False)
    r = fit_probes(x, y, cfg)
    tr, _, te = _split(x.shape[1], cfg)
    ref = torch.tensor([LogisticRegression(max_iter=2000).fit(x[i, tr], y[i, tr]).score(x[i, te], y[i, te])
                        for i in range(4)])
    assert (r.score - ref).mean().abs() < 0.02
    assert (r.score - ref).min() > -0.03


def test_ignored_rows_and_per_probe_labels():
    x, y, _ = _planted()
    y = y.clone()
    y[1, :300] = -1  # probe 1 only learns from the second half
    r = fit_probes(x, y)
    assert (r.score > 0.85).all()


def test_hewitt_liang_control_task_with_types():
    x, y, _ = _planted(p=1, n=800)
    types = torch.arange(800) % 40
    r = fit_probes(x, y, types=types)
    assert r.control_score[0] < r.score[0]


def test_probe_save_load_round_trip(tmp_path):
    x, y, _ = _planted()
    r = fit_probes(x, y, names=["a", "b", "c"], target="colour", classes=["r", "g", "b", "y"])
    r.save(tmp_path / "p")
    back = Result.load(tmp_path / "p")
    assert isinstance(back, ProbeResult) and back.names == ("a", "b", "c") and back.classes == ("r", "g", "b", "y")
    assert torch.equal(back.weight, r.weight) and torch.equal(back.predict(x), r.predict(x))
    df = back.to_dataframe()
    assert list(df.probe) == ["a", "b", "c"] and df.score.tolist() == pytest.approx(r.score.tolist())


def test_probe_sites_on_pooled_positions_of_the_zoo_model():
    from vlmscope import zoo
    from vlmscope.methods.probing import probe_sites
    from vlmscope.zoo import truth

    if "shapes-llava" not in zoo.names():
        pytest.skip("shapes-llava not exported")
    m = zoo.load("shapes-llava")
    exs = truth.examples(seed=21, n=300, family="colour")
    x = truth.inputs_for(m, exs)
    answers = truth.answer_ids(m, exs)
    r = probe_sites(m, x, answers, m.sites("lm.blocks.*.resid_post"), select="last", target="answer")
    assert r.score[-1] >= 0.95  # the answer is decodable at the last token of the last layer
    pooled = probe_sites(m, x, answers, ["connector.out"], select="mean:image", target="answer")
    assert pooled.score.shape == (1,)


def test_probes_read_from_the_activation_store(tmp_path):
    import vlmscope as vs
    from vlmscope import testing as T
    from vlmscope.methods.probing import store_features

    model = T.tiny_llava()
    m = vs.load(model)
    x = T.llava_inputs(model, batch=40, seed=3)
    store = m.cache_dataset(list(range(40)), ["lm.blocks.0.resid_post", "lm.blocks.1.resid_post"], tmp_path,
                            batch_size=8, collate=lambda i: {k: v[i] for k, v in x.items()}, progress=False)
    feats, index = store_features(store, ["lm.blocks.0.resid_post", "lm.blocks.1.resid_post"])
    labels = m.positions(x)["lm"].role[index[:, 0], index[:, 1]]  # image / text / special, per stored row
    r = fit_probes(feats, labels)
    assert r.names == ("lm.blocks.0.resid_post", "lm.blocks.1.resid_post")
    _, cache = m.run_with_cache(x, "lm.blocks.*.resid_post")  # the same rows, straight from a run
    direct = fit_probes({s: cache[s][index[:, 0], index[:, 1]] for s in r.names}, labels)
    assert torch.equal(direct.score, r.score) and torch.equal(direct.weight, r.weight)
