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
               text_layers: int = 2, strategy: str = "default", image_token: int = IMAGE_TOKEN):
    """A LlavaForConditionalGeneration with a 2-layer CLIP tower and a 2-layer Llama (GQA)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
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


def llava_inputs(model, batch: int = 2, text_len: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """Processor-free LLaVA inputs: [bos] + image tokens + random text ids, one image per row."""
    cfg = model.config
    g = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
    g += cfg.vision_feature_select_strategy == "full"
    gen = torch.Generator().manual_seed(seed)
    text = torch.randint(3, 90, (batch, text_len), generator=gen)
    ids = torch.cat([torch.ones(batch, 1, dtype=torch.long), torch.full((batch, g), IMAGE_TOKEN), text], dim=1)
    size = cfg.vision_config.image_size
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "pixel_values": torch.randn(batch, 3, size, size, generator=gen)}


def clip_inputs(model, n_images: int = 2, n_texts: int = 3, text_len: int = 6, seed: int = 0):
    """Processor-free CLIP inputs: bos + random ids + eos per text, random pixels per image."""
    tc, vc = model.config.text_config, model.config.vision_config
    gen = torch.Generator().manual_seed(seed)
    body = torch.randint(4, 120, (n_texts, text_len - 2), generator=gen)
    ids = torch.cat([torch.full((n_texts, 1), tc.bos_token_id), body, torch.full((n_texts, 1), tc.eos_token_id)], 1)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "pixel_values": torch.randn(n_images, 3, vc.image_size, vc.image_size, generator=gen)}


def word_processor(words: list[str], image_size: int = 28, patch_size: int = 14):
    """A real LlavaProcessor over a word-level tokenizer (built offline with `tokenizers`)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import CLIPImageProcessorPil, LlavaProcessor, PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
    vocab = {w: i for i, w in enumerate(specials + [w for w in words if w not in specials])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", extra_special_tokens={"image_token": "<image>"})
    ip = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                               crop_size={"height": image_size, "width": image_size})
    return LlavaProcessor(image_processor=ip, tokenizer=fast, patch_size=patch_size,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1)
