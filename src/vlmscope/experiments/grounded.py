"""One function per method family: run it on zoo data and score it against ground truth.

Each returns (result, scores): the method's typed result and a dict of named numbers that the
report's ground-truth scorecard shows.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vlmscope.data import COLOURS, SHAPES
from vlmscope.methods.knockout import KnockoutResult, knockout_sweep
from vlmscope.methods.lens import LensResult, logit_lens
from vlmscope.methods.metrics import last_logits, logit_diff
from vlmscope.methods.patching import PatchingResult, patch_sweep
from vlmscope.methods.probing import ConceptTrace, patch_probe_grid, trace_concept
from vlmscope.zoo import truth


def where_is_it_lost(vlm, attribute: str = "colour", n: int = 300, seed: int = 0
                     ) -> tuple[ConceptTrace, torch.Tensor, dict[str, float]]:
    """Probe `attribute` of the object at each patch through vision -> connector -> LM (image
    tokens), plus a per-patch probe grid at the last vision block."""
    exs = truth.examples(seed, n)
    x = truth.inputs_for(vlm, exs)
    scenes = [e.scene for e in exs]
    pos = vlm.positions(x)
    # streams with one token per patch; a resampler's queries (BLIP-2) have none: see scene_probe
    streams = [s for s in ("vision", "connector", "lm") if s in pos and pos[s].has_patches]
    labels = {s: truth.patch_labels(vlm, x, scenes, attribute, stream=s) for s in streams}
    trace = trace_concept(vlm, x, labels, target=attribute)
    last_vision = trace.sites[trace.last_of("vision")]
    background = len(truth.ATTRIBUTES[attribute])  # an extra class: "no object here"
    grid, probes = patch_probe_grid(vlm, x, truth.patch_labels(vlm, x, scenes, attribute, stream="vision",
                                                             background=background), last_vision)
    mass = heatmap_mass(vlm, probes, last_vision, attribute, background, n=60, seed=seed + 1)
    scores = {
        f"probe {attribute} at {last_vision}": float(trace.score[trace.sites.index(last_vision)]),
        f"probe {attribute} at connector.out": float(trace.score[trace.sites.index("connector.out")])
        if "connector.out" in trace.sites else float("nan"),
        f"largest drop in {attribute} decodability": trace.drop,
        "per-patch probe grid, mean accuracy": float(grid.nanmean()),
        "per-patch probe heatmap mass on object patches": mass,
    }
    return trace, grid, scores


def heatmap_mass(vlm, probes, site: str, attribute: str, background: int, n: int = 60, seed: int = 1) -> float:
    """On fresh scenes, each per-patch probe's probability that its patch shows an object (1 - P(no
    object)) forms a heatmap over the image; the mean share of that heatmap on the object patches
    (chance: the share of object patches)."""
    exs = truth.examples(seed, n)
    x = truth.inputs_for(vlm, exs)
    _, cache = vlm.run_with_cache(x, site)
    pos = vlm.positions(x)[vlm.site(site).stream]
    owner = truth.patch_labels(vlm, x, [e.scene for e in exs], "cell", stream=vlm.site(site).stream)
    shares = []
    act = cache[site].float().cpu()
    for b in range(act.shape[0]):
        heat, on = [], []
        for name in probes.names:
            r, c = int(name[1:name.index("c")]), int(name[name.index("c") + 1:])
            p = int(((pos.row[b] == r) & (pos.col[b] == c)).float().argmax())
            i = probes.names.index(name)
            probs = probes.logits(act[b, p][None, None].expand(len(probes.names), 1, -1))[i, 0].softmax(-1)
            heat.append(1 - float(probs[background]) if background < probs.shape[0] else 1.0)
            on.append(bool(owner[b, p] >= 0))
        total = sum(heat)
        if total > 0 and any(on):
            shares.append(sum(h for h, o in zip(heat, on) if o) / total)
    return sum(shares) / max(len(shares), 1)


def lens_word_accuracy(vlm, n: int = 60, seed: int = 0, k: int = 1) -> tuple[LensResult, dict[str, list[float]]]:
    """The logit lens at every LM layer over image tokens: how often the top-k words at an object's
    patch include that object's colour or shape word, against how often a background patch's
    top-k words name any object of its scene (the baseline)."""
    exs = truth.examples(seed, n)
    x = truth.inputs_for(vlm, exs)
    res = logit_lens(vlm, x, k=max(k, 5))
    tok = vlm.tokenizer
    colour_ids = tok.convert_tokens_to_ids(list(COLOURS))
    shape_ids = tok.convert_tokens_to_ids(list(SHAPES))
    pos = vlm.positions(x)["lm"]
    if not pos.has_patches:  # no LM token belongs to a patch (BLIP-2's queries): no check
        nan = [float("nan")] * len(res.layers)
        return res, {"object patch names its object": nan, "background patch names a scene object": nan}
    owner = truth.patch_labels(vlm, x, [e.scene for e in exs], "cell")  # object's cell at each patch
    obj_hit, bg_hit = [], []
    for li in range(len(res.layers)):
        hits_o, n_o, hits_b, n_b = 0, 0, 0, 0
        for b, ex in enumerate(exs):
            by_cell = {o.cell: o for o in ex.scene.objects}
            scene_words = {colour_ids[COLOURS.index(o.colour)] for o in ex.scene.objects} | \
                          {shape_ids[SHAPES.index(o.shape)] for o in ex.scene.objects}
            for p in (pos.row[b] >= 0).nonzero().flatten().tolist():
                top = set(res.top_ids[li, b, p, :k].tolist())
                if owner[b, p] >= 0:
                    o = by_cell[int(owner[b, p])]
                    own = {colour_ids[COLOURS.index(o.colour)], shape_ids[SHAPES.index(o.shape)]}
                    hits_o += bool(top & own)
                    n_o += 1
                else:
                    hits_b += bool(top & scene_words)
                    n_b += 1
        obj_hit.append(hits_o / max(n_o, 1))
        bg_hit.append(hits_b / max(n_b, 1))
    return res, {"object patch names its object": obj_hit, "background patch names a scene object": bg_hit}


def sip_localisation(vlm, n_pairs: int = 8, seed: int = 0, sites: str | Sequence[str] | None = None,
                     top: int | None = None) -> tuple[PatchingResult, dict[str, float]]:
    """Denoising over (layer x image patch) on semantic image pairs: do the early layers' largest
    per-patch effects fall on the changed object's patches? Precision of the top patches
    (top = the changed object's patch count) against the known mask, per layer and overall.
    sites: default the LM's residual stream, or the vision tower's when the LM has no per-patch
    tokens (a Q-Former's queries)."""
    pairs = truth.counterfactual_pairs(seed, n_pairs, "sip")
    clean = truth.inputs_for(vlm, [p.clean for p in pairs])
    corrupt = truth.inputs_for(vlm, [p.corrupt for p in pairs])
    if sites is None:
        sites = "lm.blocks.*.resid_post" if vlm.positions(clean)["lm"].has_patches else "vision.blocks.*.resid_post"
    good = truth.answer_ids(vlm, [p.clean for p in pairs])
    bad = truth.answer_ids(vlm, [p.corrupt for p in pairs])
    res = patch_sweep(vlm, clean, corrupt, logit_diff(good, bad), sites=sites, positions="patches")
    rows, cols = int(res.group_row.max()) + 1, int(res.group_col.max()) + 1
    precision = torch.zeros(len(res.components))
    for ci in range(len(res.components)):
        hits, total = 0, 0
        for pi, pair in enumerate(pairs):
            changed = torch.as_tensor(pair.changed_patches((rows, cols))).flatten()
            kk = top or int(changed.sum())
            if kk == 0:
                continue
            effect = res.per_pair[pi, ci].nan_to_num(-1e9)
            hits += int(changed[effect.topk(kk).indices].sum())
            total += kk
        precision[ci] = hits / max(total, 1)
    scores = {f"SIP top-patch precision at {c}": float(p) for c, p in zip(res.components, precision)}
    scores["SIP top-patch precision, first layer"] = float(precision[0])
    scores["changed-patch fraction (chance)"] = float(sum(p.changed_patches((rows, cols)).mean() for p in pairs)
                                                      / len(pairs))
    return res, scores


def image_flow_knockout(vlm, n: int = 120, seed: int = 0, window: int = 1
                        ) -> tuple[KnockoutResult, KnockoutResult, dict[str, float]]:
    """Knock out attention from the image tokens in a sliding window of layers: to the last token
    (the answer's logit and accuracy per window), and to every text token in all layers at once —
    the whole image->text flow — which must drop accuracy to chance (the majority answer of each
    question family, i.e. what the text alone allows)."""
    from vlmscope.methods.knockout import accuracy_metric

    exs = truth.examples(seed, n)
    x = truth.inputs_for(vlm, exs)
    answers = truth.answer_ids(vlm, exs)
    res = knockout_sweep(vlm, x, _answer_logit(answers), window=window)
    acc = knockout_sweep(vlm, x, accuracy_metric(answers), window=window)
    n_layers = vlm.n_layers("lm")
    to_last = knockout_sweep(vlm, x, accuracy_metric(answers), window=n_layers)
    to_text = knockout_sweep(vlm, x, accuracy_metric(answers), dst="text", window=n_layers)
    out = vlm.run(x)
    base = float((last_logits(vlm, out, x).argmax(-1).cpu() == answers).float().mean())
    scores = {"accuracy": base,
              "accuracy, image->last blocked in all layers": float(to_last.values.mean()),
              "accuracy, image->text blocked in all layers": float(to_text.values.mean()),
              "chance (majority answer per family)": majority_baseline(exs)}
    for s, v in zip(acc.starts, acc.values.mean(1).tolist()):
        scores[f"accuracy, blocked in layers {s}..{s + window - 1}"] = v
    scores.update(flow_window(vlm, x, answers, scores["chance (majority answer per family)"]))
    return res, acc, scores


def flow_window(vlm, x, answers, chance: float, margin: float = 0.05) -> dict[str, float]:
    """The shortest window of consecutive layers where blocking image->text attention drops
    accuracy to chance (+ margin), and the accuracy when the same flow is blocked everywhere
    outside that window instead."""
    from vlmscope.model.interventions import knockout

    n = vlm.n_layers("lm")

    def accuracy(layers):
        if not layers:
            return float((last_logits(vlm, vlm.run(x), x).argmax(-1).cpu() == answers).float().mean())
        out = vlm.run(x, [knockout("image", "text", layers=layers)])
        return float((last_logits(vlm, out, x).argmax(-1).cpu() == answers).float().mean())

    for size in range(1, n + 1):
        for start in range(n - size + 1):
            inside = list(range(start, start + size))
            acc_in = accuracy(inside)
            if acc_in <= chance + margin:
                outside = [i for i in range(n) if i not in inside]
                return {"flow window start": start, "flow window end": start + size - 1,
                        "accuracy, image->text blocked in the window": acc_in,
                        "accuracy, image->text blocked outside the window": accuracy(outside)}
    return {"flow window start": float("nan"), "flow window end": float("nan")}


def majority_baseline(examples) -> float:
    """Accuracy of answering each family's most frequent answer: what a model blind to the image
    can reach from the question alone."""
    from collections import Counter

    by_family: dict[str, Counter] = {}
    for ex in examples:
        by_family.setdefault(ex.question.family, Counter())[ex.question.answer] += 1
    return sum(c.most_common(1)[0][1] for c in by_family.values()) / len(examples)


def _answer_logit(answers: torch.Tensor):
    def answer_logit(logits: torch.Tensor) -> torch.Tensor:
        return logits[torch.arange(logits.shape[0]), answers.to(logits.device)]

    answer_logit.name = "answer_logit"  # type: ignore[attr-defined]
    return answer_logit


def sae_concepts(vlm, site: str | None = None, n: int = 1500, seed: int = 0, architecture: str = "topk",
                 k: int = 4, d_sae: int = 64, steps: int = 800, whiten: float = 0.0, matryoshka: tuple[int, ...] = (),
                 restarts: int = 1, out_dir=None):
    """Train an SAE on `site` at image patches of zoo scenes, then ask: for each colour and shape,
    does one feature fire exactly on the patches of objects with that concept? Background
    patches count as negatives. Returns (sae, colour F1, shape F1, scores). whiten: ZCA-whiten the
    rows first (TrainConfig.whiten). matryoshka: nested prefix widths (sae/matryoshka.py). restarts
    > 1: train that many initialisations on the first 70 % of the rows (scenes) and keep the one with
    the lowest FVU on the next 10 % (sae/restarts.py). The setup that captures all six colours
    (docs/sae.md, "Colour concept F1"; benchmarks/sae_zoo_colours.py): site="connector.out", k=6,
    n=20000, steps=6000, whiten=0.1, restarts=8."""
    from vlmscope.methods.sae import SAESpec, TensorSource, TrainConfig, concept_f1, train_saes
    from vlmscope.methods.sae.restarts import train_restarts

    site = site or vlm.sites("vision.blocks.*.resid_post")[-1]  # default: the last vision block
    exs = truth.examples(seed, n)
    rows, colours, shapes = [], [], []
    for b in range(0, n, 100):
        chunk = exs[b:b + 100]
        x = truth.inputs_for(vlm, chunk)
        stream = vlm.site(site).stream
        scenes = [e.scene for e in chunk]
        col = truth.patch_labels(vlm, x, scenes, "colour", stream=stream, background=len(COLOURS))
        shp = truth.patch_labels(vlm, x, scenes, "shape", stream=stream, background=len(SHAPES))
        _, cache = vlm.run_with_cache(x, site)
        keep = col >= 0
        rows.append(cache[site][keep].float())
        colours.append(col[keep])
        shapes.append(shp[keep])
    acts, colours, shapes = torch.cat(rows), torch.cat(colours), torch.cat(shapes)
    split = int(0.8 * len(acts))
    spec = SAESpec(site, architecture, d_sae=d_sae, k=k, name=f"{site}-{architecture}", matryoshka=tuple(matryoshka))
    cfg = TrainConfig(steps=steps, batch_size=512, lr=3e-3, warmup_steps=50, seed=seed, checkpoint_every=10_000,
                      whiten=whiten)
    kept = {}
    if restarts > 1:
        val = int(0.7 * len(acts))
        sae, chosen = train_restarts(TensorSource({site: acts[:val]}), spec, cfg, acts[val:split], restarts,
                                     out_dir=out_dir, progress=False)
        kept = {"restarts": restarts, "restart kept": chosen.names[chosen.chosen],
                "held-out FVU of the kept restart": float(chosen.fvu[chosen.chosen]),
                "held-out FVU, worst restart": float(chosen.fvu.max())}
    else:
        sae = train_saes(TensorSource({site: acts[:split]}), [spec], cfg, out_dir=out_dir, progress=False)[spec.label()]
    with torch.no_grad():
        h = sae.encode(acts[split:])
    colour_f1 = concept_f1(colours[split:], h, {c: i for i, c in enumerate(COLOURS)}, levels=8)
    shape_f1 = concept_f1(shapes[split:], h, {s: i for i, s in enumerate(SHAPES)}, levels=8)
    scores = {"site": site, "score": float(colour_f1.best_f1.mean()),
              "mean best-feature F1, colours": float(colour_f1.best_f1.mean()),
              "mean best-feature F1, shapes": float(shape_f1.best_f1.mean()),
              "colours with F1 >= 0.8": int((colour_f1.best_f1 >= 0.8).sum()),
              "shapes with F1 >= 0.8": int((shape_f1.best_f1 >= 0.8).sum()),
              "concepts no feature captures (F1 < 0.8)": ", ".join(colour_f1.uncaptured + shape_f1.uncaptured), **kept}
    return sae, colour_f1, shape_f1, scores


def splice_recovery(clip_vlm, n: int = 100, seed: int = 0, l1: float = 0.004):
    """SpLiCE (Bhalla et al. 2024) on a dual-encoder zoo model: decompose single-object scenes over a
    vocabulary of the world's words plus distractors; precision and recall of the chosen colour and
    shape words against each scene's object."""
    import numpy as np

    from vlmscope.data import COLOURS, DOMAINS, POSITIONS, SHAPES, SIZES, render, sample_scene
    from vlmscope.methods.explain.splice import splice

    rng = np.random.default_rng([seed, 31337])
    scenes = [sample_scene(rng, 1, 1) for _ in range(n)]
    distractors = ["zero", "one", "two", "three", "yes", "no", "what", "is", "the", "of"]
    concepts = [*COLOURS, *SHAPES, *SIZES, *DOMAINS, *POSITIONS, *distractors]
    x = clip_vlm.prepare([render(s) for s in scenes], concepts)
    truth = [{s.objects[0].colour, s.objects[0].shape} for s in scenes]
    result = splice(clip_vlm, x, concepts, l1=l1, truth=truth)
    words = set(COLOURS) | set(SHAPES)
    precision, recall = [], []
    for i, true in enumerate(truth):
        got = {concepts[j] for j in (result.weights[i] > 0).nonzero().flatten().tolist()} & words
        precision.append(len(got & true) / len(got) if got else 0.0)
        recall.append(len(got & true) / len(true))
    scores = {"SpLiCE precision (colour and shape words)": float(np.mean(precision)),
              "SpLiCE recall (colour and shape words)": float(np.mean(recall)),
              "SpLiCE mean concepts per image": float((result.weights > 0).sum(1).float().mean()),
              "SpLiCE reconstruction cosine": float(result.cosine.mean())}
    return result, scores
