"""Feature views against direct computation on a tiny LLaVA, and concept F1 against scikit-learn."""

import pytest
import torch
from sklearn.metrics import f1_score

import vlmscope as vs
from vlmscope import testing as T
from vlmscope.methods import sae as S
from vlmscope.methods.sae.features import concept_f1, feature_views


@pytest.fixture(scope="module")
def tiny():
    model = T.tiny_llava()
    m = vs.load(model)
    x = T.llava_inputs(model, batch=6, seed=2)
    return m, x, [{k: v[i:i + 3] for k, v in x.items()} for i in (0, 3)]


def _sae(site, rows, d_sae=10):
    """A random ReLU SAE centred and scaled to these rows, active on about a third of them."""
    sae = S.build_sae(S.SAEConfig("relu", rows.shape[1], d_sae, site=site, positions="image"))
    sae.init_weights(torch.Generator().manual_seed(1))
    with torch.no_grad():
        sae.b_dec.copy_(rows.mean(0))
        sae.W_enc.mul_(rows.shape[1] ** 0.5 / (rows - rows.mean(0)).norm(dim=-1).mean())  # pre ~ N(0, 1)
        sae.b_enc.fill_(-0.5)
    return sae.eval()


@pytest.mark.parametrize("site", ["lm.blocks.1.resid_post", "connector.out"])
def test_feature_views_match_direct_computation(tiny, site):
    m, x, batches = tiny
    _, cache = m.run_with_cache(x, site)
    pos = m.positions(x)[m.site(site).stream]
    mask = pos.select("image")
    sae = _sae(site, cache[site][mask])
    fv = feature_views(sae, m, batches, features=[0, 3, 7], top=4, bins=8, logit_tokens=5)
    with torch.no_grad():
        h = sae.encode(cache[site])[..., [0, 3, 7]] * mask[..., None]  # (row, pos, feature)
    row_max = h.amax(1)  # (row, feature)
    for i in range(3):
        vals, rows = row_max[:, i].sort(descending=True)
        torch.testing.assert_close(fv.top_values[i], vals[:4])
        assert vals[0] > 0 and fv.top_rows[i].tolist() == fv.top_examples[i].tolist()  # one image per example
        for j in range(4):
            if vals[j] > 0:  # rows tied at zero may come in any order
                assert int(fv.top_rows[i, j]) == int(rows[j])
        for j, r in enumerate(fv.top_rows[i].tolist()):  # the patch map is the 2x2 grid of that row
            on = mask[r]
            grid = torch.zeros(2, 2)
            grid[pos.row[r, on], pos.col[r, on]] = h[r, on, i]
            torch.testing.assert_close(fv.patch_maps[i, j], grid)
    active = (h > 0) & mask[..., None]
    torch.testing.assert_close(fv.frequency, active.sum((0, 1)).float() / mask.sum())
    assert fv.hist_counts.sum(1).tolist() == active.sum((0, 1)).float().tolist()
    assert fv.n_positions == 6 * 4
    if site.startswith("lm."):
        d = sae.W_dec[[0, 3, 7]] / sae.W_dec[[0, 3, 7]].norm(dim=-1, keepdim=True)
        with torch.no_grad():
            logits = m.unembed(d)
        assert fv.has_logit_effect
        assert fv.logit_top_ids.tolist() == logits.topk(5).indices.tolist()
        assert fv.logit_bottom_ids.tolist() == logits.topk(5, largest=False).indices.tolist()
    else:
        assert not fv.has_logit_effect  # the connector output is not the LM's residual stream


def test_concept_f1_is_the_best_features_f1():
    g = torch.Generator().manual_seed(0)
    n = 2000
    labels = torch.randint(0, 4, (n,), generator=g)  # 0 = "no object": a negative for every concept
    labels[:50] = -1  # unknown rows are left out
    acts = torch.rand(n, 6, generator=g) * (torch.rand(n, 6, generator=g) < 0.2)
    acts[:, 2] = (labels == 1).float() * 3.0  # a perfect detector of concept "red"
    noisy = (labels == 2) ^ (torch.rand(n, generator=g) < 0.1)
    acts[:, 5] = noisy.float()  # a 90%-right detector of "green"
    r = concept_f1(labels, acts, {"red": 1, "green": 2, "blue": 3})
    keep = labels >= 0
    for c, (name, value) in enumerate({"red": 1, "green": 2, "blue": 3}.items()):
        ref = [f1_score((labels[keep] == value).numpy(), (acts[keep, f] > 0).numpy()) for f in range(6)]
        assert r.best_f1[c].item() == pytest.approx(max(ref), abs=1e-6), name
        assert int(r.best_feature[c]) == max(range(6), key=lambda f: ref[f])
    assert r.best_f1[0] == 1.0 and int(r.best_feature[0]) == 2 and int(r.best_feature[1]) == 5
    assert r.uncaptured == ("blue",)
    assert r.support.tolist() == [int((labels == v).sum()) for v in (1, 2, 3)]
    df = r.to_dataframe()
    assert list(df.concept) == ["red", "green", "blue"]
