"""Every family vlmscope supports, as a tiny random model of the real transformers class plus
processor-free inputs (vlmscope.testing). Tests parametrised over FAMILIES run on each."""

import pytest
import torch

import vlmscope as vs
from vlmscope import testing as T

# name: (build the model, make inputs(model, seed), output key, generative)
FAMILIES = {
    "llava": (T.tiny_llava, T.llava_inputs, "logits", True),
    "llava_siglip": (lambda: T.tiny_llava(vision="siglip", strategy="full", image_size=32, patch_size=8),
                     T.llava_inputs, "logits", True),
    "llava_next": (T.tiny_llava_next, T.llava_next_inputs, "logits", True),
    "llava_next_vicuna": (lambda: T.tiny_llava_next(lm="llama"), T.llava_next_inputs, "logits", True),
    "qwen2_vl": (T.tiny_qwen2_vl, T.qwen_inputs, "logits", True),
    "qwen2_5_vl": (lambda: T.tiny_qwen2_vl(version="2.5"), T.qwen_inputs, "logits", True),
    "idefics3": (T.tiny_idefics3, T.idefics3_inputs, "logits", True),
    "paligemma": (T.tiny_paligemma, T.paligemma_inputs, "logits", True),
    "blip2": (T.tiny_blip2, T.blip2_inputs, "logits", True),
    "instructblip": (lambda: T.tiny_blip2(instruct=True), T.blip2_inputs, "logits", True),
    "clip": (T.tiny_clip, T.clip_inputs, "logits_per_image", False),
    "siglip": (T.tiny_siglip, T.siglip_inputs, "logits_per_image", False),
}
GENERATIVE = [name for name, f in FAMILIES.items() if f[3]]


class Case:
    def __init__(self, name):
        build, self._inputs, self.key, self.generative = FAMILIES[name]
        self.name = name
        self.model = build()
        self.m = vs.load(self.model)
        self.x = self.inputs(seed=0)

    def inputs(self, seed=0):
        return self._inputs(self.model, seed=seed)

    def plain(self, inputs, **kw):
        with torch.no_grad():
            return self.model(**inputs, **kw)


@pytest.fixture(scope="module", params=list(FAMILIES))
def case(request):
    return Case(request.param)


@pytest.fixture(scope="module", params=GENERATIVE)
def generative(request):
    return Case(request.param)


@pytest.fixture(scope="module")
def family():
    """A family's case by name, built once per module."""
    made = {}

    def get(name):
        if name not in made:
            made[name] = Case(name)
        return made[name]

    return get
