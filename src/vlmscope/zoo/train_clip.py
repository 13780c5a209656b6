"""Training shapes-clip (see shapes_clip.py for the model, texts and loss) with the zoo's machinery:
one contrastive stage with train.py's warm-up + cosine schedule, fp16 snapshots along training and
the atomic, resumable state of checkpoint.py. Deterministic for a seed: step i's batch comes from its
own generator (seed, 0, i), so a killed run resumed from its directory ends with the same weights.

    vlmscope zoo train shapes-clip --out runs/shapes-clip [--seed 0] [--steps N] [--halt-at STEP]
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from tqdm import tqdm
from transformers import CLIPModel

from vlmscope.zoo import checkpoint as ck
from vlmscope.zoo.recipes import Stage, lr_at
from vlmscope.zoo.shapes_clip import (
    NAME,
    PARTS,
    build_model,
    build_processor,
    contrastive_batch,
    contrastive_loss,
    evaluate,
)
from vlmscope.zoo.train import Progress

STATE = "state.safetensors"


@dataclass(frozen=True)
class ClipConfig:
    """A shapes-clip recipe. The defaults are the first shipped model's (v1), which never learned
    position or background; POSITION_RECIPE (v2) learns every attribute; DEEP_RECIPE, the shipped
    model's now (v3), does so with a tower whose heads write shape (docs/zoo.md, shapes-clip)."""

    seed: int = 0
    steps: int = 4500
    batch_size: int = 64
    lr: float = 2e-3
    warmup: int = 200
    floor: float = 0.02
    snapshots: tuple[int, ...] = (0, 250, 500, 1000, 1500, 2500, 3500, 4500)  # the last step is always kept
    # (at, total), or several such pairs in order: from step `at` on, the cosine is re-planned to end at
    # `total` (as Stage.replan): the shipped run ended its 4,500-step plan at shape 0.95 and went on with
    # the learning rate back up
    replan: tuple[int, int] | tuple[tuple[int, int], ...] | None = (4500, 7000)
    single: float = 0.4  # share of one-object scenes
    full_p: float = 0.25  # share of one-object scenes described by the full caption
    keep_p: tuple[float, ...] = (0.5, 0.5, 0.5, 0.5, 0.0)  # P(mention) of size, colour, shape, position, background
    swaps: tuple[float, ...] = (1, 1, 1, 1, 1, 1)  # hard-negative kinds, weights as in SWAPS
    # share of one-object scenes given the batch's shared colour; a run with focus 0.5, shape kept at
    # 0.75 and shape swaps x3 learned shape faster early but ended lower (0.92 vs 0.95 on validation)
    focus: float = 0.0
    twins: float = 0.0  # share of one-object scenes followed by a position- or background-swapped twin
    # init std of the vision position embeddings (None: transformers' 0.02, 1/18 of a patch token's
    # per-dimension scale: the CLS cannot tell where the object is, a probe reads 0.13, chance 0.11)
    pos_std: float | None = None
    heads: int = 4  # the vision tower's attention heads, its blocks and MLP width (shapes_clip.build_config)
    layers: int = 3
    mlp: int = 256
    eval_every: int = 500
    eval_n: int = 300
    val_seed: int = 1_000_003
    save_every: int = 250
    betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = 0.01
    grad_clip: float = 1.0


# v2's recipe (shipped from the third to the sixth session): learns position and background (1.00 zero-shot
# held-out) and, given 20,000 steps, shape too (0.986; 0.870 at step 11,000) (docs/zoo.md, shapes-clip).
# Position embeddings at a patch's scale make the object's cell visible to the CLS; lr 1e-3 because at
# 2e-3 position stays at chance even so (0.11 at step 500, against 0.91). Snapshots: at most 8 besides
# the final fp32 weights (the zoo's size budget).
POSITION_RECIPE = ClipConfig(lr=1e-3, snapshots=(0, 500, 1000, 2500, 3500, 7000, 11_000, 17_000),
                             replan=((4500, 7000), (7000, 11_000), (11_000, 20_000)), keep_p=(0.5,) * 5,
                             swaps=(1, 1, 1, 3, 3, 1), pos_std=0.5)

