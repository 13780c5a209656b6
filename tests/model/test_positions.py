"""Typed positions match the patch grid the config implies; role selection picks exactly those tokens."""

import numpy as np
import pytest
import torch

import vlmscope as vs
from vlmscope import testing as T


@pytest.mark.parametrize("size,patch,strategy", [(28, 14, "default"), (32, 8, "default"), (28, 14, "full")])
def test_llava_image_tokens_follow_the_patch_grid(size, patch, strategy):
    model = T.tiny_llava(image_size=size, patch_size=patch, strategy=strategy)
    m = vs.load(model)
    x = T.llava_inputs(model, batch=2)
    pos = m.positions(x)
    g = size // patch
    lm = pos["lm"]
    assert lm.grid == (g, g)
    image = x["input_ids"] == T.IMAGE_TOKEN
    assert torch.equal(lm.select("image"), image)
    for b in range(2):
        where = image[b].nonzero().flatten()
        rows, cols = lm.row[b, where], lm.col[b, where]
        offset = int(strategy == "full")
        assert (rows[:offset] == -1).all()  # the CLS token has no grid place
        expect = torch.arange(g * g)
        assert torch.equal(rows[offset:], expect // g) and torch.equal(cols[offset:], expect % g)
    assert lm.roles(0)[0] == "special"  # bos
    assert torch.equal(lm.select("last"), torch.nn.functional.one_hot(torch.full((2,), x["input_ids"].shape[1] - 1),
                                                                      x["input_ids"].shape[1]).bool())
    assert pos["vision"].shape == (2, g * g + 1) and pos["vision"].roles(0)[0] == "special"
    assert pos["connector"].shape == (2, g * g + offset)


def test_patch_box_selects_the_boxed_patches():
    model = T.tiny_llava(image_size=32, patch_size=8)  # 4x4 grid
    m = vs.load(model)
    x = T.llava_inputs(model, batch=1)
    mask = m.select(x, vs.PatchBox(1, 3, 2, 4))
    lm = m.positions(x)["lm"]
    got = sorted(zip(lm.row[mask].tolist(), lm.col[mask].tolist()))
    assert got == [(r, c) for r in (1, 2) for c in (2, 3)]
    vmask = m.positions(x)["vision"].select(vs.PatchBox(0, 1, 0, 4))
    assert vmask[0].nonzero().flatten().tolist() == [1, 2, 3, 4]  # after CLS


def test_padding_is_typed_and_last_is_the_last_real_token():
    model = T.tiny_llava()
    m = vs.load(model)
    x = T.llava_inputs(model, batch=2)
    x["attention_mask"][1, -2:] = 0
    lm = m.positions(x)["lm"]
    assert lm.roles(1)[-2:] == ["pad", "pad"]
    assert lm.last().tolist() == [x["input_ids"].shape[1] - 1, x["input_ids"].shape[1] - 3]
    df = lm.to_dataframe()
    assert len(df) == x["input_ids"].numel() and set(df.role) == {"special", "image", "text", "pad"}


def test_prepare_through_a_real_processor_types_image_tokens():
    proc = T.word_processor(["what", "colour", "is", "it", "?"])
    model = T.tiny_llava(image_token=proc.image_token_id)
    m = vs.load(model, proc)
    with pytest.raises(vs.InputError, match="image token id"):
        vs.load(T.tiny_llava(), proc)
    image = (np.random.default_rng(0).random((28, 28, 3)) * 255).astype("uint8")
    x = m.prepare([image, image], ["what colour is it ?", "what is it ?"])
    assert x["pixel_values"].shape == (2, 3, 28, 28)
    pos = m.positions(x)["lm"]
    assert int(pos.select("image").sum()) == 8
    assert pos.roles(1)[-1] == "pad" and pos.roles(0)[:2] == ["special", "image"]
    out, cache = m.run_with_cache(x, "lm.logits")
    assert torch.equal(cache["lm.logits"], out.logits)


def test_clip_streams():
    model = T.tiny_clip()
    m = vs.load(model)
    x = T.clip_inputs(model, n_images=2, n_texts=3)
    pos = m.positions(x)
    assert pos["text"].shape == (3, 6) and pos["vision"].shape == (2, 5)
    assert pos["text"].roles(0)[0] == "special" and pos["text"].roles(0)[-1] == "special"
    assert pos["vision"].grid == (2, 2)
