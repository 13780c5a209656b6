"""vlmscope: mechanistic interpretability for vision-language models.

    import vlmscope as vs
    m = vs.load(model, processor)            # any supported transformers VLM, or "zoo:shapes-llava"
    out, cache = m.run_with_cache(inputs, sites="lm.blocks.*.resid_post")
    out = m.run(inputs, [vs.patch("lm.blocks.3.resid_post", cache, positions="last")])
"""

from vlmscope.errors import (
    InputError,
    InterventionError,
    SiteError,
    UnsupportedModelError,
    VlmscopeError,
)
from vlmscope.model.cache import Cache
from vlmscope.model.interventions import ablate, add, hook, knockout, patch
from vlmscope.model.load import load
from vlmscope.model.positions import PatchBox, Positions
from vlmscope.model.vlm import VLM
from vlmscope.scale.measure import Measured, peak_memory
from vlmscope.scale.plan import MemoryPlan, plan_memory

__version__ = "0.1.0"


def __getattr__(name: str):
    """`vs.zoo` and `vs.methods` load on first use (they import the shapes world and more)."""
    if name in ("zoo", "methods", "experiments", "data"):
        import importlib

        return importlib.import_module(f"vlmscope.{name}")
    raise AttributeError(f"module 'vlmscope' has no attribute {name!r}")


__all__ = [
    "VLM",
    "Cache",
    "InputError",
    "InterventionError",
    "Measured",
    "MemoryPlan",
    "PatchBox",
    "Positions",
    "SiteError",
    "UnsupportedModelError",
    "VlmscopeError",
    "ablate",
    "add",
    "hook",
    "knockout",
    "load",
    "patch",
    "peak_memory",
    "plan_memory",
]