# The shipped model's recipe since the seventh session (v3): POSITION_RECIPE's data and optimiser with a
# deeper, narrower vision tower (4 blocks with MLPs of 128 instead of 3 of 256), a 12,000-step cosine and,
# from there, one more to 18,000 (background was at 0.5 zero-shot at 12,000). In v2's tower the last MLP
# writes half of shape's evidence and no head specialises in shape by the end of training; in this one
# TEXTSPAN names and ablation confirms heads for colour, shape and position (docs/explain.md, TEXTSPAN;
# docs/zoo.md, shapes-clip).
DEEP_RECIPE = replace(POSITION_RECIPE, layers=4, mlp=128, steps=12_000, replan=((12_000, 18_000),),
                      snapshots=(0, 500, 1000, 2500, 3500, 5000, 7000, 9500, 12_000, 15_000))


def _stage(cfg: ClipConfig):
    return Stage("contrastive", tuple(PARTS), cfg.steps, cfg.batch_size, cfg.lr, cfg.warmup, floor=cfg.floor,
                 snapshots=cfg.snapshots, replan=cfg.replan)


def _save_state(out: Path, model: CLIPModel, opt, prog: Progress) -> None:
    flat, groups = ck.optimizer_tensors(opt)
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors |= {f"optim.{k}": v for k, v in flat.items()}
    tensors["rng.torch"] = torch.get_rng_state()
    ck.save_atomic(tensors, out / STATE, {"progress": asdict(prog), "param_groups": groups})


def train(out: str | Path, cfg: ClipConfig = ClipConfig(), halt_at: int | None = None,
          progress_bar: bool = True) -> Progress:
    """Train (or resume) into `out`; `halt_at` stops before that step without saving, as a kill would."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stage = _stage(cfg)
    model = build_model(cfg.seed, cfg.pos_std, cfg.heads, cfg.layers, cfg.mlp)
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    prog = Progress()
    if (out / STATE).exists():
        saved = load_file(str(out / STATE))
        meta = ck.read_metadata(out / STATE)
        prog = Progress(**meta["progress"])
        model.load_state_dict(ck.split_prefix(saved, "model"), strict=True)
        ck.load_optimizer(opt, ck.split_prefix(saved, "optim"), meta["param_groups"])
        torch.set_rng_state(saved["rng.torch"])
    else:
        (out / "config.json").write_text(json.dumps(asdict(cfg), indent=1) + "\n")
    model.train()
    prog.done = prog.step >= stage.total  # a finished run goes on if the plan was extended (replan)
    bar = tqdm(range(prog.step, stage.total), desc=NAME, initial=prog.step, total=stage.total,
               disable=not progress_bar or prog.done, mininterval=10)
    t0 = time.perf_counter()
    for step in bar:
        if halt_at is not None and step >= halt_at:
            return prog
        if step in cfg.snapshots:
            ck.write_snapshot(out / "checkpoints", step, stage.name, model.state_dict(), list(model.state_dict()))
        rng = np.random.default_rng([cfg.seed, 0, step])
        for g in opt.param_groups:
            g["lr"] = lr_at(stage, step)
        batch = contrastive_batch(rng, cfg.batch_size, cfg.single, cfg.full_p, cfg.keep_p, cfg.swaps, cfg.focus,
                                  cfg.twins)
        loss = contrastive_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, 4.6052)  # CLIP's cap: temperature >= 1/100
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        done = step + 1
        if done % cfg.eval_every == 0 or done == stage.total:
            prog.accuracy = evaluate(model, cfg.val_seed, cfg.eval_n)
            prog.history.append({"step": done, "accuracy": prog.accuracy})
            scores = " ".join(f"{k} {v:.3f}" for k, v in prog.accuracy.items())
            bar.write(f"step {done} loss {loss.item():.3f}: {scores}")
        now = time.perf_counter()
        prog.elapsed_s += now - t0
        prog.stage_seconds[stage.name] = prog.stage_seconds.get(stage.name, 0.0) + now - t0
        t0 = now
        if done == stage.total:
            ck.write_snapshot(out / "checkpoints", done, stage.name, model.state_dict(), list(model.state_dict()))
            prog.step, prog.done = done, True
            _save_state(out, model, opt, prog)
        elif done % cfg.save_every == 0:
            prog.step = done
            _save_state(out, model, opt, prog)
    bar.close()
    model.eval()
    model.save_pretrained(out / "final", safe_serialization=True)
    build_processor().save_pretrained(out / "final")
    ck.write_json_atomic(asdict(prog), out / "final" / "training.json")
    return prog
