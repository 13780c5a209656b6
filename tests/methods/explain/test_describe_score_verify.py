"""Dissection IoU, simulation scoring, the verification loop, Patchscopes and the LLM describer."""


import numpy as np
import pytest
import torch

import vlmscope as vs
from vlmscope import testing as T
from vlmscope.data import COLOURS
from vlmscope.data.scene import sample_scene
from vlmscope.errors import InputError
from vlmscope.methods.explain.concepts import all_concepts, concept_masks, parse
from vlmscope.methods.explain.describe import Dissection, LLMDescription, describe_with_llm, dissect, llm_messages
from vlmscope.methods.explain.patchscope import PatchscopeResult, patchscope
from vlmscope.methods.explain.score import ExplanationScores, correlation, score_explanations
from vlmscope.methods.explain.verify import Verification, verify
from vlmscope.results import Result


def test_dissection_iou_on_synthetic_maps(tmp_path):
    a = torch.zeros(4, 3, 3, dtype=torch.bool)
    a[:, 0, 0] = True  # concept a: top-left patch of every scene
    b = torch.zeros(4, 3, 3, dtype=torch.bool)
    b[:2, 1, :] = True  # concept b: middle row of two scenes
    maps = torch.stack([a.float() * 5, b.float() + a.float() * 0.5])  # feature 1 also fires weakly on a
    res = dissect(maps, {"a": a, "b": b}, quantile=0.5, features=["f0", "f1"])
    # f0: on = a exactly -> IoU(a) = 1, IoU(b) = 0; f1 threshold 0 -> on = a | b: IoU(b) = 6 / 10
    assert torch.allclose(res.iou, torch.tensor([[1.0, 0.0], [4 / 10, 6 / 10]]))
    assert res.labels == ("a", "b")
    quiet = dissect(torch.zeros(1, 4, 3, 3), {"a": a}, quantile=0.5)
    assert quiet.labels == ("",)  # nothing above threshold: no label
    back = Result.load(res.save(tmp_path / "d"))
    assert isinstance(back, Dissection) and torch.equal(back.iou, res.iou) and back.labels == res.labels


def test_concept_masks_follow_patch_objects():
    rng = np.random.default_rng(0)
    scenes = [sample_scene(rng) for _ in range(5)]
    masks = concept_masks(scenes)
    for i, s in enumerate(scenes):
        for o in s.objects:
            assert masks[f"colour={o.colour}"][i, o.row, o.col]
            assert masks[f"cell={o.cell}"][i].sum() >= 1
        assert masks[f"domain={s.domain}"][i].all()
    with pytest.raises(InputError, match="colour=red"):
        parse("color=red")


def test_simulation_correlation_closed_form(tmp_path):
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(20, 3, 3, generator=g) > 0.7
    real = 2.0 * mask.float() + 1.0
    assert correlation(real, mask.float()) == pytest.approx(1.0)
    noisy = mask.float() + 0.5 * torch.randn(20, 3, 3, generator=g)
    ref = np.corrcoef(noisy.flatten().numpy(), mask.flatten().float().numpy())[0, 1]
    assert correlation(noisy, mask.float()) == pytest.approx(ref, abs=1e-6)
    res = score_explanations(torch.stack([real, -real]), ["x", "x"], {"x": mask}, quantile=0.5)
    assert res.correlation.tolist() == pytest.approx([1.0, -1.0])
    assert float(res.precision[0]) == 1.0 and float(res.recall[0]) == 1.0
    back = Result.load(res.save(tmp_path / "s"))
    assert isinstance(back, ExplanationScores) and torch.equal(back.correlation, res.correlation)


def _patches(m: torch.Tensor) -> torch.Tensor:
    return m.view(m.shape[0], 3, 24, 3, 24).float().mean((2, 4))  # (n, 3, 3) share of each 24-px patch


def red_feature(images):
    x = torch.from_numpy(np.stack(images)).int()
    return (_patches((x[..., 0] > 180) & (x[..., 1] < 90) & (x[..., 2] < 90)) > 0.02).float()


def object_feature(images):
    x = torch.from_numpy(np.stack(images)).int()
    return (_patches(x.max(-1).values - x.min(-1).values > 100) > 0.02).float()


def test_verification_verdicts(tmp_path):
    assert verify(red_feature, "colour=red", n_bases=16).verdict == "holds"
    broad = verify(object_feature, "colour=red", n_bases=16)
    assert broad.verdict == "too broad" and "colour=green" in broad.detail
    assert verify(object_feature, "size=large", n_bases=16).verdict == "too broad"
    assert verify(red_feature, "shape=circle", n_bases=16).verdict == "does not hold"

    res = verify(_round_red, "colour=red", n_bases=30)
    assert res.verdict == "too narrow" and res.detail == "depends on size: fires for large"  # explains most
    back = Result.load(res.save(tmp_path / "v"))
    assert isinstance(back, Verification) and back.verdict == res.verdict and torch.equal(back.response, res.response)


def _round_red(images):
    """Narrower than "red": fires on patches with >= 200 red pixels, i.e. large red objects of the
    fuller shapes only, so within red it depends on shape (and size)."""
    x = torch.from_numpy(np.stack(images)).int()
    red = (x[..., 0] > 180) & (x[..., 1] < 90) & (x[..., 2] < 90)
    return (red.view(len(images), 3, 24, 3, 24).sum((2, 4)) >= 200).float()


