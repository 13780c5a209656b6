"""Interventions against independent references: weight surgery, hand-built masks, separate runs."""

import copy

import pytest
import torch

import vlmscope as vs
from vlmscope import testing as T


@pytest.fixture(scope="module")
def llava():
    model = T.tiny_llava()
    return model, vs.load(model)


def _logits(model, x):
    with torch.no_grad():
        return model(**x).logits


def test_patching_every_resid_post_from_a_reproduces_a(llava):
    model, m = llava
    a, b = T.llava_inputs(model, seed=0), T.llava_inputs(model, seed=1)
    out_a, cache_a = m.run_with_cache(a, "lm.blocks.*.resid_post")
    out = m.run(b, [vs.patch("lm.blocks.*.resid_post", cache_a)])
    assert torch.equal(out.logits, out_a.logits)
    assert not torch.allclose(_logits(model, b), out_a.logits)


def test_patching_last_resid_mid_carries_into_the_residual_stream(llava):
    model, m = llava
    a, b = T.llava_inputs(model, seed=0), T.llava_inputs(model, seed=1)
    out_a, cache_a = m.run_with_cache(a, "lm.blocks.1.resid_mid")
    out = m.run(b, [vs.patch("lm.blocks.1.resid_mid", cache_a)])
    torch.testing.assert_close(out.logits, out_a.logits)


def test_zero_ablating_mlp_out_equals_zeroed_down_projection(llava):
    model, m = llava
    x = T.llava_inputs(model)
    ref_model = copy.deepcopy(model)
    with torch.no_grad():
        ref_model.model.language_model.layers[0].mlp.down_proj.weight.zero_()
    out = m.run(x, [vs.ablate("lm.blocks.0.mlp.out")])
    torch.testing.assert_close(out.logits, _logits(ref_model, x))


def test_zero_ablating_one_head_equals_zeroed_output_columns(llava):
    model, m = llava
    x = T.llava_inputs(model)
    d_head = model.config.text_config.hidden_size // model.config.text_config.num_attention_heads
    ref_model = copy.deepcopy(model)
    with torch.no_grad():
        ref_model.model.language_model.layers[1].self_attn.o_proj.weight[:, 2 * d_head:3 * d_head] = 0
    out = m.run(x, [vs.ablate("lm.blocks.1.attn.z", heads=[2])])
    torch.testing.assert_close(out.logits, _logits(ref_model, x))


def test_zero_ablating_neurons_equals_zeroed_down_columns(llava):
    model, m = llava
    x = T.llava_inputs(model)
    ref_model = copy.deepcopy(model)
    with torch.no_grad():
        ref_model.model.language_model.layers[0].mlp.down_proj.weight[:, [3, 7]] = 0
    out = m.run(x, [vs.ablate("lm.blocks.0.mlp.post", neurons=[3, 7])])
    torch.testing.assert_close(out.logits, _logits(ref_model, x))


def test_mean_and_resample_ablation(llava):
    model, m = llava
    x, ref = T.llava_inputs(model, seed=0), T.llava_inputs(model, batch=4, seed=3)
    _, ref_cache = m.run_with_cache(ref, "lm.blocks.0.resid_post")
    mean = ref_cache["lm.blocks.0.resid_post"].mean(0)
    out = m.run(x, [vs.ablate("lm.blocks.0.resid_post", "mean", reference=ref_cache)])
    expected = m.run(x, [vs.patch("lm.blocks.0.resid_post", mean[None])])
    torch.testing.assert_close(out.logits, expected.logits)
    pick = torch.randint(4, (2,), generator=torch.Generator().manual_seed(5))
    out = m.run(x, [vs.ablate("lm.blocks.0.resid_post", "resample", reference=ref_cache, seed=5)])
    expected = m.run(x, [vs.patch("lm.blocks.0.resid_post", ref_cache["lm.blocks.0.resid_post"][pick])])
    torch.testing.assert_close(out.logits, expected.logits)


def test_knockout_image_to_last_equals_hand_built_4d_mask(llava):
    model, m = llava
    x = T.llava_inputs(model)
    ids = x["input_ids"]
    b, t = ids.shape
    mask = torch.ones(t, t, dtype=torch.bool).tril()[None, None].repeat(b, 1, 1, 1)
    for row in range(b):
        mask[row, 0, -1, ids[row] == T.IMAGE_TOKEN] = False
    ref = _logits(model, {**x, "attention_mask": mask})
    out = m.run(x, [vs.knockout("image", "last")])
    torch.testing.assert_close(out.logits, ref)
    assert not torch.allclose(out.logits, _logits(model, x))
    model.set_attn_implementation("eager")
    try:
        torch.testing.assert_close(m.run(x, [vs.knockout("image", "last")]).logits, ref)
    finally:
        model.set_attn_implementation("sdpa")


def test_knockout_in_some_layers_only_changes_those_layers(llava):
    model, m = llava
    x = T.llava_inputs(model)
    _, c = m.run_with_cache(x, "lm.blocks.*.attn.pattern", interventions=[vs.knockout("image", "last", layers=[1])])
    img = x["input_ids"][0] == T.IMAGE_TOKEN
    assert c["lm.blocks.0.attn.pattern"][0, :, -1, img].sum() > 0
    assert c["lm.blocks.1.attn.pattern"][0, :, -1, img].abs().max() == 0


