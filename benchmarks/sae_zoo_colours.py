"""Colour concept F1 of SAEs on shapes-llava's image patches (issue #9's zoo check), per setup.

Each row runs `grounded.sae_concepts` (TopK SAE, 64 latents, image patches of n scenes, 80/20
split; for each colour the best single feature's F1 for "the object at this patch has that colour",
background patches as negatives) and prints the F1 per colour. The setups match rows of the
table in docs/sae.md ("Colour concept F1 on shapes-llava"): today's default, the same with k = 10
on 20,000 scenes, that with the rows ZCA-whitened first (`TrainConfig.whiten`), that trained
for 20,000 steps, and a whitened Matryoshka SAE of 128 latents whose first 32 must reconstruct alone
(all at the last vision block); and the recipe that captures all six colours: `connector.out`,
whitened, k 6, 64 or 48 latents, the best of 8 restarts by held-out FVU (~2.5 min a seed).

    python benchmarks/sae_zoo_colours.py --seeds 0,1              # 7 setups x 2 seeds, ~30 min on one core
    python benchmarks/sae_zoo_colours.py --setups connector-restarts --seeds 0,1,2,3,4,5 --out colours.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

SETUPS = {
    "default": {"k": 4, "n": 1500, "steps": 800, "whiten": 0.0},
    "k10-20k": {"k": 10, "n": 20000, "steps": 6000, "whiten": 0.0},
    "whitened": {"k": 10, "n": 20000, "steps": 6000, "whiten": 0.1},
    "whitened-long": {"k": 10, "n": 20000, "steps": 20000, "whiten": 0.1},
    "matryoshka": {"k": 10, "n": 20000, "steps": 6000, "whiten": 0.1, "d_sae": 128, "matryoshka": (32,)},
    "connector-restarts": {"site": "connector.out", "k": 6, "n": 20000, "steps": 6000, "whiten": 0.1, "restarts": 8},
    "connector-restarts-48": {"site": "connector.out", "k": 6, "d_sae": 48, "n": 20000, "steps": 6000, "whiten": 0.1,
                              "restarts": 8},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--setups", default=",".join(SETUPS), help=f"comma-separated, of: {', '.join(SETUPS)}")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from vlmscope import zoo
    from vlmscope.experiments import grounded

    vlm = zoo.load("shapes-llava")
    rows = []
    for name in args.setups.split(","):
        if name not in SETUPS:
            raise SystemExit(f"unknown setup {name!r}; valid: {', '.join(SETUPS)}")
        for seed in (int(s) for s in args.seeds.split(",")):
            t = time.time()
            _, colour, shape, scores = grounded.sae_concepts(vlm, seed=seed, **SETUPS[name])
            row = {"setup": name, **SETUPS[name], "seed": seed, "seconds": round(time.time() - t, 1),
                   "restart kept": scores.get("restart kept"),
                   "colour": dict(zip(colour.concepts, colour.best_f1.tolist(), strict=True)),
                   "mean colour F1": float(colour.best_f1.mean()), "mean shape F1": float(shape.best_f1.mean()),
                   "uncaptured colours": list(colour.uncaptured)}
            rows.append(row)
            f1 = " ".join(f"{c} {v:.2f}" for c, v in row["colour"].items())
            print(f"{name:9s} seed {seed}: {f1} | mean {row['mean colour F1']:.3f} ({row['seconds']} s)", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
