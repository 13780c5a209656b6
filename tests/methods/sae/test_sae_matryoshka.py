"""Matryoshka SAEs: the nested loss in closed form, training on a planted dictionary, resuming, files."""

import json
import warnings

import pytest
import torch

from vlmscope.methods import sae as S
from vlmscope.methods.sae.base import LossContext
from vlmscope.methods.sae.matryoshka import nested_loss
from vlmscope.methods.sae.train import _Objective


def _sae(arch="topk", widths=(4, 10), rescale=False):
    sae = S.build_sae(S.SAEConfig(arch, 8, 24, k=3, matryoshka=widths, rescale_acts_by_decoder_norm=rescale))
    sae.init_weights(torch.Generator().manual_seed(0))
    with torch.no_grad():
        sae.W_dec.mul_(torch.linspace(0.5, 2.0, 24)[:, None])  # unequal row norms
        sae.b_dec.copy_(torch.linspace(-1, 1, 8))
    return sae


@pytest.mark.parametrize("rescale", [False, True])
def test_nested_loss_is_the_sum_of_prefix_reconstruction_errors(rescale):
    sae = _sae(rescale=rescale)
    g = torch.Generator().manual_seed(1)
    x, acts = torch.randn(16, 8, generator=g), torch.randn(16, 24, generator=g).relu()
    ref = 0.0
    for w in (4, 10):
        kept = acts.clone()
        kept[:, w:] = 0
        with torch.no_grad():
            ref += float((sae.decode(kept) - x).pow(2).sum(-1).mean())  # decode honours the decoder-norm rescaling
    assert float(nested_loss(sae, x, acts, (4, 10)).detach()) == pytest.approx(ref, rel=1e-5)
    out = sae.train_step(x, LossContext())
    loss, *_ , parts = _Objective(sae)(x, LossContext())
    with torch.no_grad():
        assert float(loss) == pytest.approx(float(out.loss) + float(nested_loss(sae, x, out.acts, (4, 10))), rel=1e-5)
    assert float(parts["nested"]) > 0


def test_widths_are_checked():
    for bad in ((10, 4), (4, 4), (0, 8), (8, 24)):
        with pytest.raises(ValueError, match="matryoshka widths"):
            S.SAEConfig("topk", 8, 24, matryoshka=bad)
    assert S.SAEConfig("jumprelu", 8, 24, matryoshka=[2, 8]).matryoshka == (2, 8)


def test_matryoshka_recovers_the_planted_dictionary_and_its_prefix_reconstructs():
    """Trained side by side with a plain TopK SAE: both recover the dictionary; the first 32 latents
    alone reconstruct better in the Matryoshka SAE, which is what its nested loss asks for."""
    x, truth = S.planted_dictionary(n_rows=16384, d=32, n_features=64, mean_active=4, seed=0)
    cfg = S.TrainConfig(steps=400, batch_size=256, lr=1e-2, warmup_steps=20, log_every=50)
    specs = [S.SAESpec("x", "topk", d_sae=128, k=4, name="plain"),
             S.SAESpec("x", "topk", d_sae=128, k=4, name="nested", matryoshka=(32,))]
    saes = S.train_saes(S.TensorSource({"x": x}, chunk_rows=8192), specs, cfg, progress=False)
    assert S.mean_max_cosine(truth, saes["nested"].W_dec) >= 0.9
    with torch.no_grad():
        err = {n: float(nested_loss(s, x[:4096], s.encode(x[:4096]), (32,))) for n, s in saes.items()}
    assert err["nested"] < 0.8 * err["plain"]


def test_matryoshka_training_resumes_and_saves_its_widths(tmp_path):
    from tests.methods.sae.test_sae_train import _Crash, _Flaky

    x, _ = S.planted_dictionary(n_rows=1024, d=8, n_features=16, mean_active=2, seed=3)
    src = S.TensorSource({"x": x}, chunk_rows=128)
    specs = [S.SAESpec("x", "batchtopk", d_sae=16, k=2, name="m", matryoshka=(4, 8))]
    cfg = S.TrainConfig(steps=12, batch_size=64, lr=3e-3, warmup_steps=2, checkpoint_every=3)
    whole = S.train_saes(src, specs, cfg, out_dir=tmp_path / "whole", progress=False)
    with pytest.raises(_Crash):
        S.train_saes(_Flaky(src, 4), specs, cfg, out_dir=tmp_path / "cut", progress=False)
    resumed = S.train_saes(src, specs, cfg, out_dir=tmp_path / "cut", progress=False)
    for p, q in zip(whole["m"].state_dict().values(), resumed["m"].state_dict().values(), strict=True):
        assert torch.equal(p, q)
    doc = json.loads((tmp_path / "whole" / "m" / "cfg.json").read_text())
    assert doc["architecture"] == "jumprelu" and doc["metadata"]["vlmscope"]["matryoshka"] == [4, 8]
    back = S.load_sae(tmp_path / "whole" / "m")
    assert back.cfg.matryoshka == (4, 8) and torch.equal(back.encode(x[:64]), whole["m"].encode(x[:64]))


def test_saelens_reads_a_matryoshka_file_as_its_base_architecture(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sae_lens = pytest.importorskip("sae_lens")
    ours = _sae("topk")
    S.save_sae(ours, tmp_path / "m")
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "m"))
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(theirs.encode(x), ours.encode(x))
