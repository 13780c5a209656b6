"""What the zoo trains: stages with their schedules (`Stage`, `lr_at`), the run-wide settings
(`TrainConfig`, whose defaults are shapes-llava's shipped recipe), and per model a `Recipe` (model,
pre-training heads and losses, parameter groups, processor). train.py runs them."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from vlmscope.data.batches import patch_batch
from vlmscope.data.tokenizer import build_blip2_processor, build_processor
from vlmscope.zoo import shapes_blip2, shapes_llava, shapes_llava_contrastive


@dataclass(frozen=True)
class Stage:
    """One training stage: which parts train, for how long, and where fp16 snapshots are kept."""

    name: str
    parts: tuple[str, ...]
    steps: int
    batch_size: int
    lr: float
    warmup: int
    floor: float = 0.0  # final lr as a fraction of the peak (cosine)
    snapshots: tuple[int, ...] = ()  # steps within the stage; the stage's last step is always kept
    # (at, total): from step `at` on, the cosine is re-planned to end at `total` steps instead of
    # `steps` (the shipped model's schedule: its relation questions needed the learning rate back up);
    # several re-plans are a tuple of such pairs, in order
    replan: tuple[int, int] | tuple[tuple[int, int], ...] | None = None

    @property
    def replans(self) -> tuple[tuple[int, int], ...]:
        """The re-plans as (at, total) pairs, in order (none: empty)."""
        return replan_pairs(self.replan)

    @property
    def total(self) -> int:
        """Steps the stage runs (unless early stopping ends it first)."""
        return self.replans[-1][1] if self.replan else self.steps


@dataclass(frozen=True)
class TrainConfig:
    """The shapes-llava recipe (zoo pilot 3, run E2). Defaults reproduce the shipped model."""

    seed: int = 0
    stages: tuple[Stage, ...] = (
        Stage("vision", ("vision",), 500, 64, 2e-3, 50, snapshots=(100,)),
        Stage("align", ("projector",), 300, 32, 1e-3, 30),
        Stage("instruct", ("projector", "lm"), 18_000, 32, 1e-3, 200, floor=0.02,
              snapshots=(1000, 2000, 3000, 4000, 5000, 6000, 7000, 8000, 9000, 10000, 12000, 14000, 16000),
              replan=(17_000, 32_000)),
    )
    hard_fraction: float = 0.75  # share of the binding curriculum in instruction batches ...
    hard_ramp: int = 3000  # ... reached linearly over these first steps (from 0: the easy scenes teach
    # the model to read the image at all; with 75% curriculum from step 0 it stalled at chance for 2k steps)
    eval_every: int = 1000
    eval_n: int = 600
    val_seed: int = 1_000_003
    stop_at: float = 0.97  # stop instruction tuning once every family reaches this on validation
    save_every: int = 250
    betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = 0.01
    grad_clip: float = 1.0


def replan_pairs(replan) -> tuple[tuple[int, int], ...]:
    """A `replan` as written in a recipe or its JSON config (none, one (at, total) pair or a sequence
    of pairs) as a tuple of pairs."""
    if not replan:
        return ()
    return (tuple(replan),) if isinstance(replan[0], int) else tuple(tuple(r) for r in replan)


def lr_at(stage: Stage, step: int) -> float:
    """Linear warm-up, then cosine from the peak down to floor * peak at the stage's last step."""
    if step < stage.warmup:
        return stage.lr * (step + 1) / stage.warmup
    horizon = stage.steps
    for at, total in stage.replans:
        if step >= at:
            horizon = total
    t = (step - stage.warmup) / max(1, horizon - stage.warmup)
    return stage.lr * (stage.floor + (1 - stage.floor) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


@dataclass(frozen=True)
class Recipe:
    """What differs between the zoo's generative VLMs: the model, the heads and losses of its
    pre-training stages, its parameter groups and its processor (the prompt layout follows from the
    model: `tokenizer.layout_of`)."""

    name: str
    build_model: Callable[[int], torch.nn.Module]
    build_heads: Callable[[int], torch.nn.ModuleDict]
    pretrain_loss: Callable[..., torch.Tensor]  # (model, heads, stage name, PatchBatch) -> loss
    pretrain_stages: tuple[str, ...]  # the stages trained on per-patch labels; the rest answer questions
    parts: dict[str, tuple[str, ...]]  # part -> state-dict prefixes
    build_processor: Callable[[], Any]
    config: TrainConfig
    pretrain_batch: Callable[[np.random.Generator, int], Any] = patch_batch  # (rng, batch size) -> batch

    def part_keys(self, model: torch.nn.Module, parts: tuple[str, ...]) -> list[str]:
        """State-dict keys of the named parts."""
        prefixes = tuple(p for part in parts for p in self.parts[part])
        return [k for k in model.state_dict() if k.startswith(prefixes)]

    def part_parameters(self, model: torch.nn.Module, parts: tuple[str, ...]) -> list[torch.nn.Parameter]:
        """Parameters of the named parts, in a fixed order."""
        prefixes = tuple(p for part in parts for p in self.parts[part])
        return [p for k, p in model.named_parameters() if k.startswith(prefixes)]


# shapes-blip2 in BLIP-2's stages (Li et al., 2023): the tower (per-patch heads, as shapes-llava's),
# the Q-Former's representation learning against the frozen tower, then generative training: the
# projection alone, then projection + LM with the Q-Former frozen (BLIP-2 freezes its LLM instead;
# this LM starts from scratch). A first run that also trained the Q-Former from the first
# instruction step scrambled the layout it had learned (what is at each cell, read from the queries:
# 0.96 -> 0.74 after 7,000 steps) and stalled ("where" 0.37), so the Q-Former stays frozen.
BLIP2_CONFIG = TrainConfig(stages=(
    Stage("vision", ("vision",), 500, 64, 2e-3, 50, snapshots=(100,)),
    Stage("qformer", ("qformer",), 600, 64, 1e-3, 50, snapshots=(200,)),
    Stage("align", ("projector",), 300, 32, 1e-3, 30),
    Stage("instruct", ("projector", "lm"), 18_000, 32, 1e-3, 200, floor=0.02,
          snapshots=(1000, 2000, 3000, 4000, 6000, 8000, 10000, 12000, 14000, 16000, 20000, 24000),
          replan=(6000, 26_000)),  # re-planned at step 6,000 (relation lagged as in shapes-llava)
    # a second instruction stage (fresh AdamW, lower peak): the first ended with every family at
    # >= 0.98 on validation but count at 0.90 (0.94 held-out)
    Stage("instruct", ("projector", "lm"), 8000, 32, 3e-4, 100, floor=0.05, snapshots=(4000,)),
))

# shapes-llava-contrastive: shapes-llava's recipe with the tower pre-trained against captions (longer:
# a contrastive tower needs more steps than per-patch heads), instruction tuning capped at 7,000 steps
# so that it meets shapes-llava's checkpoint of the same instruction step
CONTRASTIVE_CONFIG = TrainConfig(stages=(
    Stage("vision", ("vision",), 3000, 64, 2e-3, 200, floor=0.02, snapshots=(500, 1500)),
    Stage("align", ("projector",), 300, 32, 1e-3, 30),
    Stage("instruct", ("projector", "lm"), 7000, 32, 1e-3, 200, floor=0.02,
          snapshots=(1000, 2000, 3000, 4000, 5000, 6000)),
))

RECIPES: dict[str, Recipe] = {
    shapes_llava.NAME: Recipe(
        shapes_llava.NAME, shapes_llava.build_model, shapes_llava.build_patch_heads, shapes_llava.pretrain_loss,
        ("vision",), shapes_llava.PARTS, build_processor, TrainConfig()),
    shapes_blip2.NAME: Recipe(
        shapes_blip2.NAME, shapes_blip2.build_model, shapes_blip2.build_heads, shapes_blip2.pretrain_loss,
        ("vision", "qformer"), shapes_blip2.PARTS, lambda: build_blip2_processor(shapes_blip2.N_QUERIES),
        BLIP2_CONFIG),
    shapes_llava_contrastive.NAME: Recipe(
        shapes_llava_contrastive.NAME, shapes_llava.build_model, shapes_llava_contrastive.build_heads,
        shapes_llava_contrastive.pretrain_loss, ("vision",), shapes_llava.PARTS, build_processor,
        CONTRASTIVE_CONFIG, shapes_llava_contrastive.pretrain_batch),
}
