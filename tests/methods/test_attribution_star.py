"""Attribution patching beyond plain AtP: integrated gradients, GradDrop and the QK fix, each
against a closed form or exact patching on tiny models."""

import copy

import pytest
import torch

import vlmscope as vs
from vlmscope import testing as T
from vlmscope.methods.attribution import attribution_patching
from vlmscope.methods.attribution_star import key_effects, query_effects
from vlmscope.methods.metrics import last_logits, logit_diff
from vlmscope.methods.patching import patch_sweep

METRIC = logit_diff(5, 9)


def test_integrated_gradients_are_exact_when_the_metric_is_linear_in_the_site(setup):
    model, _, clean, corrupt = setup
    lin = copy.deepcopy(model)  # no final norm, last MLP zeroed: logits linear in the last layer's heads
    lin.model.language_model.norm = torch.nn.Identity()
    with torch.no_grad():
        lin.model.language_model.layers[-1].mlp.down_proj.weight.zero_()
    m = vs.load(lin)
    args = dict(sites="lm.blocks.1.attn.z", heads=True, positions=[-1])
    for direction in ("denoise", "noise"):
        exact = patch_sweep(m, clean, corrupt, METRIC, direction=direction, **args)
        ig = attribution_patching(m, clean, corrupt, METRIC, direction=direction, method="ig", steps=3, **args)
        torch.testing.assert_close(ig.per_pair, exact.per_pair, atol=1e-4, rtol=1e-4)


def test_integrated_gradients_converge_to_the_exact_effect_as_steps_grow(setup):
    # the path starts at lm.embed, and STR changes it at one position only: there the estimate is
    # the integral of the gradient along the patch itself, which tends to the exact effect (1: the
    # whole difference between the runs) at the midpoint rule's rate
    _, m, clean, corrupt = setup
    exact = patch_sweep(m, clean, corrupt, METRIC, sites="lm.embed", positions=[-2])
    torch.testing.assert_close(exact.per_pair, torch.ones_like(exact.per_pair), atol=1e-4, rtol=0)
    atp = attribution_patching(m, clean, corrupt, METRIC, sites="lm.embed", positions=[-2])
    errors = []
    for k in (1, 2, 4, 8, 16):
        ig = attribution_patching(m, clean, corrupt, METRIC, sites="lm.embed", positions=[-2], method="ig", steps=k)
        errors.append(float((ig.per_pair - exact.per_pair).abs().max()))
    assert all(b < a for a, b in zip(errors[1:], errors[2:])), errors
    assert errors[-1] < 1e-3 < float((atp.per_pair - exact.per_pair).abs().max())


def test_integrated_gradients_through_the_vision_tower_reach_the_full_image_effect(setup):
    model, m, clean, _ = setup
    other = {**clean, "pixel_values": T.llava_inputs(model, batch=2, seed=5)["pixel_values"]}  # SIP-like
    ig = attribution_patching(m, clean, other, METRIC, sites="vision.embed", positions="all", method="ig", steps=16)
    torch.testing.assert_close(ig.per_pair, torch.ones_like(ig.per_pair), atol=2e-3, rtol=0)


