import pytest

import vlmscope as vs
from vlmscope import testing as T
from vlmscope.methods.corruptions import replace_tokens


@pytest.fixture(scope="module")
def setup():
    """A tiny random LLaVA, its VLM, and a clean / STR-corrupt pair (second-to-last token swapped)."""
    model = T.tiny_llava()
    m = vs.load(model)
    clean = T.llava_inputs(model, batch=2, seed=0)
    corrupt = replace_tokens(clean, -2, [7, 8])
    return model, m, clean, corrupt
