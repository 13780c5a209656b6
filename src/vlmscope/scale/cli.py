"""`vlmscope plan MODEL ...`: the memory a job will need, planned on the meta device in seconds."""

from __future__ import annotations

import argparse

from vlmscope.scale.jobs import METHODS

DTYPES = ("float32", "bfloat16", "float16")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `plan` to the main CLI's subparsers; it sets `func(args) -> int`."""
    p = subparsers.add_parser("plan", help="plan a job's peak memory without loading the weights")
    p.add_argument("model", help="a checkpoint folder, its config.json, or zoo:NAME")
    p.add_argument("--method", choices=METHODS, default="cache")
    p.add_argument("--batch-size", type=int, default=1,
                   help="examples per forward (patch: patched copies of one pair per forward)")
    p.add_argument("--image-size", type=int, default=None, help="pixels a side (families that take any size)")
    p.add_argument("--text-len", type=int, default=16, help="text tokens per example")
    p.add_argument("--sites", nargs="+", default=None, help="site names or globs (default: LM resid_post)")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="of the weights (default: the config's)")
    p.add_argument("--budget", type=float, default=None, help="GiB available: say whether it fits and the "
                   "largest batch that does")
    p.set_defaults(func=cmd_plan)
    return p


def cmd_plan(args: argparse.Namespace) -> int:
    import torch

    from vlmscope.scale.plan import GiB, plan_memory, size

    torch.set_num_threads(1)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    plan = plan_memory(args.model, args.method, args.batch_size, image_size=args.image_size,
                       text_len=args.text_len, sites=args.sites, dtype=dtype)
    print(plan)
    if args.budget is None:
        return 0
    budget = int(args.budget * GiB)
    fits = plan.peak <= budget
    print(f"budget {size(budget)}: {'fits' if fits else 'does not fit'}; largest batch that fits: "
          f"{plan.suggest_batch_size(budget)}")
    return 0 if fits else 1
