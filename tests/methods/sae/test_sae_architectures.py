"""The four SAE architectures: closed forms of their maps and losses, and recovery of a planted
sparse dictionary (Sharkey et al. 2022) by each, trained together in one pass."""

import pytest
import torch

from vlmscope.methods import sae as S
from vlmscope.methods.sae.base import LossContext
from vlmscope.methods.sae.batchtopk import batch_topk_relu
from vlmscope.methods.sae.jumprelu import _JumpReLU, _Step
from vlmscope.methods.sae.topk import aux_k_loss

ARCHS = ("relu", "topk", "batchtopk", "jumprelu")


def _random_sae(arch, d_in=8, d_sae=24, k=3, seed=0):
    sae = S.build_sae(S.SAEConfig(arch, d_in, d_sae, k=k))
    sae.init_weights(torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        sae.b_enc.copy_(0.1 * torch.randn(d_sae, generator=g))
        sae.b_dec.copy_(0.1 * torch.randn(d_in, generator=g))
        if hasattr(sae, "threshold"):
            sae.threshold.copy_(0.2 * torch.rand(d_sae, generator=g))
    return sae


@pytest.fixture(scope="module")
def planted():
    x, truth = S.planted_dictionary(n_rows=16384, d=32, n_features=64, mean_active=4, seed=0)
    cfg = S.TrainConfig(steps=400, batch_size=256, lr=1e-2, warmup_steps=20, sparsity_warmup_steps=40,
                        dead_after_tokens=256 * 50, resample_every=100, log_every=50)
    specs = [S.SAESpec("x", a, d_sae=128, k=4, name=a) for a in ARCHS]
    saes = S.train_saes(S.TensorSource({"x": x}, chunk_rows=8192), specs, cfg, progress=False)
    return x, truth, saes


@pytest.mark.parametrize("arch", ARCHS)
def test_each_architecture_recovers_the_planted_dictionary(planted, arch):
    x, truth, saes = planted
    score = S.mean_max_cosine(truth, saes[arch].W_dec)
    chance = S.mean_max_cosine(truth, _random_sae(arch, 32, 128, seed=7).W_dec)
    print(f"{arch}: mean max cosine {score:.3f} (random decoder {chance:.3f})")
    assert score >= 0.9 > chance
    with torch.no_grad():
        l0 = (saes[arch].encode(x[:4096]) > 0).float().sum(-1).mean()
    assert 2.0 <= l0 <= 12.0  # the data has 4 active features per row on average


def test_trained_decoders_have_unit_rows_up_to_the_folded_input_scale(planted):
    x, _, saes = planted
    for sae in saes.values():
        norms = sae.W_dec.norm(dim=-1)
        torch.testing.assert_close(norms, norms[:1].expand_as(norms), rtol=1e-5, atol=0)
    # the fold makes the SAE read raw activations: E‖z‖ scaled to √d means norm 1 / scale
    scale = 32 ** 0.5 / float(x[:8192].norm(dim=1).mean())
    assert abs(float(saes["topk"].W_dec[0].norm()) * scale - 1) < 0.05


def test_relu_map_and_loss_are_the_surveys():
    sae = _random_sae("relu")
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(3))
    h = torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc)
    torch.testing.assert_close(sae.encode(x), h)
    torch.testing.assert_close(sae(x), h @ sae.W_dec + sae.b_dec)
    out = sae.train_step(x, LossContext(sparsity=0.7))
    expected = ((x - (h @ sae.W_dec + sae.b_dec)) ** 2).sum(-1).mean() + 0.7 * h.abs().sum(-1).mean()
    torch.testing.assert_close(out.loss, expected)


def test_topk_keeps_the_k_largest_and_batchtopk_k_per_row_on_average():
    pre = torch.randn(6, 24, generator=torch.Generator().manual_seed(0))
    sae = _random_sae("topk", k=3)
    h = sae.activate(pre)
    assert ((h != 0).sum(-1) <= 3).all()
    top = pre.topk(3, dim=-1).values.relu()
    torch.testing.assert_close(h.sort(-1, descending=True).values[:, :3], top)
    hb = batch_topk_relu(pre, 3)
    assert int((hb > 0).sum()) == min(18, int((pre > 0).sum()))
    assert float(hb[hb > 0].min()) >= float(pre.flatten().topk(18).values.min())


def test_batchtopk_infers_with_its_threshold():
    sae = _random_sae("batchtopk", k=3)
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        sae.threshold.zero_()
    out = sae.train_step(x, LossContext())
    sae.after_step(out)
    low = out.acts[out.acts > 0].min()
    torch.testing.assert_close(sae.threshold, low.expand(24))  # first batch: the smallest kept value
    pre = sae.pre_acts(x)
    torch.testing.assert_close(sae.encode(x), pre * (pre > low))
    sae.after_step(out)  # later batches: moving average, still one value for every latent
    assert (sae.threshold == sae.threshold[0]).all()


def test_jumprelu_straight_through_gradients_are_the_papers():
    pre = torch.tensor([[0.10, 0.52, 0.95], [0.49, 0.51, 0.20]], requires_grad=True)
    theta = torch.tensor([0.5, 0.5, 0.5], requires_grad=True)
    eps = 0.05
    _JumpReLU.apply(pre, theta, eps).sum().backward()
    inside = ((pre - theta).abs() < eps / 2).float()  # rectangle kernel K((pre − θ)/ε)
    torch.testing.assert_close(theta.grad, (-(theta / eps) * inside).sum(0).detach())
    torch.testing.assert_close(pre.grad, (pre > theta).float())
    theta.grad, pre.grad = None, None
    _Step.apply(pre, theta, eps).sum().backward()
    torch.testing.assert_close(theta.grad, (-(1 / eps) * inside).sum(0).detach())
    assert pre.grad is None  # the L0 term moves only the threshold (DeepMind's form)
    sae = _random_sae("jumprelu")
    x = torch.randn(4, 8)
    p = sae.pre_acts(x)
    torch.testing.assert_close(sae.encode(x), p.relu() * (p > sae.threshold))


def test_aux_k_only_teaches_dead_latents():
    sae = _random_sae("topk", k=2)
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(2))
    none = sae.train_step(x, LossContext(dead=torch.zeros(24, dtype=torch.bool)))
    assert float(none.parts["aux"]) == 0.0
    dead = torch.arange(24) >= 12
    out = sae.train_step(x, LossContext(dead=dead, aux_k=4))
    assert float(out.parts["aux"].detach()) > 0
    sae.zero_grad()
    aux_k_loss(sae, x, sae.pre_acts(x), sae(x), LossContext(dead=dead, aux_k=4)).backward()
    assert sae.W_enc.grad[:, :12].abs().max() == 0 and sae.W_enc.grad[:, 12:].abs().max() > 0
