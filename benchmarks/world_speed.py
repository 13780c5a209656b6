"""Images per second of the shapes world's renderer (scene + mask), one thread.

    python benchmarks/world_speed.py [--n 2000]
(A benchmark, not a test: timings jitter on a shared machine.)"""

import argparse
import time

import torch

from vlmscope.data.render import render_with_mask
from vlmscope.data.sampling import standard_examples

if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=2000)
    args = p.parse_args()
    torch.set_num_threads(1)
    examples = standard_examples(5, args.n)
    t0 = time.perf_counter()
    for e in examples:
        render_with_mask(e.scene)
    print(f"{args.n / (time.perf_counter() - t0):.0f} images/s (render + object mask)")
