"""Bad input gets an error that names what was wrong and what is valid."""

import pytest
import torch

import vlmscope as vs
from vlmscope import testing as T


@pytest.fixture(scope="module")
def llava():
    model = T.tiny_llava()
    return model, vs.load(model), T.llava_inputs(model)


def test_unknown_site_names_the_nearest(llava):
    _, m, x = llava
    with pytest.raises(vs.SiteError, match=r"lm\.blocks\.1\.resid_post"):
        m.run_with_cache(x, "lm.blocks.1.resid_pots")
    with pytest.raises(vs.SiteError, match="matches no site"):
        m.run_with_cache(x, "lm.layers.*.resid_post")


def test_unknown_architecture_lists_the_supported_ones():
    with pytest.raises(vs.UnsupportedModelError, match="LlavaForConditionalGeneration.*docs/adapters.md"):
        vs.load(torch.nn.Linear(2, 2))


def test_patch_source_of_wrong_batch_or_shape(llava):
    model, m, x = llava
    _, c = m.run_with_cache(T.llava_inputs(model, batch=3), "lm.blocks.0.resid_post")
    with pytest.raises(vs.InterventionError, match=r"needs batch 2 \(or a divisor of it"):
        m.run(x, [vs.patch("lm.blocks.0.resid_post", c)])
    with pytest.raises(vs.InterventionError, match="shape"):
        m.run(x, [vs.patch("lm.blocks.0.resid_post", torch.zeros(2, 9, 7))])


def test_positions_out_of_range(llava):
    _, m, x = llava
    with pytest.raises(vs.InterventionError, match=r"out of range .* length 9"):
        m.run(x, [vs.ablate("lm.blocks.0.resid_post", positions=[2, 40])])
    with pytest.raises(vs.InterventionError, match="batch row"):
        m.run(x, [vs.ablate("lm.blocks.0.resid_post", batch=5)])
    with pytest.raises(vs.InterventionError, match="unknown position role"):
        m.run(x, [vs.ablate("lm.blocks.0.resid_post", positions="imgae")])


def test_image_count_must_match_image_tokens(llava):
    _, m, x = llava
    bad = {**x, "pixel_values": x["pixel_values"][:1]}
    with pytest.raises(vs.InputError, match=r"1 image\(s\) but 8 image tokens.*4 were expected"):
        m.run(bad)


def test_intervention_on_a_site_the_model_lacks(llava):
    _, m, x = llava
    with pytest.raises(vs.SiteError, match="connector.blocks"):
        m.run(x, [vs.ablate("connector.blocks.0.resid_post")])
    with pytest.raises(vs.InterventionError, match="heads= applies"):
        m.run(x, [vs.ablate("lm.blocks.0.mlp.out", heads=[0])])


def test_dtype_mismatch(llava):
    _, m, x = llava
    src = torch.zeros(2, 9, 64, dtype=torch.float16)
    with pytest.raises(vs.InterventionError, match="dtype torch.float16 .* torch.float32"):
        m.run(x, [vs.patch("lm.blocks.0.resid_post", src)])


def test_knockout_layer_out_of_range(llava):
    _, m, x = llava
    with pytest.raises(vs.InterventionError, match=r"layer\(s\) \[7\] out of range"):
        m.run(x, [vs.knockout("image", "last", layers=[7])])


def test_clip_text_without_eos_is_refused():
    model = T.tiny_clip()
    m = vs.load(model)
    x = T.clip_inputs(model)
    x["input_ids"][1, -1] = 7
    with pytest.raises(vs.InputError, match=r"row\(s\) \[1\] contain no EOS"):
        m.run(x)


def test_prepare_without_processor(llava):
    _, m, _ = llava
    with pytest.raises(vs.InputError, match="needs a processor"):
        m.prepare(None, "hello")
