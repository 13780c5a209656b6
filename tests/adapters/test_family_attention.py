"""Attention patterns and knockout where attention is not one call per layer over (batch, pos):
Qwen's packed, per-image (and, in Qwen2.5-VL, per-window) vision attention, and the Q-Former's
self- and cross-attention."""

import pytest
import torch

import vlmscope as vs
from vlmscope import testing as T


def _blocks(pattern: torch.Tensor, starts: list[int]) -> list[torch.Tensor]:
    bounds = [*starts, pattern.shape[-1]]
    return [pattern[..., a:b, a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


@pytest.mark.parametrize("version", ["2", "2.5"])
def test_qwen_vision_pattern_is_block_diagonal_and_each_block_is_the_single_image_pattern(version):
    model = T.tiny_qwen2_vl(version=version)
    m = vs.load(model)
    both = T.qwen_inputs(model)  # two images: 4x4 and 4x6 patches, packed into one ViT sequence
    first = T.qwen_inputs(model, grids=(((1, 4, 4),),))
    first["pixel_values"] = both["pixel_values"][:16]
    _, c2 = m.run_with_cache(both, "vision.blocks.*.attn.pattern")
    _, c1 = m.run_with_cache(first, "vision.blocks.*.attn.pattern")
    model.set_attn_implementation("eager")
    try:
        _, c1_eager = m.run_with_cache(first, "vision.blocks.*.attn.pattern")
    finally:
        model.set_attn_implementation("sdpa")
    for i in range(m.n_layers("vision")):
        p2, p1 = c2[f"vision.blocks.{i}.attn.pattern"], c1[f"vision.blocks.{i}.attn.pattern"]
        assert p2.shape == (1, 4, 40, 40) and p1.shape == (1, 4, 16, 16)
        torch.testing.assert_close(p2.sum(-1), torch.ones(1, 4, 40))
        assert p2[..., :16, 16:].abs().max() == 0 and p2[..., 16:, :16].abs().max() == 0  # not across images
        torch.testing.assert_close(p2[..., :16, :16], p1)
        torch.testing.assert_close(c1_eager[f"vision.blocks.{i}.attn.pattern"], p1)
    if version == "2.5":  # block 0 attends within windows of 2x2 tokens (16 patches), block 1 over the image
        win = m.positions(both)["vision"].extra["window"][0]
        same = win[:, None] == win[None, :]
        assert c2["vision.blocks.0.attn.pattern"][0, :, ~same].abs().max() == 0
        assert c2["vision.blocks.1.attn.pattern"][0, :, 16:, 16:].min() > 0


def test_writing_a_block_diagonal_pattern_is_refused():
    model = T.tiny_qwen2_vl()
    m = vs.load(model)
    with pytest.raises(vs.InterventionError,
                       match="attends in 2 separate blocks .* read and knocked out but not written"):
        m.run(T.qwen_inputs(model), [vs.hook("vision.blocks.0.attn.pattern", lambda t, site: t.clone())])


def test_vision_knockout_on_packed_images_cuts_each_block():
    """Knocking every patch out of every other patch leaves each one attending to itself alone,
    in every image's block; the LM is untouched."""
    model = T.tiny_qwen2_vl(version="2.5")
    m = vs.load(model)
    x = T.qwen_inputs(model)
    _, c = m.run_with_cache(x, "vision.blocks.*.attn.pattern",
                            interventions=[vs.knockout("image", "image", part="vision")])
    for i in range(m.n_layers("vision")):
        assert torch.equal(c[f"vision.blocks.{i}.attn.pattern"], torch.eye(40).expand(1, 4, 40, 40))
    box = vs.PatchBox(0, 2, 0, 2, image=0)
    out = m.run(x, [vs.knockout(box, "image", part="vision", layers=[1], batch=0)])
    plain = m.run(x)
    assert not torch.allclose(out.logits, plain.logits)


@pytest.mark.parametrize("name", ["blip2", "instructblip"])
def test_qformer_patterns_equal_transformers_eager_attentions(family, name):
    case = family(name)
    model, m, x = case.model, case.m, case.x
    sites = ["connector.in", "connector.blocks.*.attn.pattern", "connector.blocks.*.xattn.pattern"]
    _, c = m.run_with_cache(x, sites)
    model.set_attn_implementation("eager")
    try:
        image = c["connector.in"]
        kw = dict(query_embeds=model.query_tokens.expand(2, -1, -1), encoder_hidden_states=image,
                  encoder_attention_mask=torch.ones(image.shape[:2], dtype=torch.long),
                  output_attentions=True)
        if name == "instructblip":
            queries = torch.ones(2, 4, dtype=torch.long)
            kw.update(input_ids=x["qformer_input_ids"],
                      attention_mask=torch.cat([queries, x["qformer_attention_mask"]], 1))
        with torch.no_grad():
            ref = model.qformer(**kw)
    finally:
        model.set_attn_implementation("sdpa")
    # transformers' `attentions` also lists the cross-attentions (its recorder matches ".attention" in
    # "crossattention.attention"); the self-attentions are the others
    cross = {id(a) for a in ref.cross_attentions}
    self_attn = [a for a in ref.attentions if id(a) not in cross]
    assert len(self_attn) == len(ref.cross_attentions) == m.n_layers("connector")
    for i in range(m.n_layers("connector")):
        torch.testing.assert_close(c[f"connector.blocks.{i}.attn.pattern"], self_attn[i])
        torch.testing.assert_close(c[f"connector.blocks.{i}.xattn.pattern"], ref.cross_attentions[i])
    assert c["connector.blocks.0.xattn.pattern"].shape == (2, 4, 4, 5)  # queries x (CLS + 2x2 patches)


def test_qformer_knockout_blocks_query_to_query_edges(family):
    case = family("blip2")
    m = case.m
    _, c = m.run_with_cache(case.x, "connector.blocks.*.attn.pattern",
                            interventions=[vs.knockout([0], [1, 2, 3], part="connector")])
    p = c["connector.blocks.1.attn.pattern"]
    assert p[:, :, 1:, 0].abs().max() == 0 and p[:, :, 0, 0].min() > 0
