"""`vlmscope demo`: the five method families on the zoo, scored against ground truth, saved.

Each stage writes one folder of saved results (result.json + tensors, scores.json, figures);
the report is then built from those files alone.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import matplotlib

from vlmscope.experiments import grounded

matplotlib.use("Agg")


def _write_scores(folder: Path, scores: dict) -> None:
    (folder / "scores.json").write_text(json.dumps(scores, indent=1))


def _stage_probing(vlm, out: Path, seed: int, shared: dict) -> dict:
    from vlmscope.report.plots import heatmap_over_image

    scores = {}
    for attribute in ("colour", "shape", "cell"):
        trace, grid, s = grounded.where_is_it_lost(vlm, attribute, n=300, seed=seed)
        folder = out / f"probe-{attribute}"
        trace.save(folder)
        trace.plot().savefig(folder / "figure-trace.png", dpi=110)
        heatmap_over_image(None, grid.numpy(), title=f"per-patch {attribute} probe accuracy", vmin=0,
                           vmax=1).savefig(folder / "figure-patch-grid.png", dpi=110)
        _write_scores(folder, s)
        scores.update(s)
    return scores


def _stage_lens(vlm, out: Path, seed: int, shared: dict) -> dict:
    from vlmscope.data import render
    from vlmscope.report.plots import lens_kl, patch_words
    from vlmscope.zoo import truth

    result, acc = grounded.lens_word_accuracy(vlm, n=60, seed=seed)
    folder = out / "lens"
    result.save(folder)
    result.plot().savefig(folder / "figure-entropy.png", dpi=110)
    best = max(range(len(result.layers)), key=lambda i: acc["object patch names its object"][i])
    ex = truth.examples(seed, 1)[0]
    words, probs = result.patch_map(result.layers[best], example=0)
    patch_words(render(ex.scene), words, probs, title=f"logit lens at layer {result.layers[best]}, each patch") \
        .savefig(folder / "figure-patch-words.png", dpi=110)
    from vlmscope.methods.lens import logit_lens, train_tuned_lens

    train = [truth.inputs_for(vlm, truth.examples(seed + 100 + i, 60)) for i in range(4)]
    tuned = train_tuned_lens(vlm, train, steps=150, lr=3e-3)
    tuned.save(folder / "tuned-lens")
    held = truth.inputs_for(vlm, truth.examples(seed + 200, 60))
    kl_logit = logit_lens(vlm, held).kl_to_final.mean(dim=(1, 2))
    kl_tuned = logit_lens(vlm, held, tuned=tuned).kl_to_final.mean(dim=(1, 2))
    lens_kl(result.layers, {"logit lens": kl_logit, "tuned lens": kl_tuned}).savefig(
        folder / "figure-tuned-kl.png", dpi=110)
    scores = {"lens: object patch names its object (best layer)": acc["object patch names its object"][best],
              "tuned lens: mean KL to the final layer": float(kl_tuned[:-1].mean()),
              "logit lens: mean KL to the final layer": float(kl_logit[:-1].mean()),
              "lens: background baseline at that layer": acc["background patch names a scene object"][best],
              "lens: best layer": result.layers[best]}
    _write_scores(folder, {**scores, **{k: v for k, v in acc.items()}})
    return scores


def _stage_patching(vlm, out: Path, seed: int, shared: dict) -> dict:
    from vlmscope.methods.attribution import attribution_patching, compare
    from vlmscope.methods.metrics import logit_diff
    from vlmscope.zoo import truth

    result, scores = grounded.sip_localisation(vlm, n_pairs=8, seed=seed)
    folder = out / "patching"
    result.save(folder)
    result.plot().savefig(folder / "figure-sweep.png", dpi=110)
    clean, corrupt, good, bad = truth.pair_inputs(vlm, seed, 8, "sip")
    metric = logit_diff(good, bad)
    atp = attribution_patching(vlm, clean, corrupt, metric, positions="patches")
    agree = compare(result, atp)
    atp.save(out / "atp")
    atp.plot().savefig(out / "atp" / "figure-sweep.png", dpi=110)
    scores["AtP vs exact, Pearson r"] = agree.pearson["all"]
    _write_scores(out / "atp", {"AtP vs exact, Pearson r": agree.pearson["all"],
                                "worst cells": [list(map(str, c)) for c in agree.disagreements[:5]]})
    _write_scores(folder, scores)
    logit, acc, kscores = grounded.image_flow_knockout(vlm, n=120, seed=seed)
    kfolder = out / "knockout"
    logit.save(kfolder)
    logit.plot().savefig(kfolder / "figure-windows.png", dpi=110)
    _write_scores(kfolder, kscores)
    return {**scores, **kscores}


def _stage_sae(vlm, out: Path, seed: int, shared: dict) -> dict:
    import shutil

    from vlmscope.report.plots import side_by_side

    folder = out / "sae"
    shutil.rmtree(folder / "training", ignore_errors=True)  # the demo trains afresh each time
    sae, colour_f1, shape_f1, scores = grounded.sae_concepts(vlm, seed=seed, out_dir=folder / "training")
    shared["sae"] = (sae, scores["site"])  # handed to the explanation stage
    colour_f1.save(folder / "colour-f1")
    shape_f1.save(folder / "shape-f1")
    side_by_side(colour_f1, shape_f1).savefig(folder / "figure-concept-f1.png", dpi=110)
    _feature_grid(vlm, sae, scores["site"], folder, seed)
    saved = next((folder / "training").glob("*/cfg.json")).parent  # what `vlmscope serve --sae` reads
    _write_scores(folder, {**scores, "sae folder": str(saved)})
    return {k: v for k, v in scores.items() if isinstance(v, (int, float))}


def _feature_grid(vlm, sae, site: str, folder: Path, seed: int, n: int = 96) -> None:
    """Feature views of the SAE over n fresh scenes, saved, and the grid of its most frequent
    features' top scenes with their patch activations drawn over them."""
    from vlmscope.data import render
    from vlmscope.methods.sae import feature_views
    from vlmscope.report.plots_features import feature_grid
    from vlmscope.zoo import truth

    examples = truth.examples(seed + 300, n)
    batches = [truth.inputs_for(vlm, examples[i:i + 32]) for i in range(0, n, 32)]
    views = feature_views(sae, vlm, batches, site=site, positions="image", top=4)
    views.save(folder / "feature-views")
    feature_grid(views, [render(e.scene) for e in examples]).savefig(folder / "figure-feature-grid.png", dpi=110)


