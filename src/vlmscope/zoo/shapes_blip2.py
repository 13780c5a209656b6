"""shapes-blip2: a Blip2ForConditionalGeneration for the shapes world, the zoo's Q-Former model. Same
image grid and LM as shapes-llava (ViT 96 x 3 on 72-px images with 24-px patches; Llama 128 x 4), but
the connector is a 2-layer Q-Former whose 12 learned queries cross-attend into the 10 image features
(CLS + 9 cells) and become the LM's 12 image tokens: a resampler, where shapes-llava keeps one token
per cell through an MLP."""

from __future__ import annotations

import torch
from transformers import Blip2Config, Blip2ForConditionalGeneration

from vlmscope.data.batches import PATCH_HEADS, PatchBatch
from vlmscope.data.scene import CELL, IMAGE_SIZE
from vlmscope.data.tokenizer import N_IMAGE_TOKENS, vocabulary

NAME = "shapes-blip2"
N_QUERIES = 12
PARTS: dict[str, tuple[str, ...]] = {
    "vision": ("vision_model.",),
    "qformer": ("qformer.", "query_tokens"),
    "projector": ("language_projection.",),
    "lm": ("language_model.",),
}
# the Q-Former's representation-learning heads read all queries at once and name each cell's object
SCENE_HEADS = {k: PATCH_HEADS[k] for k in ("colour", "shape", "size")}


def build_config() -> Blip2Config:
    """The architecture; dropout off everywhere so training is as plain as shapes-llava's."""
    vocab = vocabulary()
    width = 96
    vision = dict(hidden_size=width, intermediate_size=384, num_hidden_layers=3, num_attention_heads=4,
                  image_size=IMAGE_SIZE, patch_size=CELL, attention_dropout=0.0)
    qformer = dict(hidden_size=width, num_hidden_layers=2, num_attention_heads=4, intermediate_size=384,
                   encoder_hidden_size=width, cross_attention_frequency=1, vocab_size=8,
                   max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    text = dict(model_type="llama", vocab_size=len(vocab), hidden_size=128, intermediate_size=384,
                num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8, head_dim=16,
                max_position_embeddings=64, bos_token_id=vocab["<s>"], eos_token_id=vocab["</s>"],
                pad_token_id=vocab["<pad>"], tie_word_embeddings=False)
    return Blip2Config(vision_config=vision, qformer_config=qformer, text_config=text, num_query_tokens=N_QUERIES,
                       image_token_index=vocab["<image>"])


def build_model(seed: int) -> Blip2ForConditionalGeneration:
    """A freshly initialised shapes-blip2 (deterministic for the seed)."""
    torch.manual_seed(seed)
    return Blip2ForConditionalGeneration(build_config()).eval()


def build_heads(seed: int) -> torch.nn.ModuleDict:
    """Per-patch heads for the tower (as shapes-llava's) and per-cell scene heads over all queries."""
    torch.manual_seed(seed + 1)
    cfg = build_config()
    d_vision, d_q = cfg.vision_config.hidden_size, cfg.qformer_config.hidden_size
    heads = {k: torch.nn.Linear(d_vision, n) for k, n in PATCH_HEADS.items()}
    heads |= {f"scene_{k}": torch.nn.Linear(N_QUERIES * d_q, N_IMAGE_TOKENS * n) for k, n in SCENE_HEADS.items()}
    return torch.nn.ModuleDict(heads)


def query_outputs(model: Blip2ForConditionalGeneration, pixel_values: torch.Tensor) -> torch.Tensor:
    """The Q-Former's query outputs (batch, queries, d_qformer), as the LM's projection reads them."""
    image = model.vision_model(pixel_values).last_hidden_state  # (batch, 1 + 9, d_vision)
    queries = model.query_tokens.expand(image.shape[0], -1, -1)  # (batch, queries, d_qformer)
    mask = torch.ones(image.shape[:2], dtype=torch.long)
    return model.qformer(query_embeds=queries, encoder_hidden_states=image,
                         encoder_attention_mask=mask).last_hidden_state


def pretrain_loss(model, heads: torch.nn.ModuleDict, stage: str, batch: PatchBatch) -> torch.Tensor:
    """Stage "vision": per-patch attributes from the tower's output (CLS dropped). Stage "qformer"
    (against the frozen tower; BLIP-2's representation learning, with the scene's ground truth in place
    of captions): every cell's colour, shape and size read from all queries together, so the queries
    must carry where each object is without being tied one to a cell."""
    ce = torch.nn.functional.cross_entropy
    if stage == "vision":
        feats = model.vision_model(batch.pixel_values).last_hidden_state[:, 1:]  # (batch, 9, d_vision)
        return sum(ce(heads[k](feats).flatten(0, 1), batch.labels[k].flatten()) for k in PATCH_HEADS)
    flat = query_outputs(model, batch.pixel_values).flatten(1)  # (batch, queries * d_qformer)
    return sum(ce(heads[f"scene_{k}"](flat).view(-1, n), batch.labels[k].flatten()) for k, n in SCENE_HEADS.items())
