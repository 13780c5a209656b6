"""Each family at the full size of a well-known checkpoint, built on the meta device (no memory):
the parameter count matches the published size within 2%, and vlmscope lists the sites, their
shapes and the positions of one 336x336 image without running (or allocating) the model.

The configs are written out here from the checkpoints' config.json (no hub access); transformers'
default configs are not these checkpoints (Qwen2VLConfig() alone builds 73 B parameters).
"""

import pytest
import torch
import transformers as tf

import vlmscope as vs
from vlmscope import testing as T

CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
SO400M = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
              patch_size=14)
LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5)
EVA_G = dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16,
             image_size=224, patch_size=14, qkv_bias=True)
QFORMER_BASE = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                    cross_attention_frequency=2, encoder_hidden_size=1408)
QWEN2_7B_TEXT = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                     num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768,
                     rms_norm_eps=1e-6,
                     rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                      "mrope_section": [16, 24, 24]})
QWEN_IDS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
                vision_end_token_id=151653)


def llava_1_5_7b():  # llava-hf/llava-1.5-7b-hf
    cfg = tf.LlavaConfig(vision_config=tf.CLIPVisionConfig(**CLIP_L_336),
                         text_config=tf.LlamaConfig(vocab_size=32064, **LLAMA_7B),
                         image_token_index=32000, vision_feature_layer=-2,
                         vision_feature_select_strategy="default")
    return tf.LlavaForConditionalGeneration(cfg), lambda m: T.llava_inputs(m, batch=1, device="meta")


def llava_next_mistral_7b():  # llava-hf/llava-v1.6-mistral-7b-hf
    text = tf.MistralConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                            num_attention_heads=32, num_key_value_heads=8, vocab_size=32064,
                            max_position_embeddings=32768,
                            rope_parameters={"rope_type": "default", "rope_theta": 1e6}, sliding_window=None)
    cfg = tf.LlavaNextConfig(vision_config=tf.CLIPVisionConfig(**CLIP_L_336), text_config=text,
                             image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336],
                                                   [336, 1008]],
                             image_token_index=32000, vision_feature_layer=-2)
    return tf.LlavaNextForConditionalGeneration(cfg), lambda m: T.llava_next_inputs(m, sizes=((336, 336),),
                                                                                     device="meta")


def qwen2_vl_7b():  # Qwen/Qwen2-VL-7B-Instruct; the processor keeps a 336x336 image: 24x24 patches
    vision = dict(depth=32, embed_dim=1280, hidden_size=3584, num_heads=16, mlp_ratio=4, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, hidden_act="quick_gelu")
    cfg = tf.Qwen2VLConfig(text_config=QWEN2_7B_TEXT, vision_config=vision, **QWEN_IDS)
    return tf.Qwen2VLForConditionalGeneration(cfg), lambda m: T.qwen_inputs(m, grids=(((1, 24, 24),),),
                                                                             device="meta")


def qwen2_5_vl_7b():  # Qwen/Qwen2.5-VL-7B-Instruct
    vision = dict(depth=32, hidden_size=1280, intermediate_size=3420, out_hidden_size=3584, num_heads=16,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                  fullatt_block_indexes=[7, 15, 23, 31], hidden_act="silu")
    cfg = tf.Qwen2_5_VLConfig(text_config=QWEN2_7B_TEXT, vision_config=vision, **QWEN_IDS)
    return tf.Qwen2_5_VLForConditionalGeneration(cfg), lambda m: T.qwen_inputs(m, grids=(((1, 24, 24),),),
                                                                                device="meta")


def idefics3_8b():  # HuggingFaceM4/Idefics3-8B-Llama3; its processor splits a 336x336 image into 4x4 + global
    text = dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, vocab_size=128259,
                max_position_embeddings=131072, rms_norm_eps=1e-5,
                rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    cfg = tf.Idefics3Config(vision_config=dict(image_size=364, **SO400M), text_config=text, scale_factor=2,
                            image_token_id=128257)
    return tf.Idefics3ForConditionalGeneration(cfg), lambda m: T.idefics3_inputs(m, splits=(((4, 4),),),
                                                                                  device="meta")


def paligemma_3b():  # google/paligemma-3b-pt-224; the processor resizes to 224
    text = dict(model_type="gemma", hidden_size=2048, intermediate_size=16384, num_hidden_layers=18,
                num_attention_heads=8, num_key_value_heads=1, head_dim=256, vocab_size=257216)
    vision = dict(model_type="siglip_vision_model", image_size=224, projection_dim=2048,
                  vision_use_head=False, **SO400M)
    cfg = tf.PaliGemmaConfig(vision_config=vision, text_config=text, projection_dim=2048, hidden_size=2048,
                             image_token_id=257152)
    return tf.PaliGemmaForConditionalGeneration(cfg), lambda m: T.paligemma_inputs(
        m, prefix_lens=(4,), suffix_lens=(2,), device="meta")


def blip2_opt_2_7b():  # Salesforce/blip2-opt-2.7b
    text = dict(model_type="opt", hidden_size=2560, ffn_dim=10240, num_hidden_layers=32,
                num_attention_heads=32, vocab_size=50304, word_embed_proj_dim=2560,
                max_position_embeddings=2048, bos_token_id=2, eos_token_id=50118, pad_token_id=1)
    cfg = tf.Blip2Config(vision_config=EVA_G, qformer_config=dict(vocab_size=30522, **QFORMER_BASE),
                         text_config=text, num_query_tokens=32, image_token_index=50265)
    return tf.Blip2ForConditionalGeneration(cfg), lambda m: T.blip2_inputs(m, batch=1, device="meta")


