"""shapes-llava: a 1.3M-parameter LlavaForConditionalGeneration for the shapes world (zoo pilot 3,
run E2): CLIP vision tower 96 x 3 layers on 72-px images with 24-px patches (one image token per grid
cell), a 2-layer projector, and a Llama LM 128 x 4 layers with 8 heads of 16 dims."""

from __future__ import annotations

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from vlmscope.data.batches import PATCH_HEADS
from vlmscope.data.scene import CELL, IMAGE_SIZE
from vlmscope.data.tokenizer import N_IMAGE_TOKENS, vocabulary

NAME = "shapes-llava"
# parameter groups by state-dict prefix; each training stage changes some of them
PARTS: dict[str, tuple[str, ...]] = {
    "vision": ("model.vision_tower.",),
    "projector": ("model.multi_modal_projector.",),
    "lm": ("model.language_model.", "lm_head."),
}


def build_config() -> LlavaConfig:
    """The architecture; vision_feature_layer=-1 because stage 1 trains the tower's last layer."""
    vocab = vocabulary()
    vision = CLIPVisionConfig(hidden_size=96, intermediate_size=384, num_hidden_layers=3,
                              num_attention_heads=4, image_size=IMAGE_SIZE, patch_size=CELL)
    text = LlamaConfig(
        vocab_size=len(vocab), hidden_size=128, intermediate_size=384, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=8, head_dim=16, max_position_embeddings=64,
        bos_token_id=vocab["<s>"], eos_token_id=vocab["</s>"], pad_token_id=vocab["<pad>"],
        tie_word_embeddings=False,
    )
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=vocab["<image>"],
        image_seq_length=N_IMAGE_TOKENS, vision_feature_layer=-1, vision_feature_select_strategy="default",
    )


def build_model(seed: int) -> LlavaForConditionalGeneration:
    """A freshly initialised shapes-llava (deterministic for the seed)."""
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(build_config()).eval()


def build_patch_heads(seed: int) -> torch.nn.ModuleDict:
    """Per-patch linear heads (colour, shape, size, row, col) for vision-tower pre-training."""
    torch.manual_seed(seed + 1)
    width = build_config().vision_config.hidden_size
    return torch.nn.ModuleDict({k: torch.nn.Linear(width, n) for k, n in PATCH_HEADS.items()})


def pretrain_loss(model, heads: torch.nn.ModuleDict, stage: str, batch) -> torch.Tensor:
    """Stage "vision": per-patch attributes from the tower layer the LM reads (CLS dropped)."""
    out = model.model.vision_tower(batch.pixel_values, output_hidden_states=True)
    feats = out.hidden_states[-1][:, 1:]  # (batch, 9, d_vision)
    return sum(torch.nn.functional.cross_entropy(h(feats).flatten(0, 1), batch.labels[k].flatten())
               for k, h in heads.items())
