"""A model split over devices or offloaded to CPU and disk (accelerate) gives the same caches,
gradients and patched logits as the plain model; a bf16 load matches the fp32 model cast to bf16."""

import copy

import accelerate
import pytest
import torch
from torch import nn

import vlmscope as vs
from vlmscope import testing as T
from vlmscope.model.devices import input_device

torch.set_num_threads(1)

SITES = ["lm.blocks.*.resid_post", "lm.blocks.1.attn.pattern", "lm.blocks.2.resid_mid", "vision.blocks.0.resid_post",
         "connector.out"]
# the vision tower and the embeddings on disk: the first parameters the model holds are on `meta`
SPLIT = {"model.vision_tower": "disk", "model.multi_modal_projector": "cpu",
         "model.language_model.embed_tokens": "disk", "model.language_model.layers.0": "cpu",
         "model.language_model.layers.1": "disk", "model.language_model.layers.2": "cpu",
         "model.language_model.layers.3": "disk", "model.language_model.norm": "cpu",
         "model.language_model.rotary_emb": "cpu", "lm_head": "disk"}


def metric(out):
    return out.logits[:, -1, 5].sum()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = T.tiny_llava(text_layers=4)
    path = tmp_path_factory.mktemp("tiny-llava")
    model.save_pretrained(path)
    return model, path


@pytest.fixture(scope="module")
def reference(saved):
    """The plain single-device model: caches, gradients and patched logits to compare against."""
    model, _ = saved
    m = vs.load(model)
    x = T.llava_inputs(model)
    out, cache = m.run_with_cache(x, SITES)
    _, graded = m.run_with_cache(x, SITES, grad_metric=metric)
    ivs = interventions(cache)
    return x, out.logits, cache, graded.grads, ivs, m.run(x, ivs).logits


def interventions(cache):
    return [vs.patch("lm.blocks.1.resid_post", cache, positions="last"),
            vs.patch("lm.blocks.2.resid_mid", cache, batch=1),
            vs.ablate("lm.blocks.3.mlp.out", positions="image"),
            vs.add("lm.blocks.2.resid_post", torch.ones(64), scale=0.5),
            vs.knockout("image", "last", layers=[1, 2])]


def split_map(path, tmp):
    return vs.load(path, device_map=SPLIT, offload_folder=str(tmp / "offload"))


def auto_max_memory(path, tmp):  # too little CPU memory for the whole model: the rest goes to disk
    return vs.load(path, device_map="auto", max_memory={"cpu": "100KB"}, offload_folder=str(tmp / "offload"))


def cpu_offload(path, tmp):
    model = T.tiny_llava(text_layers=4)
    accelerate.cpu_offload(model, execution_device="cpu")
    return vs.load(model)


def dispatch(path, tmp):  # accelerate.dispatch_model on a model already in memory
    model = T.tiny_llava(text_layers=4)
    return vs.load(accelerate.dispatch_model(model, SPLIT, offload_dir=str(tmp / "offload")))


@pytest.mark.parametrize("load", [split_map, auto_max_memory, cpu_offload, dispatch])
def test_offloaded_model_equals_plain(load, saved, reference, tmp_path):
    _, path = saved
    x, logits, cache, grads, ivs, patched = reference
    m = load(path, tmp_path)
    assert any(p.device.type == "meta" for p in m.model.parameters())  # really offloaded
    assert m.device == torch.device("cpu")

    out, got = m.run_with_cache(x, SITES, device="cpu", dtype=torch.float32)
    torch.testing.assert_close(out.logits, logits, atol=1e-5, rtol=0)
    assert list(got) == list(cache)
    for site in cache:
        assert got[site].device.type == "cpu"
        torch.testing.assert_close(got[site], cache[site], atol=1e-5, rtol=0)

    _, graded = m.run_with_cache(x, SITES, grad_metric=metric, device="cpu")
    for site in cache:
        torch.testing.assert_close(graded.grads[site], grads[site], atol=1e-5, rtol=0)

    torch.testing.assert_close(m.run(x, ivs).logits, patched, atol=1e-5, rtol=0)
    assert (patched - logits).abs().max() > 1e-2  # the interventions change the output


def test_bf16_load_matches_cast_model(saved, reference):
    model, path = saved
    x, logits, *_ = reference
    m = vs.load(path, dtype=torch.bfloat16)
    assert {p.dtype for p in m.model.parameters()} == {torch.bfloat16}
    cast = vs.load(copy.deepcopy(model).to(torch.bfloat16))
    out, cache = m.run_with_cache(x, "lm.blocks.*.resid_post")
    ref_out, ref_cache = cast.run_with_cache(x, "lm.blocks.*.resid_post")
    for site in cache:
        assert cache[site].dtype == torch.bfloat16
        torch.testing.assert_close(cache[site], ref_cache[site], atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(out.logits, ref_out.logits, atol=1e-2, rtol=1e-2)
    assert (out.logits.float() - logits).abs().max() < 0.05  # and close to fp32
    # a bf16 source patches a bf16 run; an fp32 vector is cast by add()
    patched = m.run(x, [vs.patch("lm.blocks.0.resid_post", cache, positions="last"),
                        vs.add("lm.blocks.1.resid_post", torch.ones(64))]).logits
    assert patched.dtype == torch.bfloat16 and torch.isfinite(patched).all()


def test_input_device_follows_the_device_map():
    model = nn.Linear(2, 2)
    model.hf_device_map = {"vision": "disk", "embed": "cpu", "lm.0": 1, "lm.1": "cuda:0"}
    assert input_device(model) == torch.device("cuda:1")  # accelerate's main device: first accelerator named
    model.hf_device_map = {"": "disk"}
    assert input_device(model) == torch.device("cpu")
    with torch.device("meta"):
        assert input_device(nn.Linear(2, 2)) == torch.device("meta")
