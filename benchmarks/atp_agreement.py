"""How well attribution patching tracks exact activation patching on shapes-llava, and at what speed.

For STR pairs (one question word swapped) and SIP pairs (one object of the image changed), the
exact `patch_sweep` and each estimate (`attribution_patching` with method "atp", "atp*" and "ig"
at several step counts) cover the same grid: lm.blocks.*.{resid_post,attn.out,mlp.out} x every
position, denoising, logit difference between the clean and the corrupt answer. The table gives
Pearson r per site type (as `compare` computes it), r of the magnitudes (AtP* ranks by |effect|),
the best-of-`--repeats` time of each, and exact time / estimate time. One torch thread.

    python benchmarks/atp_agreement.py [--pairs 16] [--steps 1,4,8] [--repeats 3] [--sites GLOB,GLOB,...]

The exact sweep's cost grows with the grid (sites x positions), the estimates' does not: a larger
`--sites` list (e.g. every per-position LM site) shows how the speed ratio scales.
"""

from __future__ import annotations

import argparse
import time

import torch

from vlmscope import zoo
from vlmscope.methods.attribution import attribution_patching, compare
from vlmscope.methods.metrics import logit_diff
from vlmscope.methods.patching import patch_sweep
from vlmscope.zoo import truth

SITES = ["lm.blocks.*.resid_post", "lm.blocks.*.attn.out", "lm.blocks.*.mlp.out"]


def pairs_of(vlm, kind: str, n: int, seed: int):
    clean, corrupt, good, bad = truth.pair_inputs(vlm, seed, n, kind)
    return clean, corrupt, logit_diff(good, bad)


def best_time(repeats: int, fn, *args, **kwargs):
    """(fn's result, fastest of `repeats` wall times): the machine is shared, the minimum is the signal."""
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn(*args, **kwargs)
        times.append(time.perf_counter() - t)
    return out, min(times)


def magnitude_r(exact, approx) -> float:
    a, b = exact.effect.flatten().abs(), approx.effect.flatten().abs()
    ok = ~(a.isnan() | b.isnan())
    return float(torch.corrcoef(torch.stack([a[ok], b[ok]]))[0, 1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="shapes-llava")
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", default="1,4,8", help="integrated-gradient step counts, comma-separated")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sites", default=",".join(SITES), help="site globs, comma-separated")
    args = ap.parse_args()
    sites = args.sites.split(",")
    kinds = list(dict.fromkeys(".".join(s.split(".")[3:]) or s for s in sites)) + ["all"]
    torch.set_num_threads(1)
    vlm = zoo.load(args.model)
    variants = [("atp", 1), ("atp*", 1)] + [("ig", int(k)) for k in args.steps.split(",")]
    print(f"{args.model}, {args.pairs} pairs per kind, sites {', '.join(sites)} x every position, "
          f"best of {args.repeats}\n")
    print(f"| pairs | method | {' | '.join('r ' + k for k in kinds)} | r abs(all) | time s | exact / this |")
    print("|---|---|" + "---|" * (len(kinds) + 3))
    for kind in ("str", "sip"):
        clean, corrupt, metric = pairs_of(vlm, kind, args.pairs, args.seed)
        exact, t_exact = best_time(args.repeats, patch_sweep, vlm, clean, corrupt, metric, sites=sites)
        print(f"| {kind} | exact | " + " | ".join("1" for _ in kinds) + f" | 1 | {t_exact:.3f} | 1 |")
        for method, steps in variants:
            est, t = best_time(args.repeats, attribution_patching, vlm, clean, corrupt, metric, sites=sites,
                               method=method, steps=steps)
            r = compare(exact, est).pearson
            name = f"ig k={steps}" if method == "ig" else method
            print(f"| {kind} | {name} | " + " | ".join(f"{r[k]:.3f}" for k in kinds)
                  + f" | {magnitude_r(exact, est):.3f} | {t:.3f} | {t_exact / t:.1f} |")


if __name__ == "__main__":
    main()
