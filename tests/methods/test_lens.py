import torch

import vlmscope as vs
from vlmscope import testing as T
from vlmscope.methods.lens import TunedLens, logit_lens, train_tuned_lens, vision_lens
from vlmscope.results import Result


def _setup():
    model = T.tiny_llava(image_size=32, patch_size=8)
    return model, vs.load(model), T.llava_inputs(model, batch=2)


def test_lens_at_the_last_layer_is_the_model_itself():
    model, m, x = _setup()
    r = logit_lens(m, x, k=3, targets=[5, 9])
    with torch.no_grad():
        logits = model(**x).logits
    probs = logits.softmax(-1)
    top_p, top_i = probs.topk(3, dim=-1)
    assert torch.equal(r.top_ids[-1], top_i)
    torch.testing.assert_close(r.top_probs[-1], top_p)
    torch.testing.assert_close(r.kl_to_final[-1], torch.zeros_like(r.kl_to_final[-1]), atol=1e-5, rtol=0)
    torch.testing.assert_close(r.target_prob[-1, 0], probs[0, :, 5])
    assert torch.equal(r.target_rank[-1, 1], (probs[1] > probs[1, :, 9:10]).sum(-1))
    ent = -(probs * probs.log()).sum(-1)
    torch.testing.assert_close(r.entropy[-1], ent, atol=1e-4, rtol=1e-4)


def test_identity_tuned_lens_equals_the_logit_lens():
    model, m, x = _setup()
    plain = logit_lens(m, x)
    tuned = logit_lens(m, x, tuned=TunedLens.identity(range(2), 64))
    assert torch.equal(plain.top_ids, tuned.top_ids)
    torch.testing.assert_close(plain.entropy, tuned.entropy)


def test_training_the_tuned_lens_lowers_kl_and_leaves_the_model_alone(tmp_path):
    model, m, x = _setup()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lens = train_tuned_lens(m, [x], layers=[0], steps=60, lr=3e-3)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    kl_logit = logit_lens(m, x, layers=[0]).kl_to_final.mean()
    kl_tuned = logit_lens(m, x, layers=[0], tuned=lens).kl_to_final.mean()
    assert kl_tuned < 0.7 * kl_logit
    lens.save(tmp_path / "lens")
    back = Result.load(tmp_path / "lens")
    assert isinstance(back, TunedLens) and torch.equal(back.weight, lens.weight)


def test_patch_map_lines_up_with_positions():
    model, m, x = _setup()
    r = logit_lens(m, x, k=1)
    words, probs = r.patch_map(layer=1, example=1)
    assert len(words) == 4 and len(words[0]) == 4  # 32 px / 8 px patches
    lm = m.positions(x)["lm"]
    box = lm.select(vs.PatchBox(2, 3, 1, 2))[1]  # the patch at row 2, col 1
    (p,) = box.nonzero()[0].tolist()
    assert words[2][1] == str(int(r.top_ids[1, 1, p, 0]))
    assert probs[2, 1] == r.top_probs[1, 1, p, 0]
    curve = r.entropy_curve()
    assert set(curve.role) == {"image", "text", "special"} and len(curve) == 2 * 3
    df = r.to_dataframe()
    assert len(df) == 2 * x["input_ids"].numel()


def test_vision_lens_reads_connector_positions():
    model, m, x = _setup()
    r = vision_lens(m, x, k=2)
    assert r.approximate and r.top_ids.shape == (2, 2, 16, 2)
    # the vision layer LLaVA feeds the connector (vision_feature_layer=-2) reads as the final reading
    torch.testing.assert_close(r.kl_to_final[0], torch.zeros(2, 16), atol=1e-5, rtol=0)
