"""Causal methods: invariants, closed forms on a linearised model, and agreement with naive loops."""

import copy

import pytest
import torch

import vlmscope as vs
from vlmscope import testing as T
from vlmscope.methods.ablation import ablation_effects
from vlmscope.methods.attribution import attribution_patching, compare
from vlmscope.methods.corruptions import check_same_layout, gaussian_noise
from vlmscope.methods.knockout import knockout_sweep
from vlmscope.methods.metrics import answer_prob, logit_diff
from vlmscope.methods.patching import patch_sweep
from vlmscope.methods.path_patching import path_patch
from vlmscope.results import Result

METRIC = logit_diff(5, 9)


def _last(out):
    return out.logits[:, -1]


def test_prefix_reuse_is_taken_and_exact(setup):
    from vlmscope.methods.suffix import SuffixRunner

    _, m, clean, corrupt = setup
    runner = SuffixRunner.make(m, corrupt, [])
    assert runner is not None
    # the last block's query / output projections, attention, MLP and the unembedding run at the read position
    last = f"lm.blocks.{m.n_layers('lm') - 1}"
    assert runner.trimmed == [m.site(f"{last}.{s}").module for s in ("attn.q", "attn.z", "mlp.out")]
    assert runner.logits_to_keep and runner.one_query == m.site(f"{last}.attn.pattern").module  # one query there
    # sites inside the trimmed modules (attn.z, mlp.post, attn.q) take the untrimmed path
    sites = ["lm.embed", "lm.blocks.*.resid_mid", "lm.blocks.*.attn.z", "lm.blocks.*.mlp.post", "lm.blocks.*.attn.q",
             "lm.blocks.*.resid_post"]
    fast = patch_sweep(m, clean, corrupt, METRIC, sites=sites, batch_size=16, skip_unchanged=False)
    slow = patch_sweep(m, clean, corrupt, METRIC, sites=sites, batch_size=16, prefix_reuse=False,
                       skip_unchanged=False)
    torch.testing.assert_close(fast.raw, slow.raw, atol=1e-5, rtol=1e-5, equal_nan=True)


def test_unchanged_patches_are_skipped_exactly(setup, monkeypatch):
    """STR changes one token: every patch before it writes the values the corrupt run already has,
    so its metric is the corrupt run's, taken without a forward."""
    from vlmscope.methods import suffix

    _, m, clean, corrupt = setup
    sites = ["vision.blocks.1.resid_post", "lm.blocks.*.resid_post", "lm.blocks.*.attn.z"]
    full = patch_sweep(m, clean, corrupt, METRIC, sites=sites, heads=False, skip_unchanged=False)
    ran = []
    real = suffix.SuffixRunner.run
    monkeypatch.setattr(suffix.SuffixRunner, "run", lambda self, chunk, *a: ran.append(len(chunk)) or real(
        self, chunk, *a))
    fast = patch_sweep(m, clean, corrupt, METRIC, sites=sites, heads=False)
    torch.testing.assert_close(fast.raw, full.raw, atol=1e-5, rtol=1e-5, equal_nan=True)
    t = clean["input_ids"].shape[1]
    n_lm = len([c for c in fast.components if c.startswith("lm.")])
    assert sum(ran) == n_lm * 2  # only the replaced token (t - 2) and the last position (t - 1) rerun
    vision = fast.components.index("vision.blocks.1.resid_post")
    done = ~fast.raw[0, vision].isnan()
    assert done.any() and (fast.per_pair[:, vision][:, done] == 0).all()  # the image is the same in both
    assert t > 2


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_sweep_equals_one_run_per_patch(setup, direction):
    model, m, clean, corrupt = setup
    r = patch_sweep(m, clean, corrupt, METRIC, sites=["lm.blocks.*.resid_post", "vision.blocks.1.resid_post"],
                    direction=direction, batch_size=8)
    base, src = (corrupt, clean) if direction == "denoise" else (clean, corrupt)
    for ci, comp in enumerate(r.components):
        _, cache = m.run_with_cache(src, comp)
        for gi, g in enumerate(r.groups):
            if r.raw[0, ci, gi].isnan():
                continue
            out = m.run(base, [vs.patch(comp, cache, positions=[int(g)])])
            torch.testing.assert_close(r.raw[:, ci, gi], METRIC(_last(out)), atol=1e-5, rtol=1e-5)


