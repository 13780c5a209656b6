"""`vlmscope explain features | neurons | modality | textspan | patchscope | verify | tuning | words`: automated
explanation from the command line.

    vlmscope explain features --model shapes-llava --sae DIR --site connector.out --out OUT
    vlmscope explain neurons --model shapes-llava --out OUT
    vlmscope explain modality --model shapes-llava
    vlmscope explain textspan --model shapes-clip
    vlmscope explain patchscope --model shapes-llava
    vlmscope explain words --model shapes-llava --sae DIR --feature 3 --feature 7
    vlmscope explain tuning --model shapes-llava --sae DIR --feature 58 --feature 44

Results are saved as result folders under --out (`vlmscope report` draws them); a summary is
printed. Everything runs offline; `--llm-url` (off by default) sends each feature's evidence to an
OpenAI-compatible endpoint and prints the prompt it sent.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `explain features | neurons | ... | verify | words` to the main CLI's subparsers; each sets
    `func(args) -> int`."""
    ex = subparsers.add_parser("explain", help="automated explanation of SAE features, neurons and words")
    sub = ex.add_subparsers(dest="explain_command", required=True)
    f = sub.add_parser("features", help="dissection labels, simulation scores and verification of SAE features")
    f.add_argument("--model", default="shapes-llava", help="zoo name or local folder")
    f.add_argument("--sae", required=True, help="an SAE folder (save_sae / SAELens)")
    f.add_argument("--site", default=None, help="default: the SAE's own site")
    f.add_argument("--n-features", type=int, default=50)
    f.add_argument("--examples", type=int, default=300)
    f.add_argument("--length", type=int, default=3,
                   help="longest label formula in concepts (Mu & Andreas); 1: single concepts (Bau et al.)")
    f.add_argument("--levels", default=None,
                   help="shares of its peak each feature is dissected at (default zoo_features.LEVELS: 0.1,0.25,0.4,"
                   "0.55); it is labelled at the one its label fits best and verified there. 'quantile': its top "
                   "20%% of patches instead (Bau et al.)")
    f.add_argument("--seen", choices=["auto", "on", "off"], default="auto",
                   help="concepts of what earlier image tokens show (seen_colour=red, seen=none); auto: at "
                        "language-model sites, which read the image tokens in order")
    f.add_argument("--refine", type=int, default=0, metavar="ROUNDS",
                   help="refine every label that does not hold, up to ROUNDS times (refine.py; default 0: off)")
    f.add_argument("--tuning", action="store_true",
                   help="also describe each examined latent by its tuning curves (tuning.py), verify and score them, "
                        "and count the latents a label or their curves explain")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--llm-url", default=None, help="OpenAI-compatible endpoint for an LLM description (off)")
    f.add_argument("--llm-model", default="gpt-4o-mini")
    f.add_argument("--out", default=None)
    f.set_defaults(func=cmd_features)
    n = sub.add_parser("neurons", help="domain-specific neurons (MMNeuron) and their deactivation")
    n.add_argument("--model", default="shapes-llava")
    n.add_argument("--sites", default="vision.blocks.*.mlp.post")
    n.add_argument("--where", choices=["background", "image"], default="background", help="patches read")
    n.add_argument("--examples", type=int, default=120)
    n.add_argument("--top-fraction", type=float, default=0.01)
    n.add_argument("--select", choices=["mmneuron", "per-domain"], default="mmneuron",
                   help="mmneuron: lowest entropy over all neurons, each kept for the domains where its firing "
                        "tops --bar (a domain may get none); per-domain: the lowest-entropy neurons of every domain")
    n.add_argument("--bar", type=float, default=0.95, help="quantile of all firing probabilities a neuron must "
                   "top in a domain to be specific to it (--select mmneuron)")
    n.add_argument("--seed", type=int, default=0)
    n.add_argument("--out", default=None)
    n.set_defaults(func=cmd_neurons)
    for name, fn, model, helptext in (
            ("modality", cmd_modality, "shapes-llava", "image- and text-specific LM neurons (MINER), deactivated"),
            ("textspan", cmd_textspan, "shapes-clip", "TEXTSPAN heads of a dual encoder, checked by ablation"),
            ("patchscope", cmd_patchscope, "shapes-llava", "image-token states decoded in a blank image")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--model", default=model)
        p.add_argument("--examples", type=int, default=None, help="default: the experiment's own")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--out", default=None)
        p.set_defaults(func=fn)
    v = sub.add_parser("verify", help="test an explanation of one SAE feature on controlled scenes (verification loop)")
    v.add_argument("--model", default="shapes-llava", help="zoo name or local folder")
    v.add_argument("--sae", required=True, help="an SAE folder (save_sae / SAELens)")
    v.add_argument("--site", default=None, help="default: the SAE's own site")
    v.add_argument("--feature", type=int, required=True, help="the latent to test")
    v.add_argument("--explanation", required=True, help='a concept or formula, e.g. "colour=red OR colour=orange", '
                   '"(patch=0 OR patch=1) AND background"; or tuning curves, "colour 60%%: red 1.00 > orange 0.80 > '
                   'purple 0.60 > yellow 0.50 > green 0.20 > blue 0.20" (tuning.py)')
    v.add_argument("--bases", type=int, default=24, help="base scenes each attribute is varied from")
    v.add_argument("--refine", type=int, default=0, metavar="ROUNDS",
                   help="while it does not hold, read the feature on new scenes and verify the formula its firing "
                   "supports, up to ROUNDS times (refine.py; default 0: verify only)")
    v.add_argument("--max-concepts", type=int, default=6, help="with --refine: the longest proposal kept")
    v.add_argument("--ratios", default="0.25,0.4,0.55",
                   help="with --refine: shares of its peak the feature may be read to fire above (the first for "
                   "the given explanation)")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--out", default=None)
    v.set_defaults(func=cmd_verify)
    t = sub.add_parser("tuning", help="tuning curves of SAE latents or a site's units: what moves them, and how much")
    t.add_argument("--model", default="shapes-llava", help="zoo name or local folder")
    t.add_argument("--sae", default=None, help="an SAE folder (save_sae / SAELens); without one, --site's own units "
                   "(e.g. vision.blocks.2.mlp.post neurons), named by --feature")
    t.add_argument("--site", default=None, help="default: the SAE's own site")
    t.add_argument("--feature", type=int, action="append", default=None,
                   help="a latent or unit to describe (repeat the flag); default: the SAE's --n-features most frequent")
    t.add_argument("--n-features", type=int, default=50)
    t.add_argument("--bases", type=int, default=24, help="preferred single-object scenes each latent is varied around")
    t.add_argument("--min-share", type=float, default=0.1,
                   help="share of the response's variance an attribute must explain to be named")
    t.add_argument("--where", choices=["any", "object", "background"], default="any",
                   help="the patches each response is read at (its maximum there)")
    t.add_argument("--grid", action="store_true", help="with --out: save each feature's preferred scene varied "
                   "one attribute at a time, its map over every image (figure-tuning-<feature>.png)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", default=None)
    t.set_defaults(func=cmd_tuning)
    w = sub.add_parser("words", help="vocabulary words aligned with SAE decoder rows")
    w.add_argument("--model", default="shapes-llava")
    w.add_argument("--sae", required=True)
    w.add_argument("--feature", type=int, action="append", required=True, help="repeatable")
    w.add_argument("--matrix", choices=["input", "unembedding"], default="unembedding")
    w.add_argument("--k", type=int, default=8)
    w.set_defaults(func=cmd_words)
    return ex


def _model(name: str):
    import vlmscope as vs

    return vs.load(name if (":" in name or "/" in name or "." in name) else f"zoo:{name}")


def _save(result, out: str | None, name: str) -> None:
    if out:
        print(f"saved {result.save(Path(out) / name)}")


def cmd_features(args: argparse.Namespace) -> int:
    from vlmscope.methods.explain.zoo_features import explain_sae_features
    from vlmscope.methods.sae import load_sae

    m, sae = _model(args.model), load_sae(args.sae)
    site = args.site or sae.cfg.site
    levels = {} if args.levels is None else {"ratio": None if args.levels == "quantile" else
                                              _floats(args.levels, "--levels")}
    res, scores = explain_sae_features(m, sae, site, n_features=args.n_features, n=args.examples, seed=args.seed,
                                       length=args.length, seen={"auto": None, "on": True, "off": False}[args.seen],
                                       **levels)
    print(res.to_dataframe().to_string(index=False))
    if args.refine:
        from vlmscope.methods.explain.zoo_features import refine_explained

        refined, more = refine_explained(m, sae, res, rounds=args.refine, seed=args.seed)
        for r in refined:
            print(r)
            _save(r, args.out, f"refinement-{r.feature.replace(' ', '-')}")
        scores |= more
    checks = None
    if args.tuning:
        from vlmscope.methods.explain.zoo_features import tune_sae_features

        curves, checks, more = tune_sae_features(m, sae, site, n_features=args.n_features, n=args.examples,
                                                 seed=args.seed, explained=res)
        print(checks.to_dataframe().to_string(index=False))
        scores |= more
        _save(curves, args.out, "tuning_curves")
        _save(checks, args.out, "tuning_verification")
    print(json.dumps(scores, indent=1))
    _save(res, args.out, "explained_features")
    if args.llm_url:
        _llm_descriptions(args, site, res, checks)
    return 0


def _llm_descriptions(args: argparse.Namespace, site: str, res, checks=None) -> None:
    """Send each latent's evidence to the --llm-url endpoint and print what was sent and the reply: its
    dissection label and verdict, and with --tuning its curves and their verdict (so latents no label
    names are described too)."""
    from vlmscope.methods.explain.describe import describe_with_llm, llm_messages
    from vlmscope.methods.explain.zoo_features import unit_index, unit_name

    evidence: dict[str, dict] = {}
    for i, lab in enumerate(res.labels):
        evidence[unit_name(int(res.features[i]))] = {
            "feature": int(res.features[i]), "site": site, "dissection label": lab,
            "best IoU": round(float(res.iou[i]), 3), "verification": res.verdicts[i], "detail": res.details[i]}
    if checks is not None:
        for name, text, verdict in zip(checks.features, checks.explanations, checks.verdicts):
            if text:
                evidence.setdefault(name, {"feature": unit_index(name), "site": site}).update(
                    {"tuning curves": text, "tuning verification": verdict})
    for name, ev in evidence.items():
        print("sending:", llm_messages(ev)[-1]["content"])
        print(f"{name}: {describe_with_llm(ev, args.llm_url, args.llm_model).description}")


def _show(scores: dict, out: str | None, results: dict) -> int:
    """Print the scores and save each result (name -> result) under --out."""
    print(json.dumps(scores, indent=1))
    for name, res in results.items():
        _save(res, out, name.replace(" ", "_"))
    return 0


def cmd_neurons(args: argparse.Namespace) -> int:
    from vlmscope.methods.explain.zoo import zoo_domain_neurons

    dn, effects, scores = zoo_domain_neurons(_model(args.model), n=args.examples, seed=args.seed,
                                             top_fraction=args.top_fraction, sites=args.sites, where=args.where,
                                             select=args.select, bar=args.bar)
    print(dn)
    return _show(scores, args.out, {"domain_neurons": dn} | {f"deactivation {k}": e for k, e in effects.items()})


def _sized(args: argparse.Namespace) -> dict:
    return {"seed": args.seed} | ({"n": args.examples} if args.examples else {})


def cmd_modality(args: argparse.Namespace) -> int:
    from vlmscope.methods.explain.zoo import zoo_modality_neurons

    res, effects, scores = zoo_modality_neurons(_model(args.model), **_sized(args))
    return _show(scores, args.out, {"modality_neurons": res} | {f"deactivation {k}": e for k, e in effects.items()})


def cmd_textspan(args: argparse.Namespace) -> int:
    from vlmscope.methods.explain.zoo_textspan import zoo_textspan

    res, ts, scores = zoo_textspan(_model(args.model), **_sized(args))
    print(res)
    return _show(scores, args.out, {"attribute_heads": res, "textspan": ts})


def cmd_patchscope(args: argparse.Namespace) -> int:
    from vlmscope.methods.explain.zoo_patchscope import zoo_patchscope

    res, scores = zoo_patchscope(_model(args.model), **_sized(args))
    print(res.to_dataframe().to_string(index=False))
    _save(res, args.out, "patchscope")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from vlmscope.methods.explain.compose import parse_formula
    from vlmscope.methods.explain.verify import verify
    from vlmscope.methods.explain.zoo_features import patch_maps
    from vlmscope.methods.sae import load_sae

    graded = "%" in args.explanation  # tuning curves, not a formula of concepts
    if graded:
        from vlmscope.methods.explain.tuning import parse_tuning

        parse_tuning(args.explanation)  # clear errors before any model is loaded
        if args.refine:
            raise SystemExit("--refine revises formulas of concepts; tuning curves are verified as given")
    else:
        parse_formula(args.explanation)
    ratios = _floats(args.ratios)
    m, sae = _model(args.model), load_sae(args.sae)
    site = args.site or sae.cfg.site
    if not 0 <= args.feature < sae.cfg.d_sae:
        raise SystemExit(f"--feature {args.feature} is not a latent of this SAE (0..{sae.cfg.d_sae - 1})")

    def feature(images):
        return patch_maps(m, images, site, sae.encode)[..., args.feature]

    if args.refine:
        from vlmscope.methods.explain.refine import refine

        res = refine(feature, args.explanation, rounds=args.refine, n_bases=args.bases, seed=args.seed,
                     name=f"latent {args.feature}", max_concepts=args.max_concepts, ratios=ratios)
        print(res)
        print(res.to_dataframe().to_string(index=False))
        _save(res, args.out, "refinement")
        return 0
    if graded:
        from vlmscope.methods.explain.tuning import verify_tuning

        res = verify_tuning(feature, [args.explanation], n_bases=args.bases, seed=args.seed,
                            names=[f"latent {args.feature}"])
        print(res)
        print(res.to_dataframe().to_string(index=False))
        _save(res, args.out, "tuning_verification")
        return 0
    res = verify(feature, args.explanation, n_bases=args.bases, seed=args.seed, name=f"latent {args.feature}")
    print(res)
    print(res.to_dataframe().to_string(index=False))
    _save(res, args.out, "verification")
    return 0


def cmd_tuning(args: argparse.Namespace) -> int:
    from vlmscope.methods.explain.zoo_features import tune_sae_features
    from vlmscope.methods.sae import load_sae

    if args.sae is None and (args.site is None or not args.feature):
        raise SystemExit("without --sae, give --site and the units to tune with --feature (e.g. --site "
                         "vision.blocks.2.mlp.post --feature 5)")
    m, sae = _model(args.model), (load_sae(args.sae) if args.sae else None)
    curves, checks, scores = tune_sae_features(m, sae, args.site or sae.cfg.site, features=args.feature,
                                               n_features=args.n_features, seed=args.seed, n_bases=args.bases,
                                               min_share=args.min_share, where=args.where)
    for f, e, v, d in zip(checks.features, checks.explanations, checks.verdicts, checks.details):
        print(f"{f}: {e or '(no attribute matters)'}  [{v}{'; ' + d if d else ''}]")
    if args.grid and args.out:
        from vlmscope.methods.explain.tuning import tuning_views
        from vlmscope.methods.explain.zoo_features import site_features, unit_index
        from vlmscope.report.plots_features import plt, tuning_grid

        site = args.site or sae.cfg.site
        fn = site_features(m, sae, site, [unit_index(name) for name in curves.features])
        Path(args.out).mkdir(parents=True, exist_ok=True)
        for i, name in enumerate(curves.features):
            path = Path(args.out) / f"figure-tuning-{unit_index(name)}.png"
            fig = tuning_grid(tuning_views(fn, curves, i), name)
            fig.savefig(path, dpi=110)
            plt.close(fig)  # one per feature: a long list would keep them all open
            print(f"saved {path}")
    return _show(scores, args.out, {"tuning_curves": curves, "tuning_verification": checks})


def _floats(text: str, flag: str = "--ratios") -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise SystemExit(f"{flag} takes comma-separated numbers such as 0.25,0.4,0.55, got {text!r}") from None


def cmd_words(args: argparse.Namespace) -> int:
    from vlmscope.methods.explain.word_match import vlm_word_match
    from vlmscope.methods.sae import load_sae

    m, sae = _model(args.model), load_sae(args.sae)
    res = vlm_word_match(m, sae.W_dec.detach()[args.feature], matrix=args.matrix, k=args.k,
                         labels=[f"latent {f}" for f in args.feature])
    print(res.to_dataframe().to_string(index=False))
    return 0