def test_graddrop_keeps_last_layer_nodes_and_averages_dropped_gradients_elsewhere(setup):
    _, m, clean, corrupt = setup
    sites = ["lm.blocks.*.resid_post", "lm.blocks.*.attn.z", "lm.blocks.*.mlp.out"]
    atp = attribution_patching(m, clean, corrupt, METRIC, sites=sites)
    star = attribution_patching(m, clean, corrupt, METRIC, sites=sites, method="atp*")
    last = [i for i, c in enumerate(atp.components) if c.startswith("lm.blocks.1.")]
    # a last-layer node's only other layer is layer 0, whose drop leaves its gradient as it was
    torch.testing.assert_close(star.raw[:, last], atp.raw[:, last], equal_nan=True)
    # a layer-0 node: |estimate with layer 1's attn.out and mlp.out passing no gradient|, signed like AtP
    site = "lm.blocks.0.resid_post"
    detach = [vs.hook(f"lm.blocks.1.{s}", lambda t, site: t.detach()) for s in ("attn.out", "mlp.out")]
    _, src = m.run_with_cache(clean, site)
    _, base = m.run_with_cache(corrupt, site, interventions=detach,
                               grad_metric=lambda out: METRIC(last_logits(m, out, corrupt)).sum())
    dropped = ((src[site] - base[site]) * base.grads[site]).sum(-1)  # (pair, pos)
    ci = atp.components.index(site)
    plain = atp.raw[:, ci] - atp.corrupt[:, None]
    expected = plain.sign() * dropped.abs()
    torch.testing.assert_close(star.raw[:, ci] - star.corrupt[:, None], expected, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(expected, plain, atol=1e-4)  # the drop did change something


OTHER_FAMILIES = {  # packed vision and multimodal RoPE; a Q-Former connector; image splitting
    "qwen2-vl": (T.tiny_qwen2_vl, T.qwen_inputs),
    "blip2": (T.tiny_blip2, T.blip2_inputs),
    "idefics3": (T.tiny_idefics3, T.idefics3_inputs),
}


@pytest.mark.parametrize("family", list(OTHER_FAMILIES))
def test_integrated_gradients_and_graddrop_on_other_families(family):
    build, make = OTHER_FAMILIES[family]
    model = build()
    m = vs.load(model)
    clean = make(model)
    last = m.positions(clean)["lm"].last()
    ids = clean["input_ids"].clone()
    ids[torch.arange(len(last)), last] = 7  # STR on each row's last token: lm.embed differs there only
    corrupt = {**clean, "input_ids": ids}
    ig = attribution_patching(m, clean, corrupt, METRIC, sites="lm.embed", positions=["last"], method="ig", steps=16)
    torch.testing.assert_close(ig.per_pair, torch.ones_like(ig.per_pair), atol=0.05, rtol=0)
    args = dict(sites="lm.blocks.*.resid_post", positions="roles")
    atp = attribution_patching(m, clean, corrupt, METRIC, **args)
    star = attribution_patching(m, clean, corrupt, METRIC, method="atp*", **args)
    torch.testing.assert_close(star.raw[:, -1], atp.raw[:, -1], equal_nan=True)  # the last layer keeps AtP


def test_index_positions_beyond_the_vision_stream_are_fine(setup):
    _, m, clean, corrupt = setup  # LM positions past the vision stream's length: only LM groups are built
    late = [clean["input_ids"].shape[1] - 2, clean["input_ids"].shape[1] - 1]
    assert late[0] >= m.positions(clean)["vision"].shape[1]
    exact = patch_sweep(m, clean, corrupt, METRIC, sites="lm.blocks.*.resid_post", positions=late)
    approx = attribution_patching(m, clean, corrupt, METRIC, sites="lm.blocks.*.resid_post", positions=late)
    assert approx.groups == exact.groups and approx.effect.shape == exact.effect.shape


def test_unknown_method_is_refused(setup):
    _, m, clean, corrupt = setup
    with pytest.raises(vs.InputError, match="'atp', 'atp\\*', 'ig'"):
        attribution_patching(m, clean, corrupt, METRIC, method="eap")


# --- the QK fix on one attention layer whose only nonlinearity is the softmax ---------------------


def _attention(q, k, v, scale):
    """(batch, pos, head, d) queries, keys, values -> causal pattern (batch, head, query, key), output."""
    t = q.shape[1]
    logits = scale * torch.einsum("bqhd,bkhd->bhqk", q, k)
    logits = logits.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    pattern = logits.softmax(-1)
    return pattern, torch.einsum("bhqk,bkhd->bqhd", pattern, v)


@pytest.fixture(scope="module")
def attn():
    g = torch.Generator().manual_seed(0)
    b, t, h, d = 2, 6, 3, 4
    q, k, v, q2, k2 = (torch.randn(b, t, h, d, generator=g, dtype=torch.float64) for _ in range(5))
    readout = torch.randn(b, t, h, d, generator=g, dtype=torch.float64)
    scale = 2.0  # large logits: a saturated softmax, where plain AtP fails

    def metric(q_, k_):
        return (_attention(q_, k_, v, scale)[1] * readout).sum()  # linear in the pattern

    pattern = _attention(q, k, v, scale)[0].requires_grad_()
    (grad,) = torch.autograd.grad((torch.einsum("bhqk,bkhd->bqhd", pattern, v) * readout).sum(), pattern)
    return q, k, q2, k2, scale, metric, pattern.detach(), grad


def _exact(metric, q, k, new, which):
    """(batch, pos, head): the metric's change when one query (or key) is replaced by `new`'s."""
    out = torch.zeros(q.shape[:3], dtype=q.dtype)
    for i in range(q.shape[0]):
        for p in range(q.shape[1]):
            for h in range(q.shape[2]):
                q_, k_ = q.clone(), k.clone()
                (q_ if which == "q" else k_)[i, p, h] = new[i, p, h]
                out[i, p, h] = metric(q_, k_) - metric(q, k)
    return out


def test_qk_fix_equals_exact_patching_of_queries_and_keys(attn):
    q, k, q2, k2, scale, metric, pattern, grad = attn
    exact_q, exact_k = _exact(metric, q, k, q2, "q"), _exact(metric, q, k, k2, "k")
    torch.testing.assert_close(query_effects(pattern, k, q2 - q, grad, scale), exact_q, atol=1e-9, rtol=1e-7)
    torch.testing.assert_close(key_effects(pattern, q, k2 - k, grad, scale), exact_k, atol=1e-9, rtol=1e-7)
    # plain AtP linearises the softmax and is far off here
    q_, k_ = q.clone().requires_grad_(), k.clone().requires_grad_()
    gq, gk = torch.autograd.grad(metric(q_, k_), [q_, k_])
    assert ((q2 - q) * gq).sum(-1).sub(exact_q).abs().max() > 0.1 * exact_q.abs().max()
    assert ((k2 - k) * gk).sum(-1).sub(exact_k).abs().max() > 0.1 * exact_k.abs().max()
