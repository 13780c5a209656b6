"""Training the zoo's generative VLMs in stages. shapes-llava in LLaVA's (Liu et al., 2023), with the
recipe measured in the zoo pilots: (1) vision-tower pre-training with per-patch heads (colour, shape,
size, row, col), (2) projector alignment (projector only), (3) instruction tuning (projector + LM) on
the six question families with the binding curriculum and lagging-family re-weighting, early-stopped
at >= 0.97. shapes-blip2 in BLIP-2's (see BLIP2_CONFIG): tower, Q-Former, then generative training.

Deterministic for a seed: each step's data comes from its own numpy generator (seed, stage, step),
and the resumable state (weights, optimizer, RNG, family weights) is written atomically, so a killed
run resumed from its directory ends with the same weights as an uninterrupted one.

    python -m vlmscope.zoo.train shapes-llava --out runs/shapes-llava [--seed 0] [--steps N]
    python -m vlmscope.zoo.train shapes-blip2 --out runs/shapes-blip2

The recipes (stages, schedules, what each model pre-trains on) are in recipes.py; `shapes-clip` is
trained by train_clip.py with the same state and snapshot machinery.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from tqdm import tqdm

from vlmscope.data.batches import family_weights, qa_batch
from vlmscope.data.sampling import standard_examples
from vlmscope.data.tokenizer import layout_of
from vlmscope.errors import InputError
from vlmscope.zoo import checkpoint as ck
from vlmscope.zoo.evaluate import accuracy
from vlmscope.zoo.recipes import RECIPES, Recipe, Stage, TrainConfig, lr_at

STATE = "state.safetensors"


@dataclass
class Progress:
    """Where a run stands; stored as the metadata of the state file."""

    stage: int = 0
    step: int = 0
    elapsed_s: float = 0.0
    accuracy: dict[str, float] = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    done: bool = False


def global_step(cfg: TrainConfig, stage: int, step: int) -> int:
    return sum(s.total for s in cfg.stages[:stage]) + step


def _loss(recipe: Recipe, model, heads, stage: Stage, step: int, rng: np.random.Generator,
          weights: dict[str, float], cfg: TrainConfig):
    if stage.name in recipe.pretrain_stages:
        return recipe.pretrain_loss(model, heads, stage.name, recipe.pretrain_batch(rng, stage.batch_size))
    hard = cfg.hard_fraction * min(1.0, step / cfg.hard_ramp) if cfg.hard_ramp else cfg.hard_fraction
    b = qa_batch(rng, stage.batch_size, weights, hard, layout=layout_of(model))
    x = b.inputs
    logits = model(input_ids=x.input_ids, attention_mask=x.attention_mask, pixel_values=x.pixel_values).logits
    return torch.nn.functional.cross_entropy(logits[torch.arange(len(b.answers)), x.last], b.answers)


def _save_state(out: Path, model, heads, opt, prog: Progress) -> None:
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors |= {f"heads.{k}": v for k, v in heads.state_dict().items()}
    groups: list[dict] = []
    if opt is not None:
        flat, groups = ck.optimizer_tensors(opt)
        tensors |= {f"optim.{k}": v for k, v in flat.items()}
    tensors["rng.torch"] = torch.get_rng_state()
    ck.save_atomic(tensors, out / STATE, {"progress": asdict(prog), "param_groups": groups})


def _snapshot(out: Path, recipe: Recipe, cfg: TrainConfig, model, stage_i: int, step: int) -> None:
    stage = cfg.stages[stage_i]
    keys = recipe.part_keys(model, stage.parts) if step > 0 or stage_i > 0 else list(model.state_dict())
    step = global_step(cfg, stage_i, step)
    ck.write_snapshot(out / "checkpoints", step, stage.name, model.state_dict(), keys)


def train(out: str | Path, cfg: TrainConfig | None = None, halt_at: int | None = None,
          progress_bar: bool = True, recipe: Recipe | str = "shapes-llava") -> Progress:
    """Train (or resume) a zoo VLM into `out` (by default shapes-llava with its shipped recipe);
    returns the final progress. `halt_at` (a global step) stops the run there without saving, as a
    kill would: used to test resumption."""
    recipe = RECIPES[recipe] if isinstance(recipe, str) else recipe
    cfg = cfg or recipe.config
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model, heads = recipe.build_model(cfg.seed), recipe.build_heads(cfg.seed)
    for p in model.parameters():
        p.requires_grad_(False)
    prog, saved = Progress(), None
    if (out / STATE).exists():
        saved = load_file(str(out / STATE))
        meta = ck.read_metadata(out / STATE)
        prog = Progress(**meta["progress"])
        model.load_state_dict(ck.split_prefix(saved, "model"), strict=True)
        heads.load_state_dict(ck.split_prefix(saved, "heads"), strict=True)
        torch.set_rng_state(saved["rng.torch"])
    else:
        (out / "config.json").write_text(json.dumps(asdict(cfg), indent=1) + "\n")
        _snapshot(out, recipe, cfg, model, 0, 0)
    while not prog.done:
        stage = cfg.stages[prog.stage]
        params = recipe.part_parameters(model, stage.parts)
        params += list(heads.parameters()) if stage.name in recipe.pretrain_stages else []
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(params, lr=stage.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
        if saved is not None and prog.step > 0:
            groups = ck.read_metadata(out / STATE)["param_groups"]
            ck.load_optimizer(opt, ck.split_prefix(saved, "optim"), groups)
        saved = None
        model.train()
        bar = tqdm(range(prog.step, stage.total), desc=f"{recipe.name} {stage.name}", initial=prog.step,
                   total=stage.total, disable=not progress_bar, mininterval=10)
        t0, stop = time.perf_counter(), False
        for step in bar:
            if halt_at is not None and global_step(cfg, prog.stage, step) >= halt_at:
                return prog
            rng = np.random.default_rng([cfg.seed, prog.stage, step])
            for g in opt.param_groups:
                g["lr"] = lr_at(stage, step)
            loss = _loss(recipe, model, heads, stage, step, rng, family_weights(prog.accuracy), cfg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
            done = step + 1
            if stage.name == "instruct" and (done % cfg.eval_every == 0 or done == stage.total):
                prog.accuracy = accuracy(model, standard_examples(cfg.val_seed, cfg.eval_n))
                prog.history.append({"step": global_step(cfg, prog.stage, done), "accuracy": prog.accuracy})
                stop = min(prog.accuracy.values()) >= cfg.stop_at
                bar.write(f"step {done}: " + " ".join(f"{k} {v:.2f}" for k, v in prog.accuracy.items()))
                model.train()
            if done in stage.snapshots or done == stage.total or stop:
                _snapshot(out, recipe, cfg, model, prog.stage, done)
            now = time.perf_counter()
            prog.elapsed_s += now - t0
            prog.stage_seconds[stage.name] = prog.stage_seconds.get(stage.name, 0.0) + now - t0
            t0 = now
            if stop:
                break
            if done % cfg.save_every == 0 and done < stage.total:
                prog.step = done
                _save_state(out, model, heads, opt, prog)
        bar.close()
        for p in params:
            p.requires_grad_(False)
        prog.stage, prog.step = prog.stage + 1, 0
        prog.done = stop or prog.stage == len(cfg.stages)
        _save_state(out, model, heads, None, prog)
    _export_final(out, recipe, model, prog)
    return prog


def _export_final(out: Path, recipe: Recipe, model, prog: Progress) -> None:
    """The trained model as a transformers directory (config, fp32 safetensors, processor)."""
    model.eval()
    model.save_pretrained(out / "final", safe_serialization=True)
    recipe.build_processor().save_pretrained(out / "final")
    ck.write_json_atomic(asdict(prog), out / "final" / "training.json")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vlmscope.zoo.train",
                                     description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    run(parser.parse_args(argv))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", choices=[*RECIPES, "shapes-clip"])
    parser.add_argument("--out", required=True, help="run directory (resumes if it holds a state)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None,
                        help="instruction-tuning steps, or shapes-clip's steps (default: the recipe's)")
    parser.add_argument("--halt-at", type=int, default=None,
                        help="stop before this global step, as a kill would (resume later, e.g. with other --steps)")
    parser.add_argument("--recipe", choices=["deep", "position", "v1"], default=None,
                        help="shapes-clip only: train_clip.DEEP_RECIPE (the shipped model's, the default: v3, 4 "
                             "vision blocks), POSITION_RECIPE (v2: 3 blocks, 20,000 steps) or the first model's "
                             "ClipConfig() (7,000 steps; never learned position or background)")


def run(args: argparse.Namespace) -> Progress:
    """Train from parsed arguments on one torch thread (faster than two on a shared machine)."""
    torch.set_num_threads(1)
    if args.name == "shapes-clip":
        return _run_clip(args)
    if getattr(args, "recipe", None) is not None:
        raise InputError(f"--recipe {args.recipe} is a shapes-clip recipe; {args.name} has one recipe")
    recipe = RECIPES[args.name]
    cfg = replace(recipe.config, seed=args.seed)
    if args.steps is not None:
        last = replace(cfg.stages[-1], steps=args.steps, replan=None,
                       snapshots=tuple(s for s in cfg.stages[-1].snapshots if s < args.steps))
        cfg = replace(cfg, stages=(*cfg.stages[:-1], last))
    prog = train(args.out, cfg, halt_at=args.halt_at, recipe=recipe)
    print(json.dumps({"done": prog.done, "elapsed_s": round(prog.elapsed_s, 1), "accuracy": prog.accuracy}))
    return prog


def _run_clip(args: argparse.Namespace):
    from vlmscope.zoo import train_clip

    base = {"v1": train_clip.ClipConfig(), "position": train_clip.POSITION_RECIPE}.get(
        getattr(args, "recipe", None), train_clip.DEEP_RECIPE)
    cfg = replace(base, seed=args.seed)
    if args.steps is not None:
        cfg = replace(cfg, steps=args.steps, replan=None,
                      snapshots=tuple(s for s in cfg.snapshots if s < args.steps))
    prog = train_clip.train(args.out, cfg, halt_at=args.halt_at)
    print(json.dumps({"done": prog.done, "elapsed_s": round(prog.elapsed_s, 1), "accuracy": prog.accuracy}))
    return prog


if __name__ == "__main__":
    main()
