"""`vlmscope sae train | eval`: train SAEs on a model's activations (resumable), evaluate them.

    vlmscope sae train --model shapes-llava --site connector.out --arch topk --k 32 --out DIR
    vlmscope sae train --store STORE --site connector.out --out DIR     # from `vlmscope cache`
    vlmscope sae train ... --whiten 0.1 --restarts 8   # keep the best of 8 initialisations (held-out FVU)
    torchrun --nproc-per-node 4 -m vlmscope sae train ...              # DDP, same result as 1 process
    vlmscope sae eval DIR

`--site` and `--arch` repeat: every (site, architecture) pair is trained from the same forward
passes. Data: the shapes world's standard examples for zoo models (with their answers, so eval
reports answer accuracy recovered), the random processor-free inputs for tiny-llava / tiny-clip;
or an activation store's shards (`--store`). Under torchrun every rank trains its slice of each
global batch of `--batch-size` rows (see train.py); rank 0 writes the files.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RUN = "run.json"


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `sae train | eval` to the main CLI's subparsers; each sets `func(args) -> int`."""
    sae = subparsers.add_parser("sae", help="sparse autoencoders: train, evaluate")
    sub = sae.add_subparsers(dest="sae_command", required=True)
    tr = sub.add_parser("train", help="train SAEs on a model's activations (rerun to resume)")
    tr.add_argument("--model", default=None, help="zoo name, local folder, tiny-llava (default) or tiny-clip; "
                    "with --store, the model it was cached from (recorded in the SAEs' configs)")
    tr.add_argument("--store", default=None, help="train on this activation store (`vlmscope cache`) instead "
                    "of streaming from --model")
    tr.add_argument("--buffer-shards", type=int, default=8, help="--store: shards shuffled together")
    tr.add_argument("--device", default=None, help="where the SAEs train (default: the rank's GPU under "
                    "torchrun, else cpu)")
    tr.add_argument("--site", action="append", required=True, help="a (batch, pos, d) site; repeatable")
    tr.add_argument("--arch", action="append", choices=["relu", "topk", "batchtopk", "jumprelu"],
                    help="architecture; repeat for several (default topk)")
    tr.add_argument("--k", type=int, default=32, help="TopK / BatchTopK active latents")
    tr.add_argument("--d-sae", type=int, default=None, help="latents (default: expansion x d_in)")
    tr.add_argument("--expansion", type=int, default=8)
    tr.add_argument("--sparsity", type=float, default=None, help="ReLU L1 / JumpReLU L0 coefficient")
    tr.add_argument("--matryoshka", default="", help="nested prefix widths, e.g. 32,128 (Matryoshka SAE; "
                    "each prefix of the latents must also reconstruct)")
    tr.add_argument("--positions", default="image", help="token role that trains it: image, text or all")
    tr.add_argument("--examples", type=int, default=512, help="examples streamed through the model")
    tr.add_argument("--steps", type=int, default=2000)
    tr.add_argument("--batch-size", type=int, default=1024, help="activation rows per SAE step (over all ranks)")
    tr.add_argument("--lr", type=float, default=1e-3)
    tr.add_argument("--whiten", type=float, default=0.0, help="ZCA-whiten each site's rows first, regularised by "
                    "this x the mean eigenvalue (0: off); folded into the saved SAE")
    tr.add_argument("--model-batch-size", type=int, default=16, help="examples per forward")
    tr.add_argument("--chunk-examples", type=int, default=128, help="examples shuffled together")
    tr.add_argument("--checkpoint-every", type=int, default=200)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--restarts", type=int, default=1, help="train each SAE from this many initialisations in "
                    "the same pass and keep the one with the lowest FVU on held-out examples of --model "
                    "(seed + 1; whitened with --whiten); the kept one is saved under the plain name")
    tr.add_argument("--held-out-examples", type=int, default=64, help="--restarts: examples the FVU is read on")
    tr.add_argument("--out", required=True, help="run folder: checkpoints, one SAELens folder per SAE")
    tr.add_argument("--quiet", action="store_true", help="no progress bar")
    tr.set_defaults(func=cmd_train)
    ev = sub.add_parser("eval", help="reconstruction and spliced-in metrics of the SAEs in a folder")
    ev.add_argument("dir", help="a run folder from `sae train`, or one SAE folder")
    ev.add_argument("--model", default=None, help="default: the model the run was trained on")
    ev.add_argument("--examples", type=int, default=128)
    ev.add_argument("--seed", type=int, default=1, help="data seed (training used --seed, default 0)")
    ev.add_argument("--json", action="store_true", help="print only a JSON list on stdout")
    ev.set_defaults(func=cmd_eval)
    return sae


