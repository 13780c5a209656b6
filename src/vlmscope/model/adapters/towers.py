"""The towers found inside VLMs, described once and composed by the adapters.

A VLM's vision tower and language model vary independently of the VLM class (LLaVA on Mistral,
LLaVA on SigLIP, BLIP-2 on OPT or Llama), so this file describes, by module class:
- block layouts (`BLOCK_LAYOUTS`, keyed by the block's class): which modules give attn.z, mlp.post, ...
- encoders (`ENCODERS`, keyed by the vision / text model's class): where blocks, embeddings and
  final norm lie, and whether a CLS token precedes the patches;
- decoders: found under any causal LM by transformers' naming convention (`decoder_tower`).
Adapters call `encoder_tower` / `decoder_tower` with the path of the tower inside their model.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from vlmscope.errors import UnsupportedModelError
from vlmscope.model.adapters.base import BlockLayout, Tower, n_heads
from vlmscope.model.sites import SiteSpec

# --- block layouts ---------------------------------------------------------------------------------

# Pre-norm decoders with a gated MLP: Llama, Mistral, Vicuna, Qwen2, Qwen2-VL's LM, Gemma (v1).
GATED_DECODER = BlockLayout(
    attn="self_attn", attn_out_proj="self_attn.o_proj", norm2="post_attention_layernorm",
    mlp="mlp", mlp_down="mlp.down_proj", attn_q_proj="self_attn.q_proj",
)
# Pre-norm encoders with a two-layer MLP: CLIP, SigLIP, Idefics3 / SmolVLM (vision and text towers).
CLIP_ENCODER = BlockLayout(
    attn="self_attn", attn_out_proj="self_attn.out_proj", norm2="layer_norm2",
    mlp="mlp", mlp_down="mlp.fc2", attn_q_proj="self_attn.q_proj",
)
# BLIP-2 / InstructBLIP's EVA ViT: as CLIP, with a fused qkv and an output `projection`.
BLIP_ENCODER = BlockLayout(
    attn="self_attn", attn_out_proj="self_attn.projection", norm2="layer_norm2",
    mlp="mlp", mlp_down="mlp.fc2",
)
# OPT (pre-norm, do_layer_norm_before=True): the MLP is fc1/fc2 inside the block, on (batch * pos, d).
OPT_DECODER = BlockLayout(
    attn="self_attn", attn_out_proj="self_attn.out_proj", norm2="final_layer_norm",
    mlp="fc2", mlp_down="fc2", flat_mlp=True, attn_q_proj="self_attn.q_proj",
)
# Qwen2-VL's and Qwen2.5-VL's ViT blocks (packed tokens, no batch axis).
QWEN2_VL_VISION = BlockLayout(attn="attn", attn_out_proj="attn.proj", norm2="norm2", mlp="mlp",
                              mlp_down="mlp.fc2")
QWEN2_5_VL_VISION = BlockLayout(attn="attn", attn_out_proj="attn.proj", norm2="norm2", mlp="mlp",
                                mlp_down="mlp.down_proj")


@dataclass(frozen=True)
class QFormerLayout:
    """A BERT-style post-norm Q-Former layer (BLIP-2, InstructBLIP): self-attention over the query
    tokens (and the instruction, for InstructBLIP), cross-attention from the queries into the
    image, and the queries' own feed-forward. Each sublayer ends in LayerNorm(x + sublayer(x)),
    so the residual sites are those norms' outputs:

        resid_mid   = LN(resid_pre + attn.out)                       (all tokens, `stream`)
        resid_cross = LN(resid_mid[:, :queries] + xattn.out)          (queries, `query_stream`)
        resid_post[:, :queries] = LN(resid_cross + mlp.out)

    xattn.* exist in layers with cross-attention (every `cross_attention_frequency`-th). The
    instruction tokens' feed-forward (InstructBLIP) has no sites.
    """

    query_stream: str = "connector"
    key_stream: str = "vision"

    def sites(self, model: nn.Module, blk: str, b: str, i: int, stream: str, packed: bool) -> list[SiteSpec]:
        q = self.query_stream
        heads = n_heads(model, f"{blk}.attention.attention", f"{blk}.attention.output.dense")
        d = f"{blk}.attention.output.dense.weight:0"
        specs = [
            SiteSpec(f"{b}.resid_pre", blk, "input", stream, arg="hidden_states", layer=i, width=d),
            SiteSpec(f"{b}.attn.pattern", f"{blk}.attention.attention", "pattern", stream, layer=i,
                     heads=heads),
            SiteSpec(f"{b}.attn.z", f"{blk}.attention.output.dense", "input", stream, layer=i, heads=heads,
                     width=f"{blk}.attention.output.dense.weight:1"),
            SiteSpec(f"{b}.attn.out", f"{blk}.attention.output.dense", "output", stream, layer=i, width=d),
            SiteSpec(f"{b}.resid_mid", f"{blk}.attention", "output", stream, layer=i, width=d),
        ]
        if hasattr(model.get_submodule(blk), "crossattention"):
            x = f"{blk}.crossattention"
            specs += [
                SiteSpec(f"{b}.xattn.pattern", f"{x}.attention", "pattern", q, layer=i, heads=heads,
                         key_stream=self.key_stream),
                SiteSpec(f"{b}.xattn.z", f"{x}.output.dense", "input", q, layer=i, heads=heads,
                         width=f"{x}.output.dense.weight:1"),
                SiteSpec(f"{b}.xattn.out", f"{x}.output.dense", "output", q, layer=i, width=d),
                SiteSpec(f"{b}.resid_cross", x, "output", q, layer=i, width=d),
            ]
        return specs + [
            SiteSpec(f"{b}.mlp.post", f"{blk}.output_query.dense", "input", q, layer=i,
                     width=f"{blk}.output_query.dense.weight:1"),
            SiteSpec(f"{b}.mlp.out", f"{blk}.output_query.dense", "output", q, layer=i, width=d),
            SiteSpec(f"{b}.resid_post", blk, "output", stream, layer=i, width=d),
        ]


QFORMER = QFormerLayout()

BLOCK_LAYOUTS: dict[str, BlockLayout | QFormerLayout] = {
    "LlamaDecoderLayer": GATED_DECODER,
    "MistralDecoderLayer": GATED_DECODER,
    "Qwen2DecoderLayer": GATED_DECODER,
    "Qwen2VLDecoderLayer": GATED_DECODER,
    "Qwen2_5_VLDecoderLayer": GATED_DECODER,
    "GemmaDecoderLayer": GATED_DECODER,
    "OPTDecoderLayer": OPT_DECODER,
    "CLIPEncoderLayer": CLIP_ENCODER,
    "SiglipEncoderLayer": CLIP_ENCODER,
    "Idefics3EncoderLayer": CLIP_ENCODER,
    "SmolVLMEncoderLayer": CLIP_ENCODER,
    "Blip2EncoderLayer": BLIP_ENCODER,
    "InstructBlipEncoderLayer": BLIP_ENCODER,
    "Qwen2VLVisionBlock": QWEN2_VL_VISION,
    "Qwen2_5_VLVisionBlock": QWEN2_5_VL_VISION,
    "Blip2QFormerLayer": QFORMER,
    "InstructBlipQFormerLayer": QFORMER,
}


def block_layout(block: nn.Module) -> BlockLayout | QFormerLayout:
    """The layout of a block, by its class name."""
    name = type(block).__name__
    if name == "OPTDecoderLayer" and not block.do_layer_norm_before:
        raise UnsupportedModelError("post-norm OPT blocks (do_layer_norm_before=False, OPT-350m) are not "
                                    "supported; pre-norm OPT (125m, 1.3b, 2.7b, 6.7b, ...) is")
    try:
        return BLOCK_LAYOUTS[name]
    except KeyError:
        raise UnsupportedModelError(
            f"no block layout for {name}; known blocks: {', '.join(sorted(BLOCK_LAYOUTS))}. "
            "Add one to vlmscope/model/adapters/towers.py (see docs/adapters.md)."
        ) from None


# --- encoders (vision towers, dual encoders' text towers) -------------------------------------------


@dataclass(frozen=True)
class Encoder:
    """Where the parts of an encoder model lie, relative to its root module."""

    layers: str
    embed: tuple[str, str, str | None]  # what enters block 0: (module, hook kind, arg)
    norm: str | None = None  # a final norm applied at every position (not only to a pooled token)
    cls: bool = False  # a class token precedes the patches
    packed: bool = False  # tokens of every image packed into one sequence, without a batch axis


# CLIP's post_layernorm applies to the pooled CLS token only (vision.norm in the CLIP adapter)
_CLIP_VISION = Encoder("encoder.layers", ("pre_layrnorm", "output", None), cls=True)
_SIGLIP_VISION = Encoder("encoder.layers", ("embeddings", "output", None), norm="post_layernorm")
# BLIP's post_layernorm runs twice (every position, then again on the pooled CLS), so a hook on it
# would see two tensors: its per-position output is connector.in (the Q-Former's image features).
_BLIP_VISION = Encoder("encoder.layers", ("embeddings", "output", None), cls=True)
_TEXT = Encoder("encoder.layers", ("embeddings", "output", None), norm="final_layer_norm")

ENCODERS: dict[str, Encoder] = {
    "CLIPVisionModel": _CLIP_VISION,
    "CLIPVisionTransformer": _CLIP_VISION,
    "SiglipVisionModel": _SIGLIP_VISION,
    "SiglipVisionTransformer": _SIGLIP_VISION,
    "Idefics3VisionTransformer": _SIGLIP_VISION,
    "SmolVLMVisionTransformer": _SIGLIP_VISION,
    "Blip2VisionModel": _BLIP_VISION,
    "InstructBlipVisionModel": _BLIP_VISION,
    "Qwen2VisionTransformerPretrainedModel": Encoder("blocks", ("patch_embed", "output", None), packed=True),
    # Qwen2.5-VL reorders the patches into attention windows after patch_embed: block 0's input is the embed
    "Qwen2_5_VisionTransformerPretrainedModel": Encoder("blocks", ("blocks.0", "input", "hidden_states"),
                                                        packed=True),
    "CLIPTextModel": _TEXT,
    "CLIPTextTransformer": _TEXT,
    "SiglipTextModel": _TEXT,
    "SiglipTextTransformer": _TEXT,
}


def encoder(model: nn.Module, root: str) -> Encoder:
    """The description of the encoder at `root`, by its class."""
    name = type(model.get_submodule(root)).__name__
    try:
        return ENCODERS[name]
    except KeyError:
        raise UnsupportedModelError(
            f"no encoder description for {name} (at {root!r}); known encoders: "
            f"{', '.join(sorted(ENCODERS))}. "
            "Add one to vlmscope/model/adapters/towers.py (see docs/adapters.md)."
        ) from None


def encoder_tower(model: nn.Module, root: str, prefix: str = "vision", stream: str | None = None) -> Tower:
    """The Tower of the encoder at `root`, its sites named under `prefix`."""
    e = encoder(model, root)
    mod, hook, arg = e.embed
    return Tower(prefix, f"{root}.{e.layers}", stream or prefix, embed=(f"{root}.{mod}", hook, arg),
                 norm=f"{root}.{e.norm}" if e.norm else None, packed=e.packed)


# --- decoders ----------------------------------------------------------------------------------------


def decoder_root(model: nn.Module, root: str) -> str:
    """Path of the module holding the decoder blocks (`layers`) under `root`, which may be a base
    model (LlamaModel) or a causal LM (LlamaForCausalLM: .model; OPTForCausalLM: .model.decoder)."""
    path, mod = root, model.get_submodule(root)
    while not isinstance(getattr(mod, "layers", None), nn.ModuleList):
        child = next((c for c in ("model", "decoder") if isinstance(getattr(mod, c, None), nn.Module)), None)
        if child is None:
            raise UnsupportedModelError(
                f"{type(model.get_submodule(root)).__name__} at {root!r} is not a decoder-only LM with a "
                "`layers` list of blocks (encoder-decoder LMs such as Flan-T5 are not supported)"
            )
        path, mod = f"{path}.{child}", getattr(mod, child)
    return path


def decoder_tower(model: nn.Module, root: str) -> Tower:
    """The "lm" Tower of the decoder under `root` (the module the VLM calls with inputs_embeds).
    lm.embed is that input: the merged text and image embeddings, which can be fed back as
    inputs_embeds. It equals lm.blocks.0.resid_pre except where the decoder transforms it first
    (OPT adds learned positions)."""
    path = decoder_root(model, root)
    base = model.get_submodule(path)
    norms = [n for n in ("norm", "final_layer_norm") if isinstance(getattr(base, n, None), nn.Module)]
    norm = norms[0] if norms else None
    return Tower("lm", f"{path}.layers", "lm", embed=(root, "input", "inputs_embeds"),
                 norm=f"{path}.{norm}" if norm else None)
