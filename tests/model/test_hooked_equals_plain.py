"""Hooked runs equal plain runs bit for bit, and every cached site equals an independent reference."""

import pytest
import torch

import vlmscope as vs
from vlmscope import testing as T

BUILDERS = {
    "llava": (T.tiny_llava, T.llava_inputs),
    "llava-full": (lambda: T.tiny_llava(strategy="full"), T.llava_inputs),
    "clip": (T.tiny_clip, T.clip_inputs),
}


@pytest.fixture(scope="module", params=list(BUILDERS))
def case(request):
    build, make_inputs = BUILDERS[request.param]
    model = build()
    return request.param, model, vs.load(model), make_inputs(model)


def _plain(model, inputs, **kw):
    with torch.no_grad():
        return model(**inputs, **kw)


def test_every_site_cached_leaves_outputs_bit_identical(case):
    name, model, m, x = case
    ref = _plain(model, x)
    out, cache = m.run_with_cache(x)
    assert set(cache) == set(m.sites())
    key = "logits_per_image" if name == "clip" else "logits"
    assert torch.equal(out[key], ref[key])


def test_no_hook_or_attention_override_survives_a_failing_run(case):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    _, model, m, x = case
    before = dict(ALL_ATTENTION_FUNCTIONS._local_mapping)
    hooks_before = {n: (dict(mod._forward_hooks), dict(mod._forward_pre_hooks)) for n, mod in model.named_modules()}

    def boom(t, *, site):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        m.run_with_cache(x, m.sites("*.attn.pattern"), interventions=[vs.hook(m.sites("*.resid_post")[-1], boom)])
    assert dict(ALL_ATTENTION_FUNCTIONS._local_mapping) == before
    hooks_after = {n: (dict(mod._forward_hooks), dict(mod._forward_pre_hooks)) for n, mod in model.named_modules()}
    assert hooks_after == hooks_before  # transformers' own hooks stay, ours are gone


@pytest.mark.parametrize("part", ["vision", "lm", "text"])
def test_block_sites_compose_like_the_block(case, part):
    """resid_mid = resid_pre + attn.out, resid_post = resid_mid + mlp.out, attn.out = W_O z, and
    mlp.out = W_down mlp.post: the cached sites are what the block computes."""
    _, model, m, x = case
    if not m.sites(f"{part}.blocks.*"):
        pytest.skip(f"no {part} tower")
    _, c = m.run_with_cache(x, f"{part}.blocks.*")
    for i in range(m.n_layers(part)):
        b = f"{part}.blocks.{i}"
        spec = m.site(f"{b}.attn.z")
        o_proj = model.get_submodule(spec.module)
        down = model.get_submodule(m.site(f"{b}.mlp.post").module)
        torch.testing.assert_close(c[f"{b}.resid_pre"] + c[f"{b}.attn.out"], c[f"{b}.resid_mid"])
        torch.testing.assert_close(c[f"{b}.resid_mid"] + c[f"{b}.mlp.out"], c[f"{b}.resid_post"])
        torch.testing.assert_close(o_proj(c[f"{b}.attn.z"].flatten(-2)), c[f"{b}.attn.out"])
        torch.testing.assert_close(down(c[f"{b}.mlp.post"]), c[f"{b}.mlp.out"])
        if i + 1 < m.n_layers(part):
            assert torch.equal(c[f"{b}.resid_post"], c[f"{part}.blocks.{i + 1}.resid_pre"])


def test_resid_post_equals_transformers_hidden_states():
    model = T.tiny_llava()
    m, x = vs.load(model), T.llava_inputs(model)
    ref = _plain(model, x, output_hidden_states=True)
    _, c = m.run_with_cache(x, ["lm.blocks.*.resid_pre", "lm.embed", "lm.logits"])
    assert torch.equal(c["lm.embed"], ref.hidden_states[0])
    for i in range(m.n_layers("lm")):
        assert torch.equal(c[f"lm.blocks.{i}.resid_pre"], ref.hidden_states[i])
    assert torch.equal(c["lm.logits"], ref.logits)


def test_pattern_under_sdpa_equals_eager_attentions():
    model = T.tiny_llava()
    m, x = vs.load(model), T.llava_inputs(model)
    assert model.config.text_config._attn_implementation == "sdpa"
    _, c = m.run_with_cache(x, "lm.blocks.*.attn.pattern")
    assert model.config.text_config._attn_implementation == "sdpa"  # restored / never changed
    model.set_attn_implementation("eager")
    try:
        ref = _plain(model, x, output_attentions=True)
    finally:
        model.set_attn_implementation("sdpa")
    for i, a in enumerate(ref.attentions):
        torch.testing.assert_close(c[f"lm.blocks.{i}.attn.pattern"], a)


def test_vision_pattern_equals_eager_vision_attentions():
    model = T.tiny_llava()
    m, x = vs.load(model), T.llava_inputs(model)
    _, c = m.run_with_cache(x, "vision.blocks.*.attn.pattern")
    model.set_attn_implementation("eager")
    try:
        ref = _plain(model.model.vision_tower, {"pixel_values": x["pixel_values"]}, output_attentions=True)
    finally:
        model.set_attn_implementation("sdpa")
    for i, a in enumerate(ref.attentions):
        torch.testing.assert_close(c[f"vision.blocks.{i}.attn.pattern"], a)


def test_clip_logits_site_and_projections():
    model = T.tiny_clip()
    m, x = vs.load(model), T.clip_inputs(model)
    ref = _plain(model, x)
    _, c = m.run_with_cache(x, ["logits", "vision.proj", "text.proj", "text.norm"])
    assert torch.equal(c["logits"], ref.logits_per_image)
    norm = torch.nn.functional.normalize
    torch.testing.assert_close(norm(c["vision.proj"], dim=-1), ref.image_embeds)
    torch.testing.assert_close(norm(c["text.proj"], dim=-1), ref.text_embeds)
    assert torch.equal(c["text.norm"], ref.text_model_output.last_hidden_state)
