import torch

import vlmscope as vs
from vlmscope import testing as T


def test_cache_save_load_round_trip(tmp_path):
    model = T.tiny_llava()
    m = vs.load(model)
    _, c = m.run_with_cache(T.llava_inputs(model), "lm.*", positions="last",
                            grad_metric=lambda o: o.logits[:, -1, 3].sum())
    c.save(tmp_path / "c")
    back = vs.Cache.load(tmp_path / "c")
    assert list(back) == list(c)
    for k in c:
        assert torch.equal(back[k], c[k]) and torch.equal(back.grads[k], c.grads[k])
    assert torch.equal(back.kept["lm"], c.kept["lm"]) and back.layouts == c.layouts
    stacked = back.stack("lm.blocks.*.resid_post")
    assert stacked.shape == (2, 2, 1, 64)
