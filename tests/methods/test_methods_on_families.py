"""Every method runs unchanged on every generative family, and batched patching equals one run
per patch there too (whether or not the prefix-reuse path applies)."""

import pytest
import torch

import vlmscope as vs
from vlmscope import testing as T
from vlmscope.methods.attribution import attribution_patching
from vlmscope.methods.knockout import knockout_sweep
from vlmscope.methods.lens import logit_lens
from vlmscope.methods.metrics import logit_diff
from vlmscope.methods.patching import patch_sweep

FAMILIES = {
    "llava": (T.tiny_llava, T.llava_inputs),
    "llava-next": (T.tiny_llava_next, T.llava_next_inputs),
    "qwen2-vl": (T.tiny_qwen2_vl, T.qwen_inputs),
    "qwen2.5-vl": (lambda: T.tiny_qwen2_vl(version="2.5"), T.qwen_inputs),
    "idefics3": (T.tiny_idefics3, T.idefics3_inputs),
    "paligemma": (T.tiny_paligemma, T.paligemma_inputs),
    "blip2": (T.tiny_blip2, T.blip2_inputs),
    "instructblip": (lambda: T.tiny_blip2(instruct=True), T.blip2_inputs),
}
METRIC = logit_diff(5, 9)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    build, make = FAMILIES[request.param]
    model = build()
    m = vs.load(model)
    clean = make(model)
    last = m.positions(clean)["lm"].last()
    ids = clean["input_ids"].clone()
    ids[torch.arange(len(last)), last] = 7  # STR on each row's last token
    return m, clean, {**clean, "input_ids": ids}


def _read(m, out, inputs):
    last = m.positions(inputs)["lm"].last()
    return METRIC(out.logits[torch.arange(len(last)), last])


def test_sweep_equals_one_run_per_patch(family):
    m, clean, corrupt = family
    r = patch_sweep(m, clean, corrupt, METRIC, sites="lm.blocks.*.resid_post", positions="each")
    _, cache = m.run_with_cache(clean, "lm.blocks.*.resid_post")
    t = clean["input_ids"].shape[1]
    for ci, site in enumerate(r.components):
        for p in (0, t // 2, t - 1):
            mask = torch.zeros(clean["input_ids"].shape, dtype=torch.bool)
            mask[:, p] = True
            out = m.run(corrupt, [vs.patch(site, cache, positions=mask)])
            torch.testing.assert_close(r.raw[:, ci, p], _read(m, out, corrupt), atol=1e-4, rtol=1e-4)


def test_attribution_lens_and_knockout_run(family):
    m, clean, corrupt = family
    atp = attribution_patching(m, clean, corrupt, METRIC, positions="roles")
    assert atp.effect.shape == (m.n_layers("lm"), 3)
    lens = logit_lens(m, clean, k=2)
    out = m.run(clean)
    assert torch.equal(lens.top_ids[-1, ..., 0], out.logits.argmax(-1))
    ko = knockout_sweep(m, clean, METRIC, window=1)
    assert len(ko.starts) == m.n_layers("lm")
