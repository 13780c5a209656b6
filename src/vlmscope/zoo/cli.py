"""`vlmscope zoo ...`: list the shipped models, evaluate one, or train one (resumable)."""

from __future__ import annotations

import argparse
import json


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `zoo list | eval | train` to the main CLI's subparsers; each sets `func(args) -> int`."""
    from vlmscope.zoo import train as train_mod

    zoo = subparsers.add_parser("zoo", help="the built-in trained models")
    sub = zoo.add_subparsers(dest="zoo_command", required=True)
    sub.add_parser("list", help="names, classes, sizes, accuracies").set_defaults(func=cmd_list)
    ev = sub.add_parser("eval", help="accuracy per question family (shapes-clip: zero-shot colour / shape /"
                        " position / background and caption retrieval) on fresh examples of a seed")
    ev.add_argument("name")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--n", type=int, default=600)
    ev.add_argument("--step", type=int, default=None, help="a checkpoint along training (default: final)")
    ev.add_argument("--json", action="store_true", help="print only a JSON object on stdout")
    ev.set_defaults(func=cmd_eval)
    tr = sub.add_parser("train", help="train a zoo model from scratch (resumes from --out)")
    train_mod.add_arguments(tr)
    tr.set_defaults(func=lambda args: 0 if train_mod.run(args).done else 1)
    return zoo


def cmd_list(args: argparse.Namespace) -> int:
    from vlmscope.zoo import card, names

    for name in names():
        c = card(name)
        scores = c["accuracy"]["per_family" if "per_family" in c["accuracy"] else "metrics"]  # a dual encoder
        acc = " ".join(f"{k} {v:.3f}" for k, v in scores.items())
        size = f"{c['parameters'] / 1e6:.2f}M params  {c['size_mb']:.1f} MB"
        print(f"{name:16s} {c['class']:32s} {size}  {acc}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from vlmscope.zoo import evaluate

    torch.set_num_threads(1)
    acc = evaluate(args.name, seed=args.seed, n=args.n, step=args.step)
    if args.json:
        print(json.dumps({"model": args.name, "seed": args.seed, "n": args.n, "accuracy": acc}))
    else:
        print(f"{args.name} seed {args.seed}, {args.n} examples")
        for family, value in acc.items():
            print(f"  {family:13s} {value:.3f}")
    return 0
