"""The `vlmscope` command line. Thin: it parses flags, calls the library and prints."""

from __future__ import annotations

import argparse
import sys


def _load(name: str | None):
    import vlmscope as vs
    from vlmscope import testing

    if name in (None, "tiny-llava"):
        return vs.load(testing.tiny_llava()), testing.llava_inputs
    if name == "tiny-clip":
        return vs.load(testing.tiny_clip()), testing.clip_inputs
    return vs.load(name if (":" in name or "/" in name or "." in name) else f"zoo:{name}"), None


def cmd_sites(args) -> int:
    m, _ = _load(args.model)
    for name in m.sites(args.pattern):
        spec = m.site(name)
        print(f"{name:40s} {spec.layout}")
    return 0


def cmd_cache(args) -> int:
    """Activations at sites over the shapes world (random inputs for tiny models) to a store folder;
    under torchrun every rank caches its share of the batches (model/store.py)."""
    import torch

    from vlmscope.methods.sae.cli import _data
    from vlmscope.model.store import cache_dataset
    from vlmscope.scale import distributed

    torch.set_num_threads(1)
    with distributed.session() as d:
        m, builder = _load(args.model)
        if d.device != "cpu":
            m.model.to(d.device)
        dataset, collate, _ = _data(args.model, m, builder, args.examples, args.seed)
        store = cache_dataset(m, dataset, args.site, args.out, batch_size=args.batch_size, positions=args.positions,
                              dtype=getattr(torch, args.dtype) if args.dtype else None, collate=collate,
                              progress=not args.quiet, dist=d)
    if d.main:
        print(f"wrote {len(store.shard_files())} shards of {args.examples} examples ({', '.join(store.sites)}) "
              f"to {store.path}")
    return 0


def cmd_quickstart(args) -> int:
    """Load a model, list its sites, cache one activation and check hooked == plain."""
    import torch

    torch.set_num_threads(1)
    m, make_inputs = _load(args.model)
    print(m)
    print(f"{len(m.sites())} sites, e.g.: {', '.join(m.sites('*.blocks.0.*')[:4])} ...")
    inputs = make_inputs(m.model) if make_inputs else m.prepare(*_zoo_example(m))
    out, cache = m.run_with_cache(inputs, args.site)
    with torch.no_grad():
        plain = m.model(**inputs)
    key = "logits" if "logits" in out else "logits_per_image"
    pos = m.positions(inputs)
    for site in cache:
        t = cache[site]
        print(f"{site}: shape {tuple(t.shape)} ({cache.layouts[site]}), mean {t.float().mean():+.4f}, "
              f"std {t.float().std():.4f}")
    first = next(iter(pos.values()))
    print(f"positions of example 0 ({first.stream}): {' '.join(first.roles(0))}")
    print(f"hooked == plain: {torch.equal(out[key], plain[key])}")
    return 0


def _save(out: str, name: str, result, scores: dict | None = None, fig=None) -> None:
    import json
    from pathlib import Path

    folder = Path(out) / name
    result.save(folder)
    if fig is not None:
        fig.savefig(folder / "figure.png", dpi=120)
    if scores is not None:
        (folder / "scores.json").write_text(json.dumps(scores, indent=1))
        for k, v in scores.items():
            print(f"  {k}: {v:.3f}" if isinstance(v, float) else f"  {k}: {v}")
    print(f"wrote {folder}")


def cmd_probe(args) -> int:
    from vlmscope.experiments.grounded import where_is_it_lost

    m, _ = _load(args.model)
    trace, grid, scores = where_is_it_lost(m, args.attribute, n=args.n, seed=args.seed)
    print(f"{args.attribute}: largest fall after {trace.drop_after} ({trace.drop:.3f})")
    _save(args.out, f"probe-{args.attribute}", trace, scores, trace.plot() if hasattr(trace, "plot") else None)
    return 0


def cmd_lens(args) -> int:
    from vlmscope.experiments.grounded import lens_word_accuracy

    m, _ = _load(args.model)
    result, scores = lens_word_accuracy(m, n=args.n, seed=args.seed)
    for k, v in scores.items():
        print(f"  {k}: " + " ".join(f"{x:.2f}" for x in v))
    _save(args.out, "lens", result, None, result.plot())
    return 0


def cmd_patch(args) -> int:
    from vlmscope.experiments.grounded import sip_localisation

    m, _ = _load(args.model)
    result, scores = sip_localisation(m, n_pairs=args.n, seed=args.seed, sites=args.sites)
    _save(args.out, "patching", result, scores)
    return 0


def cmd_knockout(args) -> int:
    from vlmscope.experiments.grounded import image_flow_knockout

    m, _ = _load(args.model)
    logit, acc, scores = image_flow_knockout(m, n=args.n, seed=args.seed, window=args.window)
    _save(args.out, "knockout", logit, scores)
    return 0


def cmd_demo(args) -> int:
    from vlmscope.experiments.demo import run_demo

    run_demo(args.out, model=args.model, seed=args.seed)
    return 0


