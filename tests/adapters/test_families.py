"""The checklist every family passes (docs/adapters.md): hooked == plain bit for bit with every site
cached, shapes known in advance, block sites that compose like the block, patching that
reproduces the source run, and knockout equal to a hand-built 4-D attention mask."""

import pytest
import torch

import vlmscope as vs
from vlmscope.model.adapters import supported_classes
from vlmscope.model.adapters.towers import QFormerLayout, block_layout


def test_every_site_cached_leaves_outputs_bit_identical(case):
    ref = case.plain(case.x)
    out, cache = case.m.run_with_cache(case.x)
    assert set(cache) == set(case.m.sites())
    assert torch.equal(out[case.key], ref[case.key])


def test_site_shapes_are_the_cached_shapes(case):
    _, cache = case.m.run_with_cache(case.x)
    shapes = case.m.site_shapes(case.x)
    assert list(shapes) == case.m.sites()
    assert shapes == {s: tuple(t.shape) for s, t in cache.items()}


def test_patterns_under_sdpa_equal_eagers_own(case):
    """Under sdpa vlmscope computes every pattern on the side with the model file's eager attention;
    under eager it reads the weights eager itself returns. Both agree, for every attention site."""
    sites = case.m.sites("*attn.pattern")
    _, sdpa = case.m.run_with_cache(case.x, sites)
    case.model.set_attn_implementation("eager")
    try:
        _, eager = case.m.run_with_cache(case.x, sites)
    finally:
        case.model.set_attn_implementation("sdpa")
    for site in sites:
        torch.testing.assert_close(sdpa[site], eager[site])
        rows = sdpa[site].sum(-1)
        torch.testing.assert_close(rows, torch.ones_like(rows))


def test_embed_sites(case):
    """vision/text/connector.embed is what enters block 0; lm.embed is the LM's inputs_embeds: the
    token embeddings at text positions (and block 0's input, unless the decoder transforms it)."""
    names = case.m.sites("*.embed")
    assert names
    _, c = case.m.run_with_cache(case.x, names + case.m.sites("*.blocks.0.resid_pre"))
    for name in names:
        same = torch.equal(c[name], c[name.replace("embed", "blocks.0.resid_pre")])
        transforms = name == "lm.embed" and case.name == "blip2"  # OPT adds its learned positions
        assert same != transforms, name
    if "lm.embed" in c:
        text = case.m.positions(case.x)["lm"].select("text")
        tokens = case.model.get_input_embeddings()(case.x["input_ids"])
        assert torch.equal(c["lm.embed"][text], tokens[text])


@pytest.mark.parametrize("part", ["vision", "lm", "text", "connector"])
def test_block_sites_compose_like_the_block(case, part):
    """Pre-norm blocks: resid_mid = resid_pre + attn.out, resid_post = resid_mid + mlp.out,
    attn.out = W_O z, mlp.out = W_down mlp.post. Post-norm Q-Former layers: each residual site is
    LayerNorm(previous residual + the sublayer's output)."""
    m, model = case.m, case.model
    if not m.sites(f"{part}.blocks.*"):
        pytest.skip(f"{case.name} has no {part} blocks")
    _, c = m.run_with_cache(case.x, f"{part}.blocks.*")
    close = torch.testing.assert_close
    for i in range(m.n_layers(part)):
        b = f"{part}.blocks.{i}"
        block = model.get_submodule(m.site(f"{b}.resid_post").module)
        o_proj = model.get_submodule(m.site(f"{b}.attn.z").module)
        down = model.get_submodule(m.site(f"{b}.mlp.post").module)
        close(o_proj(c[f"{b}.attn.z"].flatten(-2)), c[f"{b}.attn.out"])
        close(down(c[f"{b}.mlp.post"]), c[f"{b}.mlp.out"])
        if isinstance(block_layout(block), QFormerLayout):
            q = c[f"{b}.mlp.out"].shape[1]
            self_out = block.attention.output.LayerNorm(c[f"{b}.resid_pre"] + c[f"{b}.attn.out"])
            close(self_out, c[f"{b}.resid_mid"])
            mid = c[f"{b}.resid_mid"][:, :q]
            if f"{b}.resid_cross" in c:
                close(block.crossattention.output.LayerNorm(mid + c[f"{b}.xattn.out"]), c[f"{b}.resid_cross"])
                mid = c[f"{b}.resid_cross"]
            close(block.output_query.LayerNorm(mid + c[f"{b}.mlp.out"]), c[f"{b}.resid_post"][:, :q])
        else:
            close(c[f"{b}.resid_pre"] + c[f"{b}.attn.out"], c[f"{b}.resid_mid"])
            close(c[f"{b}.resid_mid"] + c[f"{b}.mlp.out"], c[f"{b}.resid_post"])
        if i + 1 < m.n_layers(part):
            assert torch.equal(c[f"{b}.resid_post"], c[f"{part}.blocks.{i + 1}.resid_pre"])