def instructblip_vicuna_7b():  # Salesforce/instructblip-vicuna-7b
    cfg = tf.InstructBlipConfig(vision_config=EVA_G, qformer_config=dict(vocab_size=30523, **QFORMER_BASE),
                                text_config=dict(model_type="llama", vocab_size=32001, **LLAMA_7B),
                                num_query_tokens=32, image_token_index=32000)
    return tf.InstructBlipForConditionalGeneration(cfg), lambda m: T.blip2_inputs(m, batch=1, device="meta")


def siglip_so400m():  # google/siglip-so400m-patch14-384; the processor resizes to 384
    cfg = tf.SiglipConfig(vision_config=dict(image_size=384, **SO400M),
                          text_config=dict(vocab_size=32000, max_position_embeddings=64, pad_token_id=1,
                                           eos_token_id=1, bos_token_id=None, **SO400M))
    return tf.SiglipModel(cfg), lambda m: T.siglip_inputs(m, n_images=1, text_lens=(7,), device="meta")


def clip_vit_l_336():  # openai/clip-vit-large-patch14-336
    text = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu")
    cfg = tf.CLIPConfig(vision_config=CLIP_L_336, text_config=text, projection_dim=768)
    return tf.CLIPModel(cfg), lambda m: T.clip_inputs(m, n_images=1, n_texts=1, device="meta")


# name: (build, published parameters, image tokens the LM sees (or vision-stream length), expected shapes)
CHECKPOINTS = {
    "llava-1.5-7b": (llava_1_5_7b, 7.06e9, 576, {
        "vision.blocks.23.attn.pattern": (1, 16, 577, 577), "connector.out": (1, 576, 4096),
        "lm.blocks.31.mlp.post": (1, 581, 11008), "lm.logits": (1, 581, 32064)}),
    "llava-v1.6-mistral-7b": (llava_next_mistral_7b, 7.57e9, 576 + 24 * 25, {
        "vision.blocks.0.resid_post": (3, 577, 1024), "connector.out": (3, 576, 4096),
        "lm.blocks.0.attn.z": (1, 1181, 32, 128)}),
    "qwen2-vl-7b": (qwen2_vl_7b, 8.29e9, 144, {
        "vision.blocks.31.attn.pattern": (1, 16, 576, 576), "connector.in": (1, 576, 1280),
        "connector.out": (1, 144, 3584), "lm.blocks.27.mlp.post": (1, 151, 18944)}),
    "qwen2.5-vl-7b": (qwen2_5_vl_7b, 8.29e9, 144, {
        "vision.blocks.0.mlp.post": (1, 576, 3420), "connector.out": (1, 144, 3584),
        "lm.logits": (1, 151, 152064)}),
    "idefics3-8b-llama3": (idefics3_8b, 8.46e9, 17 * 169, {
        "vision.blocks.26.resid_post": (17, 676, 1152), "connector.in": (17, 676, 1152),
        "connector.out": (17, 169, 4096)}),
    "paligemma-3b-224": (paligemma_3b, 2.92e9, 256, {
        "vision.blocks.26.attn.pattern": (1, 16, 256, 256), "lm.blocks.17.attn.z": (1, 264, 8, 256),
        "lm.logits": (1, 264, 257216)}),
    "blip2-opt-2.7b": (blip2_opt_2_7b, 3.74e9, 32, {
        "vision.blocks.38.resid_post": (1, 257, 1408), "connector.blocks.0.xattn.pattern": (1, 12, 32, 257),
        "connector.blocks.11.mlp.post": (1, 32, 3072), "connector.out": (1, 32, 2560),
        "lm.blocks.31.mlp.post": (1, 37, 10240)}),
    "instructblip-vicuna-7b": (instructblip_vicuna_7b, 7.91e9, 32, {
        "connector.blocks.0.attn.pattern": (1, 12, 37, 37), "connector.blocks.1.mlp.out": (1, 32, 768),
        "connector.out": (1, 32, 4096)}),
    "siglip-so400m-patch14-384": (siglip_so400m, 0.878e9, 729, {
        "vision.blocks.26.attn.pattern": (1, 16, 729, 729), "vision.proj": (1, 1152), "text.proj": (1, 1152),
        "logits": (1, 1)}),
    "clip-vit-large-patch14-336": (clip_vit_l_336, 0.428e9, 577, {
        "vision.blocks.23.resid_post": (1, 577, 1024), "vision.proj": (1, 768), "logits": (1, 1)}),
}


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_full_size_config_on_meta(name):
    build, published, n_image, expected = CHECKPOINTS[name]
    with torch.device("meta"):
        model, make_inputs = build()
    assert all(p.device.type == "meta" for p in model.parameters())
    n_params = sum(p.numel() for p in model.parameters())
    assert abs(n_params / published - 1) < 0.02, f"{n_params / 1e9:.3f} B, published {published / 1e9} B"

    m = vs.load(model)
    x = make_inputs(model)
    shapes = m.site_shapes(x)
    assert list(shapes) == m.sites() or m.adapter.dual_encoder
    for site, shape in expected.items():
        assert shapes[site] == shape, site
    pos = m.positions(x)
    if m.adapter.dual_encoder:
        assert pos["vision"].shape[1] == n_image
    else:
        assert int(pos["lm"].select("image").sum()) + int((pos["lm"].extra.get(
            "newline", torch.zeros(1)) == 1).sum()) == n_image
    print(f"{name}: {n_params / 1e9:.3f} B parameters, {len(shapes)} sites")