def test_per_example_patches_in_one_batch_equal_separate_runs(llava):
    model, m = llava
    clean, corrupt = T.llava_inputs(model, batch=1, seed=0), T.llava_inputs(model, batch=1, seed=1)
    _, cache = m.run_with_cache(clean, "lm.blocks.*.resid_post")
    batch = {k: v.repeat(3, *[1] * (v.dim() - 1)) for k, v in corrupt.items()}
    jobs = [("lm.blocks.0.resid_post", 3), ("lm.blocks.1.resid_post", 7), ("lm.blocks.0.resid_post", -1)]
    together = m.run(batch, [vs.patch(s, cache, positions=p, batch=i) for i, (s, p) in enumerate(jobs)]).logits
    for i, (s, p) in enumerate(jobs):
        alone = m.run(corrupt, [vs.patch(s, cache, positions=p)]).logits
        torch.testing.assert_close(together[i:i + 1], alone)


def test_adding_a_vector_to_resid_post_equals_adding_it_to_the_next_resid_pre(llava):
    model, m = llava
    x = T.llava_inputs(model)
    v = torch.randn(model.config.text_config.hidden_size)
    a = m.run(x, [vs.add("lm.blocks.0.resid_post", v, scale=2.0, positions="text")]).logits
    b = m.run(x, [vs.add("lm.blocks.1.resid_pre", 2 * v, positions="text")]).logits
    assert torch.equal(a, b)
    assert not torch.allclose(a, _logits(model, x))


def test_head_patch_and_pattern_write(llava):
    model, m = llava
    a, b = T.llava_inputs(model, seed=0), T.llava_inputs(model, seed=1)
    out_a, ca = m.run_with_cache(a, ["lm.blocks.1.attn.z", "lm.blocks.1.attn.pattern"])
    _, cb = m.run_with_cache(b, "lm.blocks.1.attn.z", interventions=[vs.patch("lm.blocks.1.attn.z", ca, heads=[0, 3])])
    z = cb["lm.blocks.1.attn.z"]
    assert torch.equal(z[:, :, [0, 3]], ca["lm.blocks.1.attn.z"][:, :, [0, 3]])
    # writing the pattern unchanged recomputes the heads' outputs from it: same logits
    out = m.run(a, [vs.hook("lm.blocks.1.attn.pattern", lambda t, site: t.clone())])
    torch.testing.assert_close(out.logits, out_a.logits)


def test_gradient_mode_matches_closed_form(llava):
    model, m = llava
    x = T.llava_inputs(model)
    out, c = m.run_with_cache(x, ["lm.norm", "lm.logits", "lm.blocks.*.resid_post"],
                              grad_metric=lambda o: o.logits[0, -1, 5] - o.logits[1, -1, 9])
    w = model.lm_head.weight.detach()
    torch.testing.assert_close(c.grads["lm.norm"][0, -1], w[5])
    torch.testing.assert_close(c.grads["lm.norm"][1, -1], -w[9])
    assert c.grads["lm.norm"][:, :-1].abs().max() == 0
    onehot = torch.zeros_like(c["lm.logits"])
    onehot[0, -1, 5], onehot[1, -1, 9] = 1, -1
    assert torch.equal(c.grads["lm.logits"], onehot)
    assert torch.equal(out.logits, _logits(model, x))


def test_cache_keeps_only_chosen_positions_and_patches_from_them(llava):
    model, m = llava
    a, b = T.llava_inputs(model, seed=0), T.llava_inputs(model, seed=1)
    _, full = m.run_with_cache(a, "lm.blocks.*.resid_post")
    _, last = m.run_with_cache(a, "lm.blocks.*.resid_post", positions="last", dtype=torch.float64)
    assert last["lm.blocks.0.resid_post"].shape == (2, 1, 64)
    assert last["lm.blocks.0.resid_post"].dtype == torch.float64
    assert torch.equal(last["lm.blocks.1.resid_post"][:, 0].float(), full["lm.blocks.1.resid_post"][:, -1])
    _, last32 = m.run_with_cache(a, "lm.blocks.0.resid_post", positions="last")
    out = m.run(b, [vs.patch("lm.blocks.0.resid_post", last32)])
    ref = m.run(b, [vs.patch("lm.blocks.0.resid_post", full, positions="last")])
    assert torch.equal(out.logits, ref.logits)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("padded", [False, True])
def test_one_query_attention_equals_the_full_attention_at_that_query(impl, padded):
    """AttnEdit(queries=...) computes one query per row (the patching sweep's last block): at that
    query the head outputs equal the full attention's, under sdpa and eager, with and without a mask."""
    from vlmscope.model.attention import AttnEdit, override

    model = T.tiny_llava()
    model.set_attn_implementation(impl)
    m = vs.load(model)
    x = T.llava_inputs(model, batch=2, seed=3)
    at = torch.tensor([x["input_ids"].shape[1] - 1, x["input_ids"].shape[1] - 3])
    if padded:
        x["attention_mask"] = x["attention_mask"].clone()
        x["attention_mask"][1, -2:] = 0  # row 1 ends two tokens early: its keys past `at` are masked
    site = "lm.blocks.1.attn.z"
    _, full = m.run_with_cache(x, site)
    with override({model.get_submodule(m.site("lm.blocks.1.attn.pattern").module): AttnEdit(queries=at)}):
        _, one = m.run_with_cache(x, site)
    rows = torch.arange(2)
    torch.testing.assert_close(one[site][rows, at], full[site][rows, at], atol=1e-6, rtol=1e-5)
    others = torch.ones(one[site].shape[:2], dtype=torch.bool)
    others[rows, at] = False
    assert (one[site][others] == 0).all()
