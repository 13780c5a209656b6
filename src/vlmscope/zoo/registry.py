"""The zoo's shipped models: each is a folder under zoo/models/ holding a transformers checkpoint
(config.json, fp32 model.safetensors), its processor, card.json / card.md, and checkpoints/ with fp16
snapshots along training (see checkpoint.py). Everything loads offline, safetensors only."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    CLIPConfig,
    CLIPModel,
    CLIPProcessor,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from vlmscope.zoo.checkpoint import compose_snapshot, read_index

MODELS = Path(__file__).parent / "models"
# card["class"] -> (model class, config class, processor class)
CLASSES = {
    "LlavaForConditionalGeneration": (LlavaForConditionalGeneration, LlavaConfig, LlavaProcessor),
    "CLIPModel": (CLIPModel, CLIPConfig, CLIPProcessor),
    "Blip2ForConditionalGeneration": (Blip2ForConditionalGeneration, Blip2Config, Blip2Processor),
}


def names() -> list[str]:
    """Names of the models shipped with the package."""
    return sorted(p.name for p in MODELS.iterdir() if (p / "card.json").exists()) if MODELS.exists() else []


def model_dir(name: str) -> Path:
    if name not in names():
        raise ValueError(f"unknown zoo model {name!r}; available: {names()}")
    return MODELS / name


def card(name: str) -> dict:
    """The model card as a dict (architecture, parameters, data, recipe, accuracy, training time...)."""
    return json.loads((model_dir(name) / "card.json").read_text())


def checkpoint_steps(name: str) -> list[int]:
    """Training steps at which the model can be loaded: the fp16 snapshots, then the final step."""
    snapshots = [e["step"] for e in read_index(model_dir(name) / "checkpoints")]
    return snapshots + [card(name)["training"]["final_step"]]


def load_hf(name: str, step: int | None = None):
    """(model, processor) as plain transformers objects, in eval mode (the classes the card names, e.g.
    LlavaForConditionalGeneration + LlavaProcessor, CLIPModel + CLIPProcessor); `step` picks a
    checkpoint along training (see checkpoint_steps), None the final weights."""
    path = model_dir(name)
    model_cls, config_cls, processor_cls = CLASSES[card(name)["class"]]
    processor = processor_cls.from_pretrained(path, local_files_only=True)
    if step is None or step == card(name)["training"]["final_step"]:
        model = model_cls.from_pretrained(path, local_files_only=True, use_safetensors=True)
    else:
        with torch.random.fork_rng():  # the random init is overwritten; leave the caller's RNG alone
            model = model_cls(config_cls.from_pretrained(path, local_files_only=True))
        model.load_state_dict(compose_snapshot(path / "checkpoints", step), strict=True)
    return model.eval(), processor


def load(name: str, step: int | None = None):
    """The zoo model wrapped as vlmscope's VLM (hook sites, cache, interventions)."""
    from vlmscope.model.load import load as load_vlm

    model, processor = load_hf(name, step)
    return load_vlm(model, processor=processor)
