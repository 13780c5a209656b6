"""Block layouts of the transformer families found inside VLMs, described once and reused.

A VLM's vision tower and language model vary independently of the VLM class (LLaVA on Mistral,
LLaVA on SigLIP, ...), so adapters pick the layout from the block's own class.
"""

from __future__ import annotations

from torch import nn

from vlmscope.errors import UnsupportedModelError
from vlmscope.model.adapters.base import BlockLayout

# Pre-norm decoders with a gated MLP: Llama, Mistral, Vicuna, Qwen2, Gemma (v1).
GATED_DECODER = BlockLayout(
    attn="self_attn", attn_out_proj="self_attn.o_proj", norm2="post_attention_layernorm",
    mlp="mlp", mlp_down="mlp.down_proj",
)
# Pre-norm encoders with a two-layer MLP: CLIP, SigLIP (vision and text towers).
CLIP_ENCODER = BlockLayout(
    attn="self_attn", attn_out_proj="self_attn.out_proj", norm2="layer_norm2",
    mlp="mlp", mlp_down="mlp.fc2",
)

BLOCK_LAYOUTS: dict[str, BlockLayout] = {
    "LlamaDecoderLayer": GATED_DECODER,
    "MistralDecoderLayer": GATED_DECODER,
    "Qwen2DecoderLayer": GATED_DECODER,
    "GemmaDecoderLayer": GATED_DECODER,
    "CLIPEncoderLayer": CLIP_ENCODER,
    "SiglipEncoderLayer": CLIP_ENCODER,
}


def block_layout(block: nn.Module) -> BlockLayout:
    """The layout of a block, by its class name."""
    name = type(block).__name__
    try:
        return BLOCK_LAYOUTS[name]
    except KeyError:
        raise UnsupportedModelError(
            f"no block layout for {name}; known blocks: {', '.join(sorted(BLOCK_LAYOUTS))}. "
            "Add one to vlmscope/model/adapters/towers.py (see docs/adapters.md)."
        ) from None