def test_patching_every_resid_post_from_a_reproduces_a(case):
    a, b = case.inputs(seed=0), case.inputs(seed=1)
    out_a, cache_a = case.m.run_with_cache(a, "*.blocks.*.resid_post")
    out = case.m.run(b, [vs.patch("*.blocks.*.resid_post", cache_a)])
    keep = b["attention_mask"].bool() if case.generative else slice(None)  # pads are not patched
    assert torch.equal(out[case.key][keep], out_a[case.key][keep])
    assert not torch.allclose(case.plain(b)[case.key][keep], out_a[case.key][keep])


def test_patching_resid_mid_carries_into_the_residual_stream(case):
    """A write at resid_mid reaches the block's output even where the block keeps its own
    reference to the residual (or flattens it around the MLP, as OPT does)."""
    part = "lm" if case.generative else "text"
    a, b = case.inputs(seed=0), case.inputs(seed=1)
    last = f"{part}.blocks.{case.m.n_layers(part) - 1}"
    _, cache_a = case.m.run_with_cache(a, [f"{last}.resid_mid", f"{last}.resid_post"])
    _, c = case.m.run_with_cache(b, f"{last}.resid_post",
                                 interventions=[vs.patch(f"{last}.resid_mid", cache_a)])
    keep = b["attention_mask"].bool() if case.generative else slice(None)  # pads are not patched
    torch.testing.assert_close(c[f"{last}.resid_post"][keep], cache_a[f"{last}.resid_post"][keep])


def _reference_mask(case, x, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """The 4-D boolean mask transformers uses for these inputs (causal, padding; PaliGemma's
    bidirectional prefix), with the edges dst -> src blocked (a position keeps its own)."""
    valid = x["attention_mask"].bool()
    b, t = valid.shape
    allowed = torch.ones(t, t, dtype=torch.bool).tril()[None] & valid[:, None, :]
    if "token_type_ids" in x:
        prefix = (x["token_type_ids"] == 0) & valid
        allowed |= prefix[:, :, None] & prefix[:, None, :]
    blocked = dst[:, :, None] & src[:, None, :] & ~torch.eye(t, dtype=torch.bool)
    return (allowed & ~blocked)[:, None]


def _run_with_mask(case, x, mask):
    kw = {**x, "attention_mask": mask}
    if type(case.model).__name__ == "Blip2ForConditionalGeneration":  # OPT reads its positions off a 2-D mask
        kw["position_ids"] = (x["attention_mask"].cumsum(1) * x["attention_mask"] - 1).long()
    if "image_grid_thw" in x:  # Qwen: the multimodal rotary positions, from the 2-D mask
        kw["position_ids"] = case.model.model.get_rope_index(
            x["input_ids"], mm_token_type_ids=x["mm_token_type_ids"], image_grid_thw=x["image_grid_thw"],
            attention_mask=x["attention_mask"])[0]
    return case.plain(kw)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("src,dst", [("image", "last"), ("image", "text")])
def test_knockout_equals_a_hand_built_4d_mask(generative, impl, src, dst):
    case = generative
    x = case.x
    pos = case.m.positions(x)["lm"]
    ref = _run_with_mask(case, x, _reference_mask(case, x, pos.select(src), pos.select(dst)))
    case.model.set_attn_implementation(impl)
    try:
        out = case.m.run(x, [vs.knockout(src, dst)])
    finally:
        case.model.set_attn_implementation("sdpa")
    valid = x["attention_mask"].bool()
    torch.testing.assert_close(out.logits[valid], ref.logits[valid])
    assert not torch.allclose(out.logits[valid], case.plain(x).logits[valid])


def test_unknown_class_lists_every_supported_class():
    with pytest.raises(vs.UnsupportedModelError) as err:
        vs.load(torch.nn.Linear(2, 2))
    message = str(err.value)
    assert "docs/adapters.md" in message
    for cls in supported_classes():
        assert cls in message
    assert {"LlavaNextForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration",
            "SmolVLMForConditionalGeneration", "PaliGemmaForConditionalGeneration",
            "InstructBlipForConditionalGeneration", "SiglipModel"} <= set(supported_classes())
