"""Inputs transformers accepts silently (or fails on obscurely) are clear InputErrors in vlmscope."""

import pytest
import torch

import vlmscope as vs
from vlmscope import testing as T


def test_qwen2_5_vl_without_mm_token_type_ids_is_refused(family):
    case = family("qwen2_5_vl")
    x = {k: v for k, v in case.x.items() if k != "mm_token_type_ids"}
    silent = case.plain(x)  # transformers runs, with 1-D rotary positions: other logits, no error
    assert not torch.allclose(silent.logits, case.plain(case.x).logits)
    with pytest.raises(vs.InputError, match="no mm_token_type_ids: Qwen2.5-VL would silently fall back"):
        case.m.run(x)
    with pytest.raises(vs.InputError, match="mm_token_type_ids"):
        family("qwen2_vl").m.run({k: v for k, v in family("qwen2_vl").x.items() if k != "mm_token_type_ids"})


def test_qwen_mm_token_type_ids_must_mark_the_image_tokens(family):
    case = family("qwen2_5_vl")
    x = dict(case.x)
    x["mm_token_type_ids"] = torch.zeros_like(x["mm_token_type_ids"])
    with pytest.raises(vs.InputError, match="1 exactly on the image tokens"):
        case.m.run(x)


def test_qwen_video_is_not_supported_yet_and_says_what_is(family):
    case = family("qwen2_vl")
    x = {**case.x, "pixel_values_videos": torch.zeros(8, 1176), "video_grid_thw": torch.tensor([[2, 2, 2]])}
    with pytest.raises(vs.InputError, match=r"video inputs \(pixel_values_videos, video_grid_thw\) are not "
                                            r"supported yet .* images are, one or several per example"):
        case.m.run(x)


def test_qwen_image_token_count_must_match_the_grid(family):
    case = family("qwen2_vl")
    x = {**case.x, "image_grid_thw": torch.tensor([[1, 4, 4], [1, 4, 4]])}
    with pytest.raises(vs.InputError, match=r"10 image tokens but their images take 8"):
        case.m.run(x)


@pytest.mark.parametrize("name", ["blip2", "instructblip"])
def test_blip2_image_token_count_is_checked(family, name):
    case = family(name)
    x = dict(case.x)
    ids = x["input_ids"].clone()
    ids[0, 0] = 5  # one image token too few: transformers leaves it unfilled, silently
    x["input_ids"] = ids
    if name == "blip2":
        case.plain(x)  # no error from transformers
    with pytest.raises(vs.InputError, match=r"2 image\(s\) but 7 image tokens.*num_query_tokens=4"):
        case.m.run(x)


def test_instructblip_needs_the_instruction(family):
    case = family("instructblip")
    x = {k: v for k, v in case.x.items() if not k.startswith("qformer_")}
    with pytest.raises(vs.InputError, match="qformer_input_ids"):
        case.m.run(x)


def test_llava_next_needs_image_sizes(family):
    case = family("llava_next")
    x = {k: v for k, v in case.x.items() if k != "image_sizes"}
    with pytest.raises(vs.InputError, match="image_sizes"):
        case.m.run(x)
    with pytest.raises(vs.InputError, match=r"hold 38 image tokens but their images take 48"):
        case.m.run({**case.x, "image_sizes": torch.tensor([[56, 56], [56, 56]])})


def test_idefics3_pixel_values_must_be_5d_and_match_the_tiles(family):
    case = family("idefics3")
    with pytest.raises(vs.InputError, match="must be 5-D"):
        case.m.run({**case.x, "pixel_values": case.x["pixel_values"][0]})
    pixels = case.x["pixel_values"].clone()
    pixels[0, 4] = 0  # the global tile of row 0 becomes padding
    with pytest.raises(vs.InputError, match="5 real tiles"):
        case.m.run({**case.x, "pixel_values": pixels})


def test_paligemma_without_token_type_ids(family):
    """Without token_type_ids the whole input is PaliGemma's bidirectional prefix, but transformers
    turns causal as soon as the batch is padded: refused when padded, bidirectional otherwise."""
    case = family("paligemma")
    padded = {k: v for k, v in case.x.items() if k != "token_type_ids"}
    with pytest.raises(vs.InputError, match="padded PaliGemma inputs need token_type_ids"):
        case.m.run(padded)
    x = T.paligemma_inputs(case.model, prefix_lens=(2, 2), suffix_lens=(2, 2))
    x = {k: v for k, v in x.items() if k not in ("token_type_ids", "attention_mask")}
    pos = case.m.positions(x)["lm"]
    assert (pos.extra["prefix"] == 1).all()
    t = x["input_ids"].shape[1]
    blocked = pos.select("last")[:, :, None] & pos.select("image")[:, None, :]
    ref = case.plain({**x, "attention_mask": (~blocked)[:, None]})  # bidirectional, less the knocked edges
    torch.testing.assert_close(case.m.run(x, [vs.knockout("image", "last")]).logits, ref.logits)
    assert t == 16 + 1 + 2 + 1 + 2


def test_paligemma_image_count(family):
    case = family("paligemma")
    with pytest.raises(vs.InputError, match=r"1 image\(s\) but 32 image tokens"):
        case.m.run({**case.x, "pixel_values": case.x["pixel_values"][:1]})


def test_a_partial_image_is_named():
    model = T.tiny_llava()
    m = vs.load(model)
    x = T.llava_inputs(model)
    x["input_ids"][1, 4] = 7  # row 1 now holds 3 of its 4 image tokens
    with pytest.raises(vs.InputError, match="row 1 ends inside image 1"):
        m.positions(x)
