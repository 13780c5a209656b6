"""Random restarts (sae/restarts.py): the held-out FVU against closed forms, and the kept restart is
the one with the lowest held-out error."""

import pytest
import torch

from vlmscope.errors import InputError
from vlmscope.methods import sae as S
from vlmscope.methods.sae.restarts import Restarts, held_out_fvu, train_restarts


def _identity_sae(d: int) -> S.SAE:
    """TopK with latents [x, -x] and k = d: the positive part of each pair is kept, so decode(encode(x)) = x."""
    sae = S.build_sae(S.SAEConfig("topk", d, 2 * d, k=d))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


@pytest.mark.parametrize("whiten", [0.0, 0.1])
def test_fvu_is_zero_for_a_perfect_reconstruction_and_one_for_the_mean(whiten):
    torch.manual_seed(0)
    rows = torch.randn(500, 6) @ torch.randn(6, 6) + 3.0
    assert held_out_fvu(_identity_sae(6), rows, whiten) == pytest.approx(0.0, abs=1e-10)
    mean_only = _identity_sae(6)
    with torch.no_grad():
        mean_only.W_dec.zero_()
        mean_only.b_dec.copy_(rows.mean(0))
    assert held_out_fvu(mean_only, rows, whiten) == pytest.approx(1.0, abs=1e-5)


def test_whitened_fvu_weighs_every_direction_equally():
    """An error along a low-variance direction counts far more once whitened."""
    torch.manual_seed(1)
    rows = torch.randn(4000, 2) * torch.tensor([10.0, 0.1])
    drop_small = _identity_sae(2)  # drops the second coordinate: W_dec rows for it zeroed
    with torch.no_grad():
        drop_small.W_dec[1].zero_()
        drop_small.W_dec[3].zero_()
    raw, white = held_out_fvu(drop_small, rows, 0.0), held_out_fvu(drop_small, rows, 1e-6)
    assert raw == pytest.approx(0.01 / (100 + 0.01), rel=0.05)  # the small direction's share of the variance
    assert white == pytest.approx(0.5, rel=0.05)  # one of two equal-variance directions lost


def test_train_restarts_keeps_the_restart_with_the_lowest_held_out_error(tmp_path):
    x, _ = S.planted_dictionary(n_rows=6000, d=16, n_features=32, mean_active=3, seed=2)
    spec = S.SAESpec("site", "topk", d_sae=32, k=3)
    cfg = S.TrainConfig(steps=150, batch_size=256, lr=3e-3, warmup_steps=10, seed=0, checkpoint_every=10_000)
    sae, restarts = train_restarts(S.TensorSource({"site": x[:5000]}), spec, cfg, x[5000:], restarts=3,
                                   progress=False, out_dir=tmp_path / "run")
    assert restarts.names == ("site-topk-32-k3-r0", "site-topk-32-k3-r1", "site-topk-32-k3-r2")
    assert len(set(restarts.fvu.tolist())) == 3  # different initialisations, different solutions
    assert restarts.chosen == int(restarts.fvu.argmin())
    assert held_out_fvu(sae, x[5000:]) == pytest.approx(float(restarts.fvu.min()), rel=1e-6)
    kept = S.load_sae(tmp_path / "run" / restarts.names[restarts.chosen])  # every restart is saved
    assert torch.equal(kept.W_dec, sae.W_dec)
    df = restarts.to_dataframe()
    assert df["chosen"].sum() == 1 and df.loc[df["chosen"], "fvu"].item() == pytest.approx(float(restarts.fvu.min()))
    restarts.plot().savefig(tmp_path / "restarts.png")
    again = Restarts.load(restarts.save(tmp_path / "restarts"))
    assert again.names == restarts.names and torch.equal(again.fvu, restarts.fvu) and again.chosen == restarts.chosen


def test_restarts_refuse_bad_input():
    x, _ = S.planted_dictionary(n_rows=600, d=8, n_features=8, seed=0)
    spec, cfg = S.SAESpec("site", "topk", d_sae=8, k=2), S.TrainConfig(steps=2, batch_size=64)
    with pytest.raises(InputError, match="restarts must be >= 1"):
        train_restarts(S.TensorSource({"site": x}), spec, cfg, x, restarts=0)
    with pytest.raises(InputError, match="held_out must map 'site'"):
        train_restarts(S.TensorSource({"site": x}), spec, cfg, x[0], restarts=2)
