"""Export a finished training run into the package (zoo/models/NAME/): the fp32 transformers
checkpoint and processor, a chosen subset of the fp16 snapshots (within the size budget), and the
model card (card.json + card.md) with held-out accuracy measured on a fresh seed.

    python -m vlmscope.zoo.export runs/shapes-llava --seed 2024 --n 1000
    python -m vlmscope.zoo.export runs/shapes-clip --name shapes-clip --seed 2024 --n 1000
    python -m vlmscope.zoo.export runs/shapes-blip2 --name shapes-blip2 --seed 2024 --n 1000
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from vlmscope.zoo.card import generative_card, render_card_md, render_clip_card_md, shapes_clip_card
from vlmscope.zoo.checkpoint import read_index, write_json_atomic
from vlmscope.zoo.evaluate import evaluate
from vlmscope.zoo.registry import MODELS
from vlmscope.zoo.shapes_llava import NAME

FINAL_FILES = ("config.json", "generation_config.json", "model.safetensors", "processor_config.json",
               "tokenizer.json", "tokenizer_config.json")
CLIP_FILES = ("config.json", "model.safetensors", "processor_config.json", "tokenizer.json",
              "tokenizer_config.json")


def choose_snapshots(index: list[dict], max_instruct: int, stage_ends: bool = False) -> list[dict]:
    """Every snapshot of the earlier stages (with `stage_ends`, only the init and each stage's last)
    plus up to `max_instruct` of the last stage spread evenly over it (its last one is the final
    model, shipped in fp32 instead)."""
    last = "contrastive" if index and index[-1]["stage"] == "contrastive" else "instruct"  # shapes-clip
    fixed = [e for e in index if e["stage"] != last]
    if stage_ends:
        fixed = [e for i, e in enumerate(fixed) if i == 0 or i + 1 == len(fixed) or fixed[i + 1]["stage"] != e["stage"]]
    inst = [e for e in index if e["stage"] == last][:-1]
    if len(inst) > max_instruct:
        picks = {round(i * (len(inst) - 1) / max(1, max_instruct - 1)) for i in range(max_instruct)}
        inst = [inst[i] for i in sorted(picks)]
    return fixed + inst


def export(run: Path, seed: int, n: int, max_instruct: int = 5, name: str = NAME, note: str = "",
           stage_ends: bool = False) -> Path:
    """Copy a finished run into the package and write its card (with `note` on how the run went, e.g.
    a resumption with another schedule); returns the model folder."""
    final = run / "final"
    if not (final / "model.safetensors").exists():
        raise FileNotFoundError(f"{final} holds no model.safetensors: the run in {run} has not finished")
    dest = MODELS / name
    if dest.exists():
        shutil.rmtree(dest)
    (dest / "checkpoints").mkdir(parents=True)
    clip = name == "shapes-clip"
    for f in sorted(final.iterdir()):  # config, fp32 weights, processor and tokenizer files
        if f.is_file() and f.name != "training.json":
            shutil.copyfile(f, dest / f.name)
    index = read_index(run / "checkpoints")
    chosen = choose_snapshots(index, max_instruct, stage_ends)
    for e in chosen:
        shutil.copyfile(run / "checkpoints" / e["file"], dest / "checkpoints" / e["file"])
    write_json_atomic(chosen, dest / "checkpoints" / "index.json")
    training = json.loads((final / "training.json").read_text())
    from vlmscope.zoo.registry import CLASSES

    model_cls = CLASSES[json.loads((final / "config.json").read_text())["architectures"][0]][0]
    model = model_cls.from_pretrained(final, local_files_only=True, use_safetensors=True)
    acc = evaluate(model, seed=seed, n=n)
    config = json.loads((run / "config.json").read_text())
    common = dict(final_step=index[-1]["step"], snapshot_steps=[e["step"] for e in chosen])
    if clip:
        card = shapes_clip_card(model, training, config, acc, seed, n, **common)
    else:
        from vlmscope.zoo.recipes import RECIPES

        card = generative_card(model, training, config, acc, seed, n, **common, name=name,
                               parts=RECIPES[name].parts)
        card["findings"] = scene_findings(model, final, seed)
    card["recipe"]["note"] = note
    write_json_atomic(card, dest / "card.json")  # size first measured without the card files
    card["size_mb"] = round(sum(p.stat().st_size for p in dest.rglob("*") if p.is_file()) / 2**20, 2)
    write_json_atomic(card, dest / "card.json")
    (dest / "card.md").write_text((render_clip_card_md if clip else render_card_md)(card))
    return dest


def scene_findings(model, folder: Path, seed: int, n: int = 600) -> list[str]:
    """The card's evidence of what survives each part: the scene probe (what is at each cell, read
    from all of a part's image tokens) for colour, shape and object presence at the end of the tower,
    the connector and the LM."""
    import transformers

    from vlmscope.experiments.scene_probe import scene_traces
    from vlmscope.model.load import load

    vlm = load(model, transformers.AutoProcessor.from_pretrained(folder, local_files_only=True))
    lines = []
    for attribute, (trace, _) in scene_traces(vlm, ("colour", "shape", "object"), n=n, seed=seed).items():
        ends = [trace.last_of(part) for part in ("vision", "connector", "lm")]
        lines.append(f"Scene probe, {attribute} at each cell ({n} scenes, seed {seed}): "
                     + ", ".join(f"{trace.sites[i]} {float(trace.score[i]):.2f}" for i in ends)
                     + f"; largest fall after {trace.drop_after} ({trace.drop:.2f}).")
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m vlmscope.zoo.export", description=__doc__.split("\n\n")[0])
    p.add_argument("run")
    p.add_argument("--seed", type=int, default=2024)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--name", default=NAME, help="the zoo name to export as (shapes-llava, shapes-blip2, ...)")
    p.add_argument("--max-instruct", type=int, default=5,
                   help="snapshots kept from the last stage (shapes-clip: its only stage)")
    p.add_argument("--note", default="", help="how the run went, for the card (e.g. a resumption)")
    p.add_argument("--stage-ends-only", action="store_true",
                   help="of the earlier stages keep only the init and each stage's last snapshot (smaller)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    dest = export(Path(args.run), args.seed, args.n, args.max_instruct, name=args.name, note=args.note,
                  stage_ends=args.stage_ends_only)
    print(json.dumps(json.loads((dest / "card.json").read_text())["accuracy"]))


if __name__ == "__main__":
    main()
