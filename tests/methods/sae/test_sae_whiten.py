"""Whitened SAE training (`TrainConfig.whiten`): ZCA against its closed form, the fold that makes the
saved SAE read raw activations, and training on whitened rows reproduced from raw ones."""

import pytest
import torch

import vlmscope as vs
from vlmscope.methods import sae as S
from vlmscope.methods.sae.train import zca

ARCHS = ("relu", "topk", "batchtopk", "jumprelu")


def _correlated_rows(n=4096, d=8, seed=0):
    """Rows with an offset and very unequal variances along random directions (rows, d)."""
    g = torch.Generator().manual_seed(seed)
    x, _ = S.planted_dictionary(n_rows=n, d=d, n_features=24, mean_active=3, seed=seed)
    mix = torch.randn(d, d, generator=g) * torch.logspace(-1, 1, d)[:, None]  # (d, d) condition ~ 100
    return x @ mix + torch.randn(d, generator=g)


def test_zca_is_the_inverse_square_root_of_the_regularised_covariance():
    x = _correlated_rows()
    mean, w = zca(x, 0.0)
    torch.testing.assert_close(mean, x.mean(0))
    torch.testing.assert_close(w, w.T)
    white = (x - mean) @ w
    torch.testing.assert_close(torch.cov(white.T), torch.eye(8), atol=1e-4, rtol=0)
    _, w1 = zca(x, 0.5)  # eigenvalue l becomes l / (l + 0.5 * mean eigenvalue)
    vals = torch.linalg.eigvalsh(torch.cov((x - mean).T.double()))
    got = torch.linalg.eigvalsh(torch.cov(((x - mean) @ w1).T.double()))
    torch.testing.assert_close(got, vals / (vals + 0.5 * vals.mean()), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_folded_whitening_reads_raw_activations(arch):
    sae = S.build_sae(S.SAEConfig(arch, 8, 24, k=3))
    sae.init_weights(torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        sae.b_dec.copy_(0.3 * torch.randn(8, generator=g))
        if hasattr(sae, "threshold"):
            sae.threshold.copy_(0.1 * torch.rand(24, generator=g))
    x = _correlated_rows(n=256)
    mean, w = zca(x, 0.1)
    folded = S.build_sae(sae.cfg)
    folded.load_state_dict(sae.state_dict())
    folded.fold_input_whitening(mean, 3.0 * w)
    with torch.no_grad():
        h = sae.encode(3.0 * (x - mean) @ w)  # (rows, d_sae) the SAE on whitened, scaled rows
        torch.testing.assert_close(folded.encode(x), h, atol=1e-4, rtol=1e-4)
        assert (h > 0).any()
        back = sae.decode(h) @ torch.linalg.inv(3.0 * w) + mean  # its reconstruction, unwhitened
        torch.testing.assert_close(folded.decode(h), back, atol=1e-4, rtol=1e-4)


def test_whitened_training_is_training_on_whitened_rows():
    x = _correlated_rows()
    cfg = S.TrainConfig(steps=30, batch_size=256, lr=3e-3, warmup_steps=5, log_every=10)
    spec = [S.SAESpec("x", "topk", d_sae=16, k=3, name="a")]
    mean, w = zca(x, 0.1)  # one chunk: the trainer measures the same mean and covariance
    raw = S.train_saes(S.TensorSource({"x": x}), spec, S.TrainConfig(**{**cfg.__dict__, "whiten": 0.1}),
                       progress=False)["a"]
    white = S.train_saes(S.TensorSource({"x": (x - mean) @ w}), spec, cfg, progress=False)["a"]
    with torch.no_grad():
        h_raw, h_white = raw.encode(x[:512]), white.encode((x[:512] - mean) @ w)
    torch.testing.assert_close(h_raw, h_white, atol=2e-3, rtol=2e-3)
    assert 2.5 < (h_raw > 0).float().sum(-1).mean() <= 3  # TopK: at most k
    with torch.no_grad():  # and the saved SAE reconstructs raw activations
        ev = 1 - (raw(x) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    assert ev > 0.5


def test_negative_whitening_is_refused():
    with pytest.raises(vs.InputError, match="whiten must be >= 0"):
        S.train_saes(S.TensorSource({"x": _correlated_rows(n=64)}), [S.SAESpec("x", "topk", d_sae=8, k=2)],
                     S.TrainConfig(steps=1, batch_size=32, whiten=-0.1), progress=False)
