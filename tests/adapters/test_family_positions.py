"""Typed positions match the grid each family's config, image_grid_thw or image sizes imply, checked
against transformers' own packing code, the processors, and coordinate-coded activations."""

import numpy as np
import pytest
import torch
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

import vlmscope as vs
from vlmscope import testing as T
from vlmscope.model.positions import IMAGE, SPECIAL


def test_llava_on_siglip_has_no_cls_and_default_strategy_drops_the_first_patch():
    for strategy, first in (("full", 0), ("default", 1)):
        model = T.tiny_llava(vision="siglip", strategy=strategy, image_size=32, patch_size=8)
        m = vs.load(model)
        x = T.llava_inputs(model)
        pos = m.positions(x)
        assert pos["vision"].shape == (2, 16) and pos["vision"].roles(0) == ["image"] * 16
        lm = pos["lm"]
        img = x["input_ids"][0] == T.IMAGE_TOKEN
        k = torch.arange(first, 16)
        assert torch.equal(lm.row[0, img], k // 4) and torch.equal(lm.col[0, img], k % 4)
        assert pos["connector"].shape == (2, 16 - first)


def test_llava_next_positions_follow_transformers_packing(family):
    """Coordinate-coded features through LlavaNextModel.pack_image_features (transformers' own
    tiling, unpadding and newlines) land where the LM positions say."""
    case = family("llava_next")
    model, m, x = case.model, case.m, case.x
    cfg = model.config
    g = cfg.vision_config.image_size // cfg.vision_config.patch_size
    feats = []
    for size in x["image_sizes"].tolist():
        n = image_size_to_num_patches(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
        k = torch.arange(g * g)
        tile = torch.arange(n)[:, None].expand(n, g * g)
        feats.append(torch.stack([tile, (k // g).expand(n, -1), (k % g).expand(n, -1)], -1).float())
    packed, _ = model.model.pack_image_features(feats, x["image_sizes"], "default",
                                                image_newline=torch.full((3,), -1.0))
    ref = torch.cat(packed).long()  # (image tokens, 3): tile, row, col; -1 on newlines
    lm = m.positions(x)["lm"]
    img = x["input_ids"] == T.IMAGE_TOKEN
    newline = lm.extra["newline"][img] == 1
    assert torch.equal(newline, ref[:, 0] == -1)
    assert (lm.role[img][newline] == SPECIAL).all() and (lm.role[img][~newline] == IMAGE).all()
    for j, field in enumerate((lm.tile, lm.row, lm.col)):
        assert torch.equal(field[img][~newline], ref[~newline, j])
    # the grid part covers the unpadded image once, in raster order
    for b in range(2):
        grid = img[b] & (lm.tile[b] > 0)
        r, c = lm.extra["orig_row"][b, grid], lm.extra["orig_col"][b, grid]
        h, w = int(r.max()) + 1, int(c.max()) + 1
        assert torch.equal(r * w + c, torch.arange(h * w))
    vision = m.positions(x)["vision"]
    assert vision.shape == (5 + 5, 5)  # 56x56 and 30x56 both take the 2x2 pinpoint: base + 4 tiles of CLS + 4
    assert vision.tile[:, 1].tolist() == [0, 1, 2, 3, 4] * 2 and vision.example.tolist() == [0] * 5 + [1] * 5


def _coded_image(h: int, w: int, patch: int = 14) -> np.ndarray:
    """An image whose every patch is flat: red = patch row, green = patch column (x 20)."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([(y // patch) * 20, (x // patch) * 20, np.full_like(y, 128)], -1).astype("uint8")


def _decode(codes: torch.Tensor) -> torch.Tensor:
    return torch.unique(codes, return_inverse=True)[1]  # codes rise with the coordinate


@pytest.mark.parametrize("version", ["2", "2.5"])
def test_qwen_positions_follow_the_processor_and_the_models_window_order(version):
    """Pixels coded by patch row/column go through Qwen2VLImageProcessorPil and a model whose
    patch embedding passes the code on; the ViT's input (vision.embed, in the model's own order:
    Qwen2.5-VL's attention windows) decodes to the positions vlmscope gives."""
    from PIL import Image
    from transformers import Qwen2VLImageProcessorPil

    model = T.tiny_qwen2_vl(version=version)
    with torch.no_grad():
        w = model.model.visual.patch_embed.proj.weight  # (d, 3, 2, 14, 14)
        w.zero_()
        w[0, 0], w[1, 1] = 1.0, 1.0  # embed[:, 0] = sum of red, embed[:, 1] = sum of green
    m = vs.load(model)
    sizes = [(56, 56), (56, 84), (84, 56)]  # 4x4, 4x6, 6x4 patches
    ip = Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=112 * 112)
    pixels = ip(images=[Image.fromarray(_coded_image(*s)) for s in sizes], return_tensors="pt")
    thw = [tuple(g) for g in pixels["image_grid_thw"].tolist()]
    grids = [thw[:2], thw[2:]]
    x = T.qwen_inputs(model, grids=grids)
    x["pixel_values"] = pixels["pixel_values"]
    _, c = m.run_with_cache(x, ["vision.embed", "connector.out"])
    pos = m.positions(x)
    vision = pos["vision"]
    assert vision.shape == (1, 16 + 24 + 24)  # every patch of the batch, packed
    embed = c["vision.embed"][0]
    assert torch.equal(vision.row[0], _decode(embed[:, 0]))
    assert torch.equal(vision.col[0], _decode(embed[:, 1]))
    assert vision.extra["example"][0].tolist() == [0] * 40 + [1] * 24
    owners = zip(vision.extra["example"][0].tolist(), vision.image[0].tolist(), strict=True)
    assert sorted(set(owners)) == [(0, 0), (0, 1), (1, 0)]
    # the LM sees one token per 2x2 patches, in raster order of each image's merged grid
    lm = pos["lm"]
    img = x["input_ids"] == T.IMAGE_TOKEN
    for b, rows in ((0, [(2, 2), (2, 3)]), (1, [(3, 2)])):
        k = [torch.arange(h * w) for h, w in rows]
        ref = torch.cat([torch.stack([k_ // w, k_ % w]) for k_, (_, w) in zip(k, rows, strict=True)], 1)
        assert torch.equal(torch.stack([lm.row[b, img[b]], lm.col[b, img[b]]]), ref)
    conn = pos["connector"]
    assert conn.shape == (1, 16) and torch.equal(conn.row[0], vision.row[0, ::4] // 2)
    if version == "2.5":  # windows of 56 px = 2x2 merged tokens, each a block of the merged grid
        for k in conn.extra["window"][0].unique():
            sel = conn.extra["window"][0] == k
            where = zip(conn.extra["example"][0, sel], conn.image[0, sel], conn.row[0, sel], conn.col[0, sel],
                        strict=True)
            assert len({(int(e), int(i), int(r) // 2, int(cc) // 2) for e, i, r, cc in where}) == 1
        window = vision.extra["window"][0]
        assert (window.diff() >= 0).all()  # the stream runs window by window
        assert len(window.unique()) == 1 + 2 + 2


def test_idefics3_tiles_follow_the_processors_layout_and_the_pixel_shuffle():
    model = T.tiny_idefics3()
    m = vs.load(model)
    splits = (((2, 2), (0, 0)), ((3, 1),))  # row 0: a 2x2-split image, then an unsplit one; row 1: 3x1
    x = T.idefics3_inputs(model, splits=splits)
    pos = m.positions(x)
    lm = pos["lm"]
    img = x["input_ids"] == T.IMAGE_TOKEN
    per_tile = 4
    tiles = lm.tile[img].view(-1, per_tile)[:, 0].tolist()
    assert tiles == [0, 1, 2, 3, 4, 0, 0, 1, 2, 3]
    tr = lm.extra["tile_row"][img].view(-1, per_tile)[:, 0]
    tc = lm.extra["tile_col"][img].view(-1, per_tile)[:, 0]
    assert list(zip(tr.tolist(), tc.tolist(), strict=True)) == [
        (0, 0), (0, 1), (1, 0), (1, 1), (-1, -1), (-1, -1), (0, 0), (1, 0), (2, 0), (-1, -1)]
    assert lm.image[img].view(-1, per_tile)[:, 0].tolist() == [0] * 5 + [1] + [0] * 4
    # a sub-image's token lies in the whole split image at tile offset + place in the tile
    first = img[0] & (lm.tile[0] == 3)
    assert lm.extra["orig_row"][0, first].tolist() == [2, 2, 3, 3]
    assert lm.extra["orig_col"][0, first].tolist() == [2, 3, 2, 3]
    # the framing tokens are typed special, the newlines stay text
    assert (lm.role[0, :3] == torch.tensor([SPECIAL, SPECIAL, SPECIAL])).all()
    # connector tokens: transformers' pixel shuffle merges exactly the 2x2 patches the positions name
    g = 4
    k = torch.arange(g * g)
    coded = torch.stack([k // g, k % g], -1).float()[None]  # (1, patches, 2)
    shuffled = model.model.connector.pixel_shuffle(coded, 2)[0]  # (tokens, 2 * 4)
    conn = pos["connector"]
    assert torch.equal(conn.row[0], shuffled[:, 0::2].min(1).values.long() // 2)
    assert torch.equal(conn.col[0], shuffled[:, 1::2].min(1).values.long() // 2)
    assert pos["vision"].shape == (10, 16) and pos["vision"].example.tolist() == [0] * 6 + [1] * 4
    real = (x["pixel_values"].flatten(2) != 0).any(-1).sum()
    assert int(real) == 10


def test_paligemma_prefix_and_image_grid(family):
    case = family("paligemma")
    lm = case.m.positions(case.x)["lm"]
    img = case.x["input_ids"] == T.IMAGE_TOKEN
    assert torch.equal(img[:, :16], torch.ones(2, 16, dtype=torch.bool))
    assert torch.equal(lm.row[0, :16], torch.arange(16) // 4)
    assert torch.equal(lm.col[0, :16], torch.arange(16) % 4)
    valid = case.x["attention_mask"].bool()
    assert torch.equal(lm.extra["prefix"][valid], (case.x["token_type_ids"][valid] == 0).long())
    assert (lm.extra["prefix"][~valid] == -1).all()


@pytest.mark.parametrize("name", ["blip2", "instructblip"])
def test_blip2_query_tokens_are_image_positions_without_a_grid(family, name):
    case = family(name)
    pos = case.m.positions(case.x)
    lm = pos["lm"]
    img = case.x["input_ids"] == T.IMAGE_TOKEN
    assert torch.equal(lm.select("image"), img) and lm.grid is None
    assert (lm.row[img] == -1).all() and (lm.col[img] == -1).all()
    assert lm.extra["query"][img].tolist() == [0, 1, 2, 3] * 2
    assert pos["connector"].shape == (2, 4) and pos["vision"].shape == (2, 5)
    q = pos["qformer"]
    if name == "instructblip":
        assert q.shape == (2, 4 + 5)
        assert q.roles(1)[4:] == ["text", "text", "text", "pad", "pad"]  # instruction of 3 tokens, padded
    else:
        assert q.shape == (2, 4) and q.roles(0) == ["image"] * 4


@pytest.mark.parametrize("name,cls", [("siglip", False), ("clip", True)])
def test_dual_encoder_vision_grid(family, name, cls):
    case = family(name)
    vision = case.m.positions(case.x)["vision"]
    g = case.model.config.vision_config.image_size // case.model.config.vision_config.patch_size
    assert vision.shape == (2, g * g + cls) and vision.grid == (g, g)
    assert vision.roles(0)[0] == ("special" if cls else "image")
    assert torch.equal(vision.row[0, int(cls):], torch.arange(g * g) // g)


def test_stored_rows_of_a_packed_stream_name_their_example(tmp_path):
    """The activation store indexes each row by (example, position); in Qwen's packed vision
    stream the example comes from each position, not from the (single) row."""
    model = T.tiny_qwen2_vl()
    m = vs.load(model)
    x = T.qwen_inputs(model)
    store = m.cache_dataset([0], ["vision.blocks.1.resid_post", "lm.blocks.1.resid_post"], tmp_path,
                            batch_size=1, collate=lambda _: x, progress=False)
    acts, index = store.load("vision.blocks.1.resid_post")
    _, c = m.run_with_cache(x, "vision.blocks.1.resid_post")
    assert torch.equal(acts, c["vision.blocks.1.resid_post"][0])
    assert index[:, 0].tolist() == [0] * 16 + [1] * 24 and index[:, 1].tolist() == list(range(40))


def test_llava_next_two_images_in_one_row(family):
    case = family("llava_next")
    model, m = case.model, case.m
    one = T.llava_next_inputs(model)  # 56x56 (24 tokens) and 30x56 (14 tokens), one per row
    img = model.config.image_token_id
    ids = torch.tensor([[1] + [img] * 24 + [5, 6] + [img] * 14 + [7]])
    x = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "image_sizes": one["image_sizes"],
         "pixel_values": one["pixel_values"]}
    out, _ = m.run_with_cache(x, "lm.blocks.1.resid_post")
    assert torch.equal(out.logits, case.plain(x).logits)
    lm = m.positions(x)["lm"]
    assert lm.image[0, 1:25].unique().tolist() == [0] and lm.image[0, 27:41].unique().tolist() == [1]
    assert m.positions(x)["vision"].example.tolist() == [0] * 10
