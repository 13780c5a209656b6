"""SpLiCE's solver against scikit-learn, SpLiCE recovery of planted concepts, word matching."""

import pytest
import torch
from sklearn.linear_model import Lasso

import vlmscope as vs
from vlmscope import testing as T
from vlmscope.methods.explain.splice import SpliceResult, nonneg_lasso, splice, splice_decompose
from vlmscope.methods.explain.word_match import WordMatch, vlm_word_match, word_match
from vlmscope.results import Result


@pytest.mark.parametrize("alpha", [0.005, 0.05, 0.3])
def test_nonneg_lasso_matches_sklearn(alpha):
    g = torch.Generator().manual_seed(0)
    A = torch.randn(40, 60, generator=g, dtype=torch.float64)
    w_true = torch.zeros(60, dtype=torch.float64)
    w_true[[3, 7, 20]] = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64)
    b = A @ w_true + 0.05 * torch.randn(40, generator=g, dtype=torch.float64)
    ours = nonneg_lasso(A, b, alpha)
    ref = Lasso(alpha=alpha, positive=True, fit_intercept=False, tol=1e-12, max_iter=100_000).fit(A.numpy(), b.numpy())
    assert torch.allclose(ours, torch.from_numpy(ref.coef_), atol=1e-5)
    assert (ours >= 0).all()
    assert set((ours > 0).nonzero().flatten().tolist()) == set(torch.from_numpy(ref.coef_).nonzero().flatten().tolist())


def test_nonneg_lasso_batched_equals_columns():
    g = torch.Generator().manual_seed(1)
    A, B = torch.randn(20, 30, generator=g), torch.randn(20, 4, generator=g)
    both = nonneg_lasso(A, B, 0.05)
    for j in range(4):
        assert torch.allclose(both[:, j], nonneg_lasso(A, B[:, j], 0.05), atol=1e-6)


def _planted(n_images=12, d=64, n_concepts=30, seed=0):
    """Images made of 2 concepts each (plus a shared offset and a little noise)."""
    g = torch.Generator().manual_seed(seed)
    concepts = torch.nn.functional.normalize(torch.randn(n_concepts, d, generator=g), dim=-1)
    names = [f"c{i}" for i in range(n_concepts)]
    truth, rows = [], []
    for _ in range(n_images):
        pick = torch.randperm(n_concepts, generator=g)[:2]
        truth.append({names[i] for i in pick.tolist()})
        rows.append(concepts[pick].sum(0) + 0.02 * torch.randn(d, generator=g))
    return torch.stack(rows), concepts, names, truth


def test_splice_recovers_planted_concepts_and_sparsity_is_tunable():
    images, concepts, names, truth = _planted()
    res = splice_decompose(images, concepts, names, l1=0.004, truth=truth)
    assert float(res.precision.mean()) >= 0.9 and float(res.recall.mean()) >= 0.9
    assert float(res.cosine.mean()) > 0.8
    l0 = [float((splice_decompose(images, concepts, names, l1=a).weights > 0).sum(1).float().mean())
          for a in (0.0005, 0.004, 0.02)]
    assert l0[0] >= l0[1] >= l0[2] and l0[0] > l0[2]


def test_splice_on_dual_encoders_and_round_trip(tmp_path):
    for model, inputs in ((T.tiny_clip(), T.clip_inputs), (T.tiny_siglip(), T.siglip_inputs)):
        m = vs.load(model)
        x = inputs(model, n_images=3)
        n_texts = x["input_ids"].shape[0]
        names = [f"t{i}" for i in range(n_texts)]
        res = splice(m, x, names, l1=0.01, truth=[{"t0"}] * 3)
        assert res.weights.shape == (3, n_texts) and (res.weights >= 0).all()
        assert not res.precision.isnan().any()
    back = Result.load(res.save(tmp_path / "splice"))
    assert isinstance(back, SpliceResult) and torch.equal(back.weights, res.weights)
    assert back.concepts == res.concepts and len(res.to_dataframe()) == int((res.weights > 0).sum())


def test_word_match_recovers_planted_word(tmp_path):
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(50, 16, generator=g)
    vocab = [f"w{i}" for i in range(48)] + ["<pad>", "<s>"]
    direction = emb[17] * 3 + 0.1 * torch.randn(16, generator=g)
    res = word_match(torch.stack([direction, -direction]), emb, vocab, k=3, matrix="unembedding")
    assert res.top_words[0][0] == "w17" and float(res.top_cosine[0, 0]) > 0.99
    assert "w17" not in res.top_words[1]
    only = word_match(direction, emb, vocab, k=2, keep=["w3", "w4"])
    assert set(only.top_words[0]) == {"w3", "w4"}
    pad_direction = word_match(emb[48], emb, vocab, k=1)  # special tokens are filtered by default
    assert pad_direction.top_words[0][0] != "<pad>"
    back = Result.load(res.save(tmp_path / "wm"))
    assert isinstance(back, WordMatch) and back.top_words == res.top_words and back.matrix == "unembedding"


def test_vlm_word_match_reads_the_models_own_matrix():
    model = T.tiny_llava(image_token=4)  # the word processor's <image> id
    m = vs.load(model, T.word_processor([f"word{i}" for i in range(123)]))
    head = model.get_output_embeddings().weight.detach()
    res = vlm_word_match(m, head[[40, 77]], matrix="unembedding", k=1)
    assert [w[0] for w in res.top_words] == m.tokenizer.convert_ids_to_tokens([40, 77])
