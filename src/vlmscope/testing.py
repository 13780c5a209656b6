"""Tiny random-initialised models of the real transformers classes, for tests and examples.

Each builder is seeded, builds in milliseconds and needs no download; dimensions follow the
configurations measured to work in transformers 5.x (see docs/adapters.md).
"""

from __future__ import annotations

import torch

IMAGE_TOKEN = 100


def _seeded(seed: int):
    torch.manual_seed(seed)


def tiny_llava(seed: int = 0, image_size: int = 28, patch_size: int = 14, text_hidden: int = 64,
               text_layers: int = 2, strategy: str = "default", image_token: int = IMAGE_TOKEN,
               vision: str = "clip"):
    """A LlavaForConditionalGeneration with a 2-layer CLIP (or, vision="siglip", SigLIP) tower and a
    2-layer Llama (GQA)."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        SiglipVisionConfig,
    )

    tower = CLIPVisionConfig if vision == "clip" else SiglipVisionConfig
    cfg = LlavaConfig(
        vision_config=tower(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, image_size=image_size, patch_size=patch_size),
        text_config=LlamaConfig(hidden_size=text_hidden, intermediate_size=2 * text_hidden,
                                num_hidden_layers=text_layers, num_attention_heads=4, num_key_value_heads=2,
                                vocab_size=128, bos_token_id=1, eos_token_id=2, pad_token_id=0),
        image_token_index=image_token, vision_feature_layer=-2, vision_feature_select_strategy=strategy,
    )
    _seeded(seed)
    return LlavaForConditionalGeneration(cfg).eval()


def tiny_clip(seed: int = 0, image_size: int = 28, patch_size: int = 14):
    """A CLIPModel with 2-layer vision and text towers; EOS id 3 (not the legacy 2)."""
    from transformers import CLIPConfig, CLIPModel

    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=128, max_position_embeddings=16, eos_token_id=3, bos_token_id=2,
                         pad_token_id=1, **tower),
        vision_config=dict(image_size=image_size, patch_size=patch_size, **tower),
        projection_dim=16,
    )
    _seeded(seed)
    return CLIPModel(cfg).eval()


def _noise(shape, gen: torch.Generator, device: str | None) -> torch.Tensor:
    """Random pixels, or (device="meta") a tensor with only a shape, for full-size models on meta."""
    return torch.empty(shape, device="meta") if device == "meta" else torch.randn(shape, generator=gen)


def llava_inputs(model, batch: int = 2, text_len: int = 4, seed: int = 0, device: str | None = None
                 ) -> dict[str, torch.Tensor]:
    """Processor-free LLaVA inputs: [bos] + image tokens + random text ids, one image per row."""
    cfg = model.config
    g = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
    g += cfg.vision_config.model_type == "clip_vision_model"  # a CLS token
    g -= cfg.vision_feature_select_strategy == "default"  # drops the first token
    gen = torch.Generator().manual_seed(seed)
    text = torch.randint(3, 90, (batch, text_len), generator=gen)
    image = torch.full((batch, g), cfg.image_token_id)
    ids = torch.cat([torch.ones(batch, 1, dtype=torch.long), image, text], dim=1)
    size = cfg.vision_config.image_size
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "pixel_values": _noise((batch, 3, size, size), gen, device)}


def clip_inputs(model, n_images: int = 2, n_texts: int = 3, text_len: int = 6, seed: int = 0,
                device: str | None = None):
    """Processor-free CLIP inputs: bos + random ids + eos per text, random pixels per image."""
    tc, vc = model.config.text_config, model.config.vision_config
    gen = torch.Generator().manual_seed(seed)
    body = torch.randint(4, 120, (n_texts, text_len - 2), generator=gen)
    bos, eos = torch.full((n_texts, 1), tc.bos_token_id), torch.full((n_texts, 1), tc.eos_token_id)
    ids = torch.cat([bos, body, eos], 1)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "pixel_values": _noise((n_images, 3, vc.image_size, vc.image_size), gen, device)}


def word_processor(words: list[str], image_size: int = 28, patch_size: int = 14):
    """A real LlavaProcessor over a word-level tokenizer (built offline with `tokenizers`)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import CLIPImageProcessorPil, LlavaProcessor, PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
    vocab = {w: i for i, w in enumerate(specials + [w for w in words if w not in specials])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                       special_tokens=[("<s>", vocab["<s>"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", extra_special_tokens={"image_token": "<image>"})
    ip = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                               crop_size={"height": image_size, "width": image_size})
    return LlavaProcessor(image_processor=ip, tokenizer=fast, patch_size=patch_size,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1)


# --- the other families --------------------------------------------------------------------------
# Shared tiny dimensions (see ../shared/notes/transformers-vlm-classes.md): text hidden 64, 2 layers,
# 4 heads (2 KV heads), vocabulary 128; vision hidden 32, 2 layers, 4 heads; image token id 100.

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)
QWEN_IDS = dict(image_token_id=IMAGE_TOKEN, video_token_id=101, vision_start_token_id=102,
                vision_end_token_id=103)
IDEFICS_FAKE, IDEFICS_GLOBAL, IDEFICS_NEWLINE = 101, 102, 10  # <fake_token_around_image>, <global-img>, "\n"


def _ids(rows: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token rows into (input_ids, attention_mask)."""
    n = max(len(r) for r in rows)
    ids = torch.full((len(rows), n), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), n, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, :len(r)] = torch.tensor(r)
        mask[b, :len(r)] = 1
    return ids, mask


def _words(gen: torch.Generator, n: int, lo: int = 3, hi: int = 90) -> list[int]:
    return torch.randint(lo, hi, (n,), generator=gen).tolist()


def tiny_llava_next(seed: int = 0, lm: str = "mistral", strategy: str = "default"):
    """A LlavaNextForConditionalGeneration: CLIP tower (28/p14, 2x2 patches per tile), tiles from the
    pinpoints [[28,56],[56,28],[56,56]], and a Mistral (or Llama, lm="llama") LM."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        MistralConfig,
    )

    text = (MistralConfig if lm == "mistral" else LlamaConfig)(**TEXT)
    cfg = LlavaNextConfig(vision_config=CLIPVisionConfig(image_size=28, patch_size=14, **VISION),
                          text_config=text, image_token_index=IMAGE_TOKEN,
                          image_grid_pinpoints=[[28, 56], [56, 28], [56, 56]],
                          vision_feature_layer=-2, vision_feature_select_strategy=strategy)
    _seeded(seed)
    return LlavaNextForConditionalGeneration(cfg).eval()


def llava_next_token_count(cfg, size: tuple[int, int]) -> int:
    """Image tokens of one (height, width) image: the base tile, the unpadded tile grid and one
    newline per grid row (transformers' own `get_anyres_image_grid_shape` and `unpad_image`)."""
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

    g = cfg.vision_config.image_size // cfg.vision_config.patch_size
    base = g * g + (cfg.vision_feature_select_strategy == "full")
    s = cfg.vision_config.image_size
    tiles_h, tiles_w = get_anyres_image_grid_shape(list(size), cfg.image_grid_pinpoints, s)
    rows, cols = unpad_image(torch.empty(1, tiles_h * g, tiles_w * g, device="meta"), list(size)).shape[1:]
    return base + rows * (cols + 1)


def llava_next_inputs(model, sizes=((56, 56), (30, 56)), text_len: int = 4, seed: int = 0,
                      device: str | None = None):
    """Processor-free LLaVA-NeXT inputs, one image of each (height, width) per row: [bos] + image
    tokens + text, right-padded; pixel_values (images, max_tiles, 3, S, S)."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    cfg = model.config
    gen = torch.Generator().manual_seed(seed)
    rows = [[1] + [cfg.image_token_id] * llava_next_token_count(cfg, z) + _words(gen, text_len)
            for z in sizes]
    ids, mask = _ids(rows)
    s = cfg.vision_config.image_size
    tiles = max(image_size_to_num_patches(list(z), cfg.image_grid_pinpoints, s) for z in sizes)
    return {"input_ids": ids, "attention_mask": mask, "image_sizes": torch.tensor(sizes),
            "pixel_values": _noise((len(sizes), tiles, 3, s, s), gen, device)}


def tiny_qwen2_vl(seed: int = 0, version: str = "2"):
    """A Qwen2VLForConditionalGeneration (version "2") or Qwen2_5_VLForConditionalGeneration ("2.5",
    windowed vision attention in block 0, full in block 1; window 56 px = 2x2 merged tokens)."""
    import transformers

    rope = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}
    text = dict(TEXT, rope_parameters=rope, bos_token_id=None)
    if version == "2":
        vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2)
        cls, config = transformers.Qwen2VLForConditionalGeneration, transformers.Qwen2VLConfig
    else:
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, out_hidden_size=64, num_heads=4,
                      window_size=56, fullatt_block_indexes=[1])
        cls, config = transformers.Qwen2_5_VLForConditionalGeneration, transformers.Qwen2_5_VLConfig
    _seeded(seed)
    return cls(config(text_config=text, vision_config=vision, **QWEN_IDS)).eval()


def qwen_inputs(model, grids=(((1, 4, 4),), ((1, 4, 6),)), text_len: int = 3, seed: int = 0,
                device: str | None = None):
    """Processor-free Qwen2(.5)-VL inputs: per row, text, then for each of its images (t, h, w)
    <vision_start> + t*h*w/merge^2 image tokens + <vision_end>, then text; flattened patches
    (sum t*h*w, 3*2*p*p), image_grid_thw and mm_token_type_ids (1 on image tokens)."""
    cfg = model.config
    merge = cfg.vision_config.spatial_merge_size
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for images in grids:
        row = _words(gen, 2)
        for t, h, w in images:
            image = [cfg.image_token_id] * (t * h * w // merge**2)
            row += [cfg.vision_start_token_id] + image + [cfg.vision_end_token_id]
        rows.append(row + _words(gen, text_len))
    ids, mask = _ids(rows)
    thw = torch.tensor([g for images in grids for g in images])
    vc = cfg.vision_config
    width = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
    return {"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": (ids == cfg.image_token_id).long(),
            "image_grid_thw": thw, "pixel_values": _noise((int(thw.prod(-1).sum()), width), gen, device)}


def tiny_idefics3(seed: int = 0):
    """An Idefics3ForConditionalGeneration (SmolVLM's layout): SigLIP-style tower on 32/p8 tiles,
    pixel-shuffle scale 2 (4 tokens per tile), Llama LM."""
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration

    cfg = Idefics3Config(vision_config=dict(image_size=32, patch_size=8, **VISION),
                         text_config=dict(model_type="llama", **TEXT), scale_factor=2,
                         image_token_id=IMAGE_TOKEN)
    _seeded(seed)
    return Idefics3ForConditionalGeneration(cfg).eval()


def idefics3_image_tokens(per_tile: int, rows: int, cols: int, image_id: int = IMAGE_TOKEN) -> list[int]:
    """The processor's token layout of one image split into rows x cols sub-images plus the global
    image (rows = cols = 0: the global image alone); row/column tags are ids 104 + 6*r + c."""
    fake, glob, nl = IDEFICS_FAKE, IDEFICS_GLOBAL, IDEFICS_NEWLINE
    out: list[int] = []
    for r in range(rows):
        for c in range(cols):
            out += [fake, 104 + 6 * r + c] + [image_id] * per_tile
        out.append(nl)
    if rows:
        out.append(nl)
    return out + [fake, glob] + [image_id] * per_tile + [fake]


def idefics3_inputs(model, splits=(((2, 2),), ((0, 0),)), text_len: int = 3, seed: int = 0,
                    device: str | None = None):
    """Processor-free Idefics3 inputs: per row, [bos] + each image's tiles (see idefics3_image_tokens)
    + text; pixel_values (batch, max_tiles, 3, S, S) with all-zero padding tiles."""
    cfg = model.config
    s, p = cfg.vision_config.image_size, cfg.vision_config.patch_size
    per_tile = (s // p) ** 2 // cfg.scale_factor**2
    gen = torch.Generator().manual_seed(seed)
    rows, n_tiles = [], []
    for images in splits:
        row = [1]
        for r, c in images:
            row += idefics3_image_tokens(per_tile, r, c, cfg.image_token_id)
        rows.append(row + _words(gen, text_len, hi=10))
        n_tiles.append(sum(r * c + 1 for r, c in images))
    ids, mask = _ids(rows)
    if device == "meta":
        return {"input_ids": ids, "attention_mask": mask,
                "pixel_values": _noise((len(splits), max(n_tiles), 3, s, s), gen, device)}
    pixels = torch.zeros(len(splits), max(n_tiles), 3, s, s)
    for b, n in enumerate(n_tiles):
        pixels[b, :n] = torch.randn(n, 3, s, s, generator=gen)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}


def tiny_paligemma(seed: int = 0):
    """A PaliGemmaForConditionalGeneration: SigLIP tower (32/p8, 16 image tokens), Gemma LM."""
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration

    text = dict(TEXT, model_type="gemma", head_dim=16, num_key_value_heads=1, bos_token_id=2, eos_token_id=1)
    cfg = PaliGemmaConfig(vision_config=dict(model_type="siglip_vision_model", image_size=32, patch_size=8,
                                             vision_use_head=False, **VISION),
                          text_config=text, projection_dim=64, hidden_size=64, image_token_id=IMAGE_TOKEN)
    _seeded(seed)
    return PaliGemmaForConditionalGeneration(cfg).eval()


def paligemma_inputs(model, prefix_lens=(3, 1), suffix_lens=(2, 3), seed: int = 0, device: str | None = None):
    """Processor-free PaliGemma inputs: image tokens, [bos], prompt, "\\n" (the bidirectional prefix,
    token_type_ids 0), then the suffix (token_type_ids 1); right-padded."""
    cfg = model.config
    n_img = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
    gen = torch.Generator().manual_seed(seed)
    rows, types = [], []
    for pre, suf in zip(prefix_lens, suffix_lens, strict=True):
        prefix = [cfg.image_token_id] * n_img + [2] + _words(gen, pre) + [108]
        rows.append(prefix + _words(gen, suf))
        types.append([0] * len(prefix) + [1] * suf)
    ids, mask = _ids(rows)
    tt, _ = _ids(types, pad=1)
    s = cfg.vision_config.image_size
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": tt,
            "pixel_values": _noise((len(rows), 3, s, s), gen, device)}


def tiny_blip2(seed: int = 0, instruct: bool = False):
    """A Blip2ForConditionalGeneration (OPT LM) or, with instruct=True, an
    InstructBlipForConditionalGeneration (Llama LM); 4 query tokens, a 2-layer Q-Former with
    cross-attention in every layer."""
    import transformers

    qformer = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                   vocab_size=64, cross_attention_frequency=1, encoder_hidden_size=32)
    vision = dict(VISION, image_size=28, patch_size=14)
    if instruct:
        text = dict(TEXT, model_type="llama")
        cls, config = transformers.InstructBlipForConditionalGeneration, transformers.InstructBlipConfig
    else:
        text = dict(model_type="opt", hidden_size=64, ffn_dim=128, word_embed_proj_dim=64,
                    num_hidden_layers=2, num_attention_heads=4, vocab_size=128, bos_token_id=2,
                    eos_token_id=2, pad_token_id=1)
        cls, config = transformers.Blip2ForConditionalGeneration, transformers.Blip2Config
    cfg = config(vision_config=vision, qformer_config=qformer, text_config=text, num_query_tokens=4,
                 image_token_index=IMAGE_TOKEN)
    _seeded(seed)
    return cls(cfg).eval()


def blip2_inputs(model, batch: int = 2, text_lens=(4, 2), seed: int = 0, device: str | None = None):
    """Processor-free BLIP-2 / InstructBLIP inputs: num_query_tokens image tokens, [bos], text
    (right-padded); InstructBLIP also gets the instruction as qformer_input_ids."""
    cfg = model.config
    gen = torch.Generator().manual_seed(seed)
    bos, pad = cfg.text_config.bos_token_id, cfg.text_config.pad_token_id or 0
    rows = [[cfg.image_token_id] * cfg.num_query_tokens + [bos] + _words(gen, n) for n in text_lens[:batch]]
    ids, mask = _ids(rows, pad=pad)
    s = cfg.vision_config.image_size
    out = {"input_ids": ids, "attention_mask": mask, "pixel_values": _noise((batch, 3, s, s), gen, device)}
    if type(model).__name__.startswith("InstructBlip"):
        q_ids, q_mask = _ids([[1] + _words(gen, n, hi=60) for n in (4, 2)[:batch]])
        out.update(qformer_input_ids=q_ids, qformer_attention_mask=q_mask)
    return out


def tiny_siglip(seed: int = 0):
    """A SiglipModel with 2-layer towers (32/p8 images, texts padded to 16 tokens, EOS id 2)."""
    from transformers import SiglipConfig, SiglipModel

    cfg = SiglipConfig(text_config=dict(vocab_size=128, max_position_embeddings=16, eos_token_id=2,
                                        bos_token_id=None, pad_token_id=1, **VISION),
                       vision_config=dict(image_size=32, patch_size=8, **VISION))
    _seeded(seed)
    return SiglipModel(cfg).eval()


def siglip_inputs(model, n_images: int = 2, text_lens=(5, 8, 3), seed: int = 0, device: str | None = None):
    """Processor-free SigLIP inputs: random ids + EOS, padded to max_position_embeddings as the
    processor does (SigLIP pools the last position)."""
    tc, vc = model.config.text_config, model.config.vision_config
    gen = torch.Generator().manual_seed(seed)
    ids = torch.full((len(text_lens), tc.max_position_embeddings), tc.pad_token_id)
    for b, n in enumerate(text_lens):
        ids[b, :n + 1] = torch.tensor(_words(gen, n, lo=4, hi=120) + [tc.eos_token_id])
    pixels = _noise((n_images, 3, vc.image_size, vc.image_size), gen, device)
    return {"input_ids": ids, "pixel_values": pixels}