@pytest.fixture(scope="module")
def llava_words():
    words = [f"w{i}" for i in range(123)]
    model = T.tiny_llava(image_token=4)
    return vs.load(model, T.word_processor(words)), words


def test_patchscope_writes_the_vector_at_the_placeholder(llava_words, tmp_path):
    m, _ = llava_words
    prompt = "w1 w2 w3 w4"
    # injecting the residual the model itself computes there changes nothing
    x = {k: v for k, v in m.tokenizer([prompt], return_tensors="pt").items()}
    out, cache = m.run_with_cache(x, "lm.blocks.0.resid_post")
    own = cache["lm.blocks.0.resid_post"][0, 2]
    res = patchscope(m, own, layer=0, prompt=prompt, placeholder="w2", k=3)
    probs = out.logits[0, -1].softmax(-1)
    assert res.top_ids[0].tolist() == probs.topk(3).indices.tolist()
    other = patchscope(m, torch.randn(2, own.shape[0]) * 10, layer=0, prompt=prompt, placeholder="w2", k=3)
    assert not torch.allclose(other.top_probs[0], res.top_probs[0])
    with pytest.raises(InputError, match="placeholder"):
        patchscope(m, own, layer=0, prompt=prompt, placeholder="w9")
    back = Result.load(other.save(tmp_path / "p"))
    assert isinstance(back, PatchscopeResult) and back.top_tokens == other.top_tokens


def test_llm_describer_against_a_local_server(tmp_path, llm_server):
    url, seen = llm_server(" red objects \n")
    evidence = {"dissection": {"colour=red": 0.8}, "top words": ["red", "circle"]}
    res = describe_with_llm(evidence, url, model="stub", api_key="k")
    path, body, auth = seen[-1]
    assert path == "/v1/chat/completions" and auth == "Bearer k"
    assert body["model"] == "stub" and body["messages"] == llm_messages(evidence)
    assert "colour=red" in body["messages"][-1]["content"]
    assert res.description == "red objects" and list(res.messages) == body["messages"]
    back = Result.load(res.save(tmp_path / "llm"))
    assert isinstance(back, LLMDescription) and back.description == res.description
    assert back.evidence == evidence
    with pytest.raises(InputError, match="http"):
        describe_with_llm(evidence, "127.0.0.1:9")


def _fixed_patch(images):
    """Fires at patch 4 whatever it shows: a position feature."""
    out = torch.zeros(len(images), 3, 3)
    out[:, 1, 1] = 1.0
    return out


def _background(images):
    return 1.0 - object_feature(images)


def test_verification_of_object_patch_and_background(tmp_path):
    """The union and position concepts get their own controls: an object detector holds as "object"
    and an object-specific feature is too narrow for it; a position feature holds as "patch=4" and is
    too broad as "cell=4" (it fires whichever cell the object is in)."""
    obj = verify(object_feature, "object", n_bases=16)
    assert obj.verdict == "holds" and float(obj.fire_rate[-1]) == 0.0 and obj.values[-1] == "empty"
    red = verify(red_feature, "object", n_bases=16)
    assert red.verdict == "too narrow" and red.detail == "depends on colour: fires for red"
    assert verify(_background, "object", n_bases=16).verdict == "too broad"
    pos = verify(_fixed_patch, "patch=4", n_bases=8)
    assert pos.verdict == "holds" and pos.fire_rate.tolist() == [0, 0, 0, 0, 1, 0, 0, 0, 0]
    assert verify(_fixed_patch, "patch=3", n_bases=8).verdict == "does not hold"
    assert verify(_fixed_patch, "cell=4", n_bases=8).verdict == "too broad"
    narrow = verify(object_feature, "patch=4", n_bases=8)
    assert narrow.verdict == "too narrow" and narrow.detail == "only when the patch shows an object"
    bg = verify(_background, "background", n_bases=16)
    assert bg.verdict == "holds" and float(bg.fire_rate[-1]) == 0.0
    assert verify(object_feature, "background", n_bases=16).verdict == "does not hold"
    back = Result.load(obj.save(tmp_path / "o"))
    assert isinstance(back, Verification) and back.values == obj.values and back.verdict == "holds"
    back = Result.load(bg.save(tmp_path / "b"))  # NaN where a patch shows the object (or none is there)
    assert back.response.shape == (16 * 10, 10) and torch.equal(back.response.isnan(), bg.response.isnan())
    assert len(bg.to_dataframe()) == 10 and len(pos.to_dataframe()) == 9


def test_concept_masks_of_object_background_and_patch():
    rng = np.random.default_rng(1)
    scenes = [sample_scene(rng) for _ in range(6)]
    masks = concept_masks(scenes, 3, ["object", "background", "patch=5"] + all_concepts(["colour"]))
    assert torch.equal(masks["object"], ~masks["background"])
    assert torch.equal(masks["object"], torch.stack([masks[f"colour={c}"] for c in COLOURS]).any(0))
    assert masks["patch=5"][:, 1, 2].all() and int(masks["patch=5"].sum()) == len(scenes)
    assert parse("object") == ("object", "") and parse("patch=8") == ("patch", "8")
    with pytest.raises(InputError, match="patch=9"):
        parse("patch=9")