def cmd_report(args) -> int:
    from vlmscope.report.html import build_report

    print(build_report(args.results))
    return 0


def cmd_serve(args) -> int:
    """The local web app on one model (bound to 127.0.0.1 unless --host says otherwise)."""
    import torch

    torch.set_num_threads(1)
    try:
        import multipart  # noqa: F401  (uploads)
        import uvicorn

        from vlmscope.report.app import create_app, load_sae_or_none
    except ImportError as e:
        print(f"vlmscope serve needs FastAPI, uvicorn and python-multipart ({e.name} is missing): "
              "pip install 'vlmscope[app]'", file=sys.stderr)
        return 2
    m, _ = _load(args.model)
    sae, why = load_sae_or_none(args.sae)
    print(f"{m}\nSAE panel: {why if sae is None else sae}")
    print(f"serving on http://{args.host}:{args.port} (Ctrl-C stops)", flush=True)
    uvicorn.run(create_app(m, sae), host=args.host, port=args.port, log_level="warning")
    return 0


def cmd_run(args) -> int:
    from vlmscope.experiments.run import run_experiment
    from vlmscope.experiments.spec import load_experiment

    exp = load_experiment(args.experiment)
    if args.model:
        from dataclasses import replace

        exp = replace(exp, model=args.model)
    print(run_experiment(exp, args.out) / "index.html")
    return 0


def cmd_compare(args) -> int:
    from vlmscope.experiments.across import compare
    from vlmscope.experiments.spec import Experiment, load_experiment, method

    exp = load_experiment(args.experiment) if args.experiment else Experiment(methods=(method("probe"),))
    result = compare(args.models, exp)
    for line in result.statements:
        print(line)
    _save(args.out, "compare", result, None, result.plot())
    _study(args.out, "compare", f"{', '.join(args.models)}", "Across models",
           "Results aligned by part (vision / connector / LM) and relative depth. "
           + (" ".join(f"{line}." for line in result.statements) or "No difference above the threshold."))
    return 0


def _study(out: str, key: str, label: str, title: str, reading: str) -> None:
    from vlmscope.report.html import write_study

    print(write_study(out, label, [{"key": key, "title": title, "reading": reading}]))


def cmd_over_training(args) -> int:
    from vlmscope.experiments.across import over_training
    from vlmscope.experiments.spec import Experiment, load_experiment, method

    if args.experiment and args.method:
        raise SystemExit("give --experiment or --method, not both")
    kinds = args.method or []
    exp = load_experiment(args.experiment) if args.experiment else Experiment(
        model=args.model, methods=tuple(method(k) for k in kinds) or (method("probe", attribute="cell", n=200),))
    result = over_training(args.checkpoints or args.model, exp, n_eval=args.n)
    print("\n".join(result.timeline() + ["", "aligned:"] + result.alignments()))
    _save(args.out, "over-training", result, None, result.plot())
    _study(args.out, "over-training", result.model, "Across training checkpoints",
           f"Phase changes (a jump of at least {result.threshold} between checkpoints), in order: "
           + ("; ".join(result.timeline()) or "none") + ". Lined up: " + ("; ".join(result.alignments()) or "none")
           + ".")
    return 0


def cmd_micro_macro(args) -> int:
    from vlmscope.experiments.micro_macro import micro_to_macro
    from vlmscope.zoo import load

    vlms, names = [], []
    for spec in args.models:
        name, _, step = spec.partition("@")
        vlms.append(load(name, step=int(step) if step else None))
        names.append(spec)
    result = micro_to_macro(vlms, names, n=args.n, seed=args.seed)
    for line in result.statements:
        print(line)
    _save(args.out, "micro-macro", result, None, result.plot())
    _study(args.out, "micro-macro", " vs ".join(names), "Micro to macro: why the accuracies differ",
           " ".join(f"{line}." for line in result.statements) or "No family's accuracy differs by the margin.")
    return 0