def test_patching_clean_into_clean_changes_nothing(setup):
    _, m, clean, _ = setup
    r = patch_sweep(m, clean, clean, METRIC, sites="lm.blocks.*.attn.z", heads=True, positions="roles")
    expected = r.clean[:, None, None].expand_as(r.raw)
    torch.testing.assert_close(r.raw, expected)


@pytest.mark.parametrize("direction,full", [("denoise", 1.0), ("noise", 0.0)])
def test_patching_every_position_of_a_residual_layer_gives_the_full_effect(setup, direction, full):
    _, m, clean, corrupt = setup
    r = patch_sweep(m, clean, corrupt, METRIC, sites="lm.blocks.*.resid_post", positions="all", direction=direction)
    torch.testing.assert_close(r.per_pair, torch.full_like(r.per_pair, full), atol=1e-4, rtol=0)


def _linearised(model):
    """The tiny LLaVA with its final norm removed and its last MLP zeroed: the logits are then a
    linear function of each last-layer head's output, so patching has a closed form."""
    lin = copy.deepcopy(model)
    lin.model.language_model.norm = torch.nn.Identity()
    with torch.no_grad():
        lin.model.language_model.layers[-1].mlp.down_proj.weight.zero_()
    return lin


def test_denoising_and_noising_match_the_closed_form_on_a_linear_readout(setup):
    model, _, clean, corrupt = setup
    lin = _linearised(model)
    m = vs.load(lin)
    site = "lm.blocks.1.attn.z"
    den = patch_sweep(m, clean, corrupt, METRIC, sites=site, heads=True, positions=[-1], direction="denoise")
    noi = patch_sweep(m, clean, corrupt, METRIC, sites=site, heads=True, positions=[-1], direction="noise")
    _, zc = m.run_with_cache(clean, site)
    _, zx = m.run_with_cache(corrupt, site)
    w_o = lin.model.language_model.layers[1].self_attn.o_proj.weight.detach()  # (d, heads * d_head)
    w_u = lin.lm_head.weight.detach()
    readout = w_u[5] - w_u[9]
    d_head = zc[site].shape[-1]
    for h in range(zc[site].shape[2]):
        dz = zc[site][:, -1, h] - zx[site][:, -1, h]  # (pair, d_head)
        delta = dz @ w_o[:, h * d_head:(h + 1) * d_head].T @ readout
        closed = delta / (den.clean - den.corrupt)
        torch.testing.assert_close(den.per_pair[:, h, 0], closed, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(den.per_pair + noi.per_pair, torch.ones_like(den.per_pair), atol=1e-4, rtol=0)
    atp = attribution_patching(m, clean, corrupt, METRIC, sites=site, heads=True, positions=[-1])
    torch.testing.assert_close(atp.per_pair, den.per_pair, atol=1e-4, rtol=1e-4)  # exact when linear


def test_attribution_patching_tracks_exact_patching(setup):
    _, m, clean, corrupt = setup
    sites = ["lm.blocks.*.resid_post", "lm.blocks.*.attn.z", "lm.blocks.*.mlp.out"]
    exact = patch_sweep(m, clean, corrupt, METRIC, sites=sites)
    approx = attribution_patching(m, clean, corrupt, METRIC, sites=sites)
    agree = compare(exact, approx)
    assert agree.pearson["all"] > 0.9
    assert len(agree.disagreements) == 10


def test_per_patch_groups_and_result_round_trip(setup, tmp_path):
    model, m, clean, corrupt = setup
    r = patch_sweep(m, clean, corrupt, METRIC, sites="lm.blocks.0.resid_post", positions="patches")
    assert r.groups == ("r0c0", "r0c1", "r1c0", "r1c1")
    grid = r.patch_map("lm.blocks.0.resid_post")
    assert grid.shape == (2, 2) and grid[0, 1] == r.effect[0, 1]
    r.save(tmp_path / "r")
    back = Result.load(tmp_path / "r")
    assert back.groups == r.groups and torch.equal(back.effect, r.effect)
    assert len(back.to_dataframe()) == 4


def test_gaussian_noise_corruption(setup):
    _, m, clean, _ = setup
    noise = gaussian_noise(m, clean, scale=3.0, seed=1)
    _, c = m.run_with_cache(clean, "lm.embed")
    _, n = m.run_with_cache(clean, "lm.embed", interventions=[noise])
    img = m.select(clean, "image")
    diff = n["lm.embed"] - c["lm.embed"]
    assert diff[~img].abs().max() == 0
    sigma = c["lm.embed"][img].std()
    assert abs(float(diff[img].std() / sigma) - 3.0) < 0.3
    r = patch_sweep(m, clean, clean, METRIC, sites="lm.blocks.*.resid_post", positions="all",
                    corrupt_interventions=[noise])
    torch.testing.assert_close(r.per_pair, torch.ones_like(r.per_pair), atol=1e-4, rtol=0)


def test_pairs_with_different_layouts_are_refused(setup):
    model, m, clean, _ = setup
    longer = T.llava_inputs(model, batch=2, text_len=6)
    with pytest.raises(vs.InputError, match="equal token layouts"):
        check_same_layout(m, clean, longer)
    with pytest.raises(vs.InputError, match="equal token layouts"):
        patch_sweep(m, clean, longer, METRIC)


def test_knockout_sweep_windows_equal_separate_runs(setup):
    _, m, clean, _ = setup
    r = knockout_sweep(m, clean, answer_prob(5), window=1)
    assert r.starts == (0, 1)
    for i, s in enumerate(r.starts):
        out = m.run(clean, [vs.knockout("image", "last", layers=[s])])
        torch.testing.assert_close(r.values[i], answer_prob(5)(_last(out)))
    assert r.strongest() in r.starts
    r2 = knockout_sweep(m, clean, answer_prob(5), window=2)
    out = m.run(clean, [vs.knockout("image", "last")])
    torch.testing.assert_close(r2.values[0], answer_prob(5)(_last(out)))


def test_path_patching_sends_only_the_direct_path(setup):
    _, m, clean, corrupt = setup
    sender, receiver = "lm.blocks.0.attn.out", "lm.blocks.1.resid_post"
    _, src = m.run_with_cache(clean, sender)
    _, base = m.run_with_cache(corrupt, [sender, receiver])
    # with later attention/MLP outputs frozen, the receiver sees base + (sender change) exactly
    frozen = [vs.patch(s, m.run_with_cache(corrupt, s)[1]) for s in
              ["lm.blocks.0.mlp.out", "lm.blocks.1.attn.out", "lm.blocks.1.mlp.out"]]
    _, got = m.run_with_cache(corrupt, receiver, interventions=[vs.patch(sender, src)] + frozen)
    torch.testing.assert_close(got[receiver], base[receiver] + src[sender] - base[sender], atol=1e-5, rtol=1e-5)
    r = path_patch(m, corrupt, clean, METRIC, sender=sender, receivers=[receiver])
    out = m.run(corrupt, [vs.patch(receiver, got)])
    torch.testing.assert_close(r.value, METRIC(_last(out)))


def test_ablation_effects(setup):
    model, m, clean, _ = setup
    answers = _last(m.run(clean)).argmax(-1)
    r = ablation_effects(m, clean, METRIC, ["lm.blocks.0.mlp.out", ("lm.blocks.1.attn.z", {"heads": [1]})],
                         answers=answers)
    assert r.baseline_accuracy == 1.0
    out = m.run(clean, [vs.ablate("lm.blocks.1.attn.z", heads=[1])])
    assert r.value[1] == pytest.approx(float(METRIC(_last(out)).mean()), abs=1e-6)
    assert r.components[1] == "lm.blocks.1.attn.z:heads=[1]"