def _stage_explain(vlm, out: Path, seed: int, shared: dict) -> dict:
    from vlmscope.data import COLOURS, FAMILIES, SHAPES
    from vlmscope.data.vocab import answer_words
    from vlmscope.methods.explain.word_match import neuron_directions, vlm_word_match
    from vlmscope.methods.explain.zoo_features import explain_sae_features, tune_sae_features, unit_name

    folder = out / "explain"
    folder.mkdir(parents=True, exist_ok=True)
    if "sae" not in shared:
        sae, _, _, s = grounded.sae_concepts(vlm, seed=seed)
        site = s["site"]
    else:
        sae, site = shared["sae"]
    explained, scores = explain_sae_features(vlm, sae, site, n_features=50, n=200, seed=seed)  # the top 50
    explained.save(folder / "features")
    explained.plot().savefig(folder / "figure-verification.png", dpi=110)
    # the same latents by degree: tuning curves, for those no categorical label names
    curves, checks, tuned = tune_sae_features(vlm, sae, site, n_features=50, n=200, seed=seed, explained=explained)
    curves.save(folder / "tuning-curves")
    checks.save(folder / "tuning-verification")
    held = {unit_name(int(f)) for f, v in zip(explained.features, explained.verdicts) if v == "holds"}
    graded = [i for i, (f, v) in enumerate(zip(checks.features, checks.verdicts)) if v == "holds" and f not in held]
    (curves.plot(features=graded[:6]) if graded else checks.plot()).savefig(folder / "figure-tuning.png", dpi=110)
    if graded:  # the first of them as images: its preferred scene varied one attribute at a time
        from vlmscope.methods.explain.tuning import tuning_views
        from vlmscope.methods.explain.zoo_features import site_features, unit_index
        from vlmscope.report.plots_features import tuning_grid

        fn = site_features(vlm, sae, site, [unit_index(name) for name in checks.features])
        tuning_grid(tuning_views(fn, curves, graded[0]), checks.features[graded[0]]).savefig(
            folder / "figure-tuning-grid.png", dpi=110)
    scores.update(tuned)
    # word matching: the answer words each of the last LM block's first neurons writes (unembedding)
    last = vlm.n_layers("lm") - 1
    answers = sorted({w for f in FAMILIES for w in answer_words(f)} | set(COLOURS) | set(SHAPES))
    words = vlm_word_match(vlm, neuron_directions(vlm, last, range(16)), k=3, keep=answers,
                           labels=[f"lm.blocks.{last}.mlp neuron {i}" for i in range(16)])
    words.save(folder / "word-match")
    words.plot().savefig(folder / "figure-word-match.png", dpi=110)
    from vlmscope import zoo

    if "shapes-clip" in zoo.names():  # SpLiCE and TEXTSPAN need a dual encoder
        from vlmscope.methods.explain.zoo_textspan import zoo_textspan

        clip = zoo.load("shapes-clip")
        spliced, splice_scores = grounded.splice_recovery(clip, seed=seed)
        spliced.save(folder / "splice")
        scores.update(splice_scores)
        heads, basis, textspan_scores = zoo_textspan(clip, seed=seed)
        heads.save(folder / "textspan-heads")
        basis.save(folder / "textspan")
        heads.plot().savefig(folder / "figure-textspan-ablation.png", dpi=110)
        scores.update(textspan_scores)
        scores.update(_clip_domain_neurons(clip, folder, seed))
    scores.update(_explain_neurons_and_patchscope(vlm, folder, seed))
    scores.update(_explain_lm_image_tokens(vlm, folder, seed))
    numeric = {k: v for k, v in scores.items() if isinstance(v, (int, float))}
    numeric["score"] = numeric.get("dissection / verification agreement", float("nan"))
    _write_scores(folder, {**scores, **numeric})
    return numeric