def _zoo_example(m):
    from vlmscope.data import example_batch  # provided by the shapes world

    return example_batch(2)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlmscope", description="Mechanistic interpretability for VLMs.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("sites", help="list a model's hook sites")
    s.add_argument("--model", default=None, help="zoo name, local checkpoint folder, tiny-llava or tiny-clip")
    s.add_argument("--pattern", default=None, help="glob over site names, e.g. 'lm.blocks.*.resid_post'")
    s.set_defaults(func=cmd_sites)
    k = sub.add_parser("cache", help="store a model's activations at sites on disk (torchrun: one share per rank)")
    k.add_argument("--model", default="tiny-llava", help="zoo name, local checkpoint folder, tiny-llava or tiny-clip")
    k.add_argument("--site", action="append", required=True, help="site name or glob; repeatable")
    k.add_argument("--positions", default="image", help="token role kept: image, text, all, last")
    k.add_argument("--examples", type=int, default=512, help="the shapes world's standard examples (zoo models)")
    k.add_argument("--batch-size", type=int, default=16, help="examples per forward and per shard")
    k.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="stored dtype")
    k.add_argument("--seed", type=int, default=0, help="data seed")
    k.add_argument("--out", required=True, help="store folder (rerun to resume)")
    k.add_argument("--quiet", action="store_true", help="no progress bar")
    k.set_defaults(func=cmd_cache)
    q = sub.add_parser("quickstart", help="load a model, print its sites and a cached activation")
    q.add_argument("--model", default="tiny-llava")
    q.add_argument("--site", default="lm.blocks.0.resid_post")
    q.set_defaults(func=cmd_quickstart)
    d = sub.add_parser("demo", help="run the five method families on the zoo and write a report")
    d.add_argument("--out", default="vlmscope-demo")
    d.add_argument("--model", default="shapes-llava")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=cmd_demo)
    e = sub.add_parser("run", help="run an experiment file (TOML) and write its results and report")
    e.add_argument("experiment")
    e.add_argument("--model", default=None, help="override the file's model")
    e.add_argument("--out", default="vlmscope-out")
    e.set_defaults(func=cmd_run)
    c = sub.add_parser("compare", help="one experiment across several models, aligned by part and depth")
    c.add_argument("--models", nargs="+", required=True)
    c.add_argument("--experiment", default=None)
    c.add_argument("--out", default="vlmscope-out")
    c.set_defaults(func=cmd_compare)
    o = sub.add_parser("over-training", help="an experiment on every zoo checkpoint, with phase changes")
    o.add_argument("--model", default="shapes-llava")
    o.add_argument("--checkpoints", nargs="+", default=None,
                   help="your own checkpoint folders (named with their step, e.g. checkpoint-500), not a zoo model")
    o.add_argument("--experiment", default=None)
    o.add_argument("--method", action="append", default=None, metavar="KIND",
                   help="a method kind with its default options, instead of --experiment (repeatable; e.g. textspan "
                   "on shapes-clip; default: a probe of cell)")
    o.add_argument("--n", type=int, default=300, help="examples per accuracy evaluation")
    o.add_argument("--out", default="vlmscope-out")
    o.set_defaults(func=cmd_over_training)
    mm = sub.add_parser("micro-macro", help="tie per-family accuracy differences between models to what their "
                        "parts represent (scene probes per part)")
    mm.add_argument("--models", nargs="+", default=["shapes-llava@7800", "shapes-llava-contrastive"],
                    help="zoo names, NAME@STEP for a checkpoint (default: the tower-objective pair at 7,000 "
                    "instruction steps each)")
    mm.add_argument("--n", type=int, default=600)
    mm.add_argument("--seed", type=int, default=0)
    mm.add_argument("--out", default="vlmscope-out")
    mm.set_defaults(func=cmd_micro_macro)
    r = sub.add_parser("report", help="build index.html from a saved results folder")
    r.add_argument("results")
    r.set_defaults(func=cmd_report)
    w = sub.add_parser("serve", help="a local web app: ask a model about an image and look inside")
    w.add_argument("--model", default="shapes-llava", help="zoo name or local checkpoint folder")
    w.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    w.add_argument("--port", type=int, default=8000)
    w.add_argument("--sae", default=None, help="an SAE folder (cfg.json + sae_weights.safetensors) for the "
                   "feature panel")
    w.set_defaults(func=cmd_serve)
    for name, fn, helptext, extra in (
        ("probe", cmd_probe, "where a concept is decodable and where it is lost (zoo ground truth)",
         [("--attribute", dict(default="colour", choices=["colour", "shape", "size", "cell"]))]),
        ("lens", cmd_lens, "logit lens over image and text tokens, scored by patch words", []),
        ("patch", cmd_patch, "SIP activation patching over layer x image patch, scored by the changed object",
         [("--sites", dict(default="lm.blocks.*.resid_post"))]),
        ("knockout", cmd_knockout, "image->last attention knockout windows and their accuracy",
         [("--window", dict(type=int, default=1))]),
    ):
        c = sub.add_parser(name, help=helptext)
        c.add_argument("--model", default="shapes-llava", help="zoo name or local checkpoint folder")
        c.add_argument("--n", type=int, default={"probe": 300, "lens": 60, "patch": 8, "knockout": 120}[name])
        c.add_argument("--seed", type=int, default=0)
        c.add_argument("--out", default="vlmscope-out")
        for flag, kw in extra:
            c.add_argument(flag, **kw)
        c.set_defaults(func=fn)
    from vlmscope.methods.sae.cli import add_parser as add_sae

    add_sae(sub)
    from vlmscope.methods.explain.cli import add_parser as add_explain

    add_explain(sub)
    from vlmscope.scale.cli import add_parser as add_plan

    add_plan(sub)
    try:
        from vlmscope.zoo.cli import add_parser as add_zoo
    except ImportError:
        add_zoo = None
    if add_zoo is not None:
        add_zoo(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
