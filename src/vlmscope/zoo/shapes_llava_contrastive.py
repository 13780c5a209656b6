"""shapes-llava-contrastive: shapes-llava with one design choice changed, for the micro-to-macro
comparison. Its vision tower is pre-trained contrastively against captions (CLIP's objective, with
shapes-clip's texts and hard negatives) instead of on images alone with per-patch attribute labels;
the architecture, the projector alignment and the instruction tuning are shapes-llava's. The caption
side (a text tower, two projections and a temperature) lives in the pre-training heads and is
dropped after stage 1, as LLaVA drops CLIP's text tower."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import CLIPTextModel

from vlmscope.zoo import shapes_clip
from vlmscope.zoo.shapes_llava import build_config

NAME = "shapes-llava-contrastive"
PROJECTION = 64


def build_heads(seed: int) -> torch.nn.ModuleDict:
    """The caption side of the contrastive objective: shapes-clip's text tower, projections, temperature."""
    torch.manual_seed(seed + 1)
    text_cfg = shapes_clip.build_config().text_config
    width = build_config().vision_config.hidden_size
    return torch.nn.ModuleDict({
        "text_model": CLIPTextModel(text_cfg),
        "text_projection": torch.nn.Linear(text_cfg.hidden_size, PROJECTION, bias=False),
        "visual_projection": torch.nn.Linear(width, PROJECTION, bias=False),
        "scale": torch.nn.ParameterDict({"logit": torch.nn.Parameter(torch.tensor(2.6592))}),  # log(1 / 0.07)
    })


def pretrain_batch(rng, batch_size: int) -> shapes_clip.Batch:
    """shapes-clip's training batch: scenes, true captions, one-attribute hard negatives, matches."""
    return shapes_clip.contrastive_batch(rng, batch_size)


def pretrain_loss(model, heads: torch.nn.ModuleDict, stage: str, batch: shapes_clip.Batch) -> torch.Tensor:
    """Stage "vision": CLIP's loss between the tower's pooled CLS and the captions (soft targets)."""
    vision = model.model.vision_tower(batch.pixel_values).pooler_output  # (images, d_vision)
    text = heads["text_model"](input_ids=batch.input_ids, attention_mask=batch.attention_mask).pooler_output
    img = F.normalize(heads["visual_projection"](vision), dim=-1)  # (images, projection)
    txt = F.normalize(heads["text_projection"](text), dim=-1)  # (texts, projection)
    scale = heads["scale"]["logit"].clamp(max=4.6052).exp()  # CLIP's cap: temperature >= 1/100
    return shapes_clip.soft_clip_loss(scale * img @ txt.T, batch.match)