def _data(name: str, m, builder, n: int, seed: int):
    """(dataset, collate, with_answers): examples and how to batch them; with_answers(items) gives
    (inputs, answer ids) for zoo models and None otherwise."""
    if builder is not None:  # tiny test models: one random batch, sliced per example
        inputs = builder(m.model, n, seed=seed)

        def collate(idx):  # per-example tensors are sliced; others (CLIP's texts) are kept whole
            return {k: v[idx] if getattr(v, "shape", ())[:1] == (n,) else v for k, v in inputs.items()}
        return list(range(n)), collate, None
    from vlmscope.data import examples_batch, standard_examples

    def with_answers(examples):
        b = examples_batch(list(examples))
        x = b.inputs
        return {k: getattr(x, k) for k in ("input_ids", "attention_mask", "pixel_values")}, b.answers
    return standard_examples(seed, n), lambda exs: with_answers(exs)[0], with_answers


def cmd_train(args: argparse.Namespace) -> int:
    import torch

    from vlmscope.methods.sae.train import SAESpec, TrainConfig, train_saes
    from vlmscope.scale import distributed

    torch.set_num_threads(1)
    if args.restarts < 1:
        raise SystemExit(f"--restarts must be >= 1, got {args.restarts}")
    if args.restarts > 1 and args.store and not args.model:
        raise SystemExit("--restarts reads held-out rows from the model: give --model with --store")
    nest = tuple(int(w) for w in args.matryoshka.split(",") if w.strip())
    specs = [SAESpec(site, arch, d_sae=args.d_sae, expansion=args.expansion, k=args.k, sparsity=args.sparsity,
                     matryoshka=nest) for site in args.site for arch in (args.arch or ["topk"])]
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed, whiten=args.whiten,
                      checkpoint_every=args.checkpoint_every, warmup_steps=min(100, max(args.steps // 10, 1)))
    out = Path(args.out)
    with distributed.session() as d:
        model = _model(args, d) if not args.store or args.restarts > 1 else None
        src = _source(args, model)
        if d.main:
            out.mkdir(parents=True, exist_ok=True)
            run = {"model": args.model or ("" if args.store else "tiny-llava"), "positions": args.positions,
                   "seed": args.seed, "examples": args.examples} | ({"store": args.store} if args.store else {})
            (out / RUN).write_text(json.dumps(run))
        if args.restarts > 1:
            saes = _train_restarts(args, model, src, specs, cfg, out, d)
        else:
            saes = train_saes(src, specs, cfg, out_dir=out, progress=not args.quiet, device=args.device, dist=d)
    for name in saes if d.main else ():
        print(f"saved {out / name}")
    return 0


def _train_restarts(args: argparse.Namespace, model, src, specs, cfg, out: Path, d) -> dict:
    """Every spec --restarts times in one pass; the kept restart (lowest FVU on held-out examples of
    `model`) is copied to out/<name>/ and the scores saved as out/<name>-restarts/ (a Restarts result)."""
    import shutil

    import torch

    from vlmscope.methods.sae.restarts import train_restarts_many
    from vlmscope.methods.sae.sources import site_rows

    m, builder = model
    dataset, collate, _ = _data(args.model or "tiny-llava", m, builder, args.held_out_examples, args.seed + 1)
    held = [site_rows(m, collate(dataset[i:i + 16]), args.site, args.positions) for i in range(0, len(dataset), 16)]
    held_out = {s: torch.cat([h[s].float() for h in held]) for s in args.site}
    kept = train_restarts_many(src, specs, cfg, held_out, args.restarts, out_dir=out, progress=not args.quiet,
                               device=args.device, dist=d)
    if d.main:
        for label, (_, restarts) in kept.items():
            shutil.rmtree(out / label, ignore_errors=True)
            shutil.copytree(out / restarts.names[restarts.chosen], out / label)
            restarts.save(out / f"{label}-restarts")
            fvu = " ".join(f"{f:.4f}" for f in restarts.fvu.tolist())
            print(f"{label}: kept {restarts.names[restarts.chosen]} (held-out FVU of the restarts: {fvu})")
    return {label: sae for label, (sae, _) in kept.items()}


def _model(args: argparse.Namespace, d):
    """(model, inputs builder or None) of --model (default tiny-llava), on the rank's device."""
    from vlmscope.cli import _load

    m, builder = _load(args.model or "tiny-llava")
    if d.device != "cpu":
        m.model.to(d.device)
    return m, builder


def _source(args: argparse.Namespace, model):
    """The rows to train on: the store's shards, or `model` ((model, builder) from `_model`) streamed over the data."""
    from vlmscope.methods.sae.sources import ModelSource, StoreSource

    if args.store:
        return StoreSource(args.store, args.site, buffer_shards=args.buffer_shards, name=args.model or "")
    name = args.model or "tiny-llava"
    m, builder = model
    dataset, collate, _ = _data(name, m, builder, args.examples, args.seed)
    return ModelSource(m, dataset, args.site, positions=args.positions, collate=collate,
                       batch_size=args.model_batch_size, chunk_examples=args.chunk_examples, name=name)


def _sae_dirs(path: Path) -> list[Path]:
    if (path / "cfg.json").exists():
        return [path]
    found = sorted(p.parent for p in path.glob("*/cfg.json"))
    if not found:
        raise SystemExit(f"{path} holds no SAE (no cfg.json in it or its sub-folders)")
    return found


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from vlmscope.cli import _load
    from vlmscope.methods.sae.evaluate import evaluate_sae
    from vlmscope.methods.sae.io import load_sae

    torch.set_num_threads(1)
    root = Path(args.dir)
    dirs = _sae_dirs(root)
    run_file = next((p / RUN for p in (root, root.parent) if (p / RUN).exists()), None)
    run = json.loads(run_file.read_text()) if run_file else {}
    name = args.model or run.get("model") or load_sae(dirs[0]).cfg.model
    if not name:
        raise SystemExit("which model? give --model (the SAE folder does not say)")
    m, builder = _load(name)
    dataset, collate, with_answers = _data(name, m, builder, args.examples, args.seed)
    step = 16
    chunks = [dataset[i:i + step] for i in range(0, len(dataset), step)]
    batches = [with_answers(c) if with_answers else collate(c) for c in chunks]
    rows = []
    for d in dirs:
        sae = load_sae(d)
        result = evaluate_sae(sae, m, batches)
        result.save(d / "eval")
        rows.append({"sae": d.name, **result.to_dataframe().iloc[0].to_dict()})
        if not args.json:
            print(f"{d.name}: {result!r}")
            print(f"  L0 {result.l0:.2f}  EV {result.explained_variance:.4f}  MSE {result.mse:.3g}  dead "
                  f"{result.dead_fraction:.3f}  dense {result.dense_fraction:.3f}")
            print(f"  CE clean {result.ce_clean:.4f}  sae {result.ce_sae:.4f}  zero {result.ce_zero:.4f}  "
                  f"loss recovered {result.loss_recovered:.4f}  "
                  f"accuracy recovered {result.accuracy_recovered:.4f}")
    if args.json:
        print(json.dumps(rows, default=float))
    return 0