def _explain_lm_image_tokens(vlm, folder: Path, seed: int) -> dict:
    """The same SAE recipe at the language model's middle block, at image tokens, dissected with the
    concepts of what earlier image tokens show (concepts.SEEN); scores prefixed "LM image tokens: "."""
    from vlmscope.methods.explain.zoo_features import explain_sae_features

    blocks = vlm.sites("lm.blocks.*.resid_post")
    if not blocks:  # a dual encoder has no language model
        return {}
    site = blocks[len(blocks) // 2]
    sae, _, _, _ = grounded.sae_concepts(vlm, site=site, seed=seed)
    explained, scores = explain_sae_features(vlm, sae, site, n_features=50, n=200, seed=seed)
    explained.save(folder / "features-lm")
    keep = ("features examined", "features labelled", "verdict: holds", "agreement over all examined features",
            "labels naming what earlier image tokens show", "of those, labels that hold",
            "best-fitting such label that holds")
    return {"LM image tokens: site": site} | {f"LM image tokens: {k}": scores[k] for k in keep if k in scores}


def _clip_domain_neurons(clip, folder: Path, seed: int) -> dict:
    """Domain-specific neurons of shapes-clip's vision tower (trained on texts that name the
    background, unlike shapes-llava's questions); scores prefixed "shapes-clip: "."""
    from vlmscope.methods.explain.zoo import zoo_domain_neurons

    dn, effects, scores = zoo_domain_neurons(clip, seed=seed)
    dn.save(folder / "clip-domain-neurons")
    for name, eff in effects.items():
        eff.save(folder / f"clip-domain-deactivation-{name.replace(' ', '-')}")
    return {f"shapes-clip: {k}": v for k, v in scores.items()}


def _explain_neurons_and_patchscope(vlm, folder: Path, seed: int) -> dict:
    """Domain-specific vision neurons (MMNeuron); for a model with an LM, modality-specific LM neurons
    (MINER) and Patchscopes on image tokens. Saves each result under `folder`, returns the scores."""
    from vlmscope.methods.explain.zoo import zoo_domain_neurons, zoo_modality_neurons
    from vlmscope.methods.explain.zoo_patchscope import zoo_patchscope

    dn, effects, scores = zoo_domain_neurons(vlm, seed=seed)
    dn.save(folder / "domain-neurons")
    for name, eff in effects.items():
        eff.save(folder / f"domain-deactivation-{name.replace(' ', '-')}")
    effects["first block"].plot().savefig(folder / "figure-domain-deactivation.png", dpi=110)
    if vlm.adapter.dual_encoder:
        return scores
    mn, m_effects, m_scores = zoo_modality_neurons(vlm, seed=seed)
    mn.save(folder / "modality-neurons")
    for name, eff in m_effects.items():
        eff.save(folder / f"modality-deactivation-{name.replace(' ', '-')}")
    m_effects["first block"].plot().savefig(folder / "figure-modality-deactivation.png", dpi=110)
    ps, ps_scores = zoo_patchscope(vlm, seed=seed)
    ps.save(folder / "patchscope")
    ps.plot().savefig(folder / "figure-patchscope.png", dpi=110)
    return {**scores, **m_scores, **ps_scores}


STAGES: dict[str, tuple[str, Callable]] = {
    "probing": ("Probing", _stage_probing),
    "lens": ("Logit lens", _stage_lens),
    "patching": ("Activation patching", _stage_patching),
    "sae": ("Sparse autoencoders", _stage_sae),
    "explain": ("Automated explanation", _stage_explain),
}


def run_demo(out: str | Path = "vlmscope-demo", model: str = "shapes-llava", seed: int = 0,
             stages: tuple[str, ...] | None = None, report: bool = True, progress: bool = True) -> Path:
    """Run every stage on a zoo model, save results under `out`, and build `out/index.html`."""
    import torch

    from vlmscope import zoo

    torch.set_num_threads(1)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vlm = zoo.load(model)
    manifest = {"model": model, "seed": seed, "stages": []}
    t_all = time.perf_counter()
    chosen = stages or tuple(STAGES)
    shared: dict = {}  # what a stage hands to later ones (the SAE, for the explanation stage)
    for i, key in enumerate(chosen, 1):
        title, fn = STAGES[key]
        if progress:
            print(f"[{i}/{len(chosen)}] {title} ...", flush=True)
        t0 = time.perf_counter()
        scores = fn(vlm, out, seed, shared)
        dt = time.perf_counter() - t0
        manifest["stages"].append({"key": key, "title": title, "seconds": round(dt, 1), "scores": scores})
        if progress:
            print(f"      done in {dt:.1f}s", flush=True)
    manifest["seconds"] = round(time.perf_counter() - t_all, 1)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, default=float))
    if report:
        from vlmscope.report.html import build_report

        path = build_report(out)
        if progress:
            print(f"report: {path}")
    return out
