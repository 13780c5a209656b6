"""SAE features explained against the shapes world's ground truth: each latent is labelled by
network dissection with formulas of concepts, scored by simulation, and its label tested by the
verification loop on controlled scenes (the issue's check: labels that verification confirms).

Each function returns (result, scores) like `vlmscope.experiments.grounded`: the typed result and
a dict of named numbers for the report's scorecard.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from vlmscope.errors import InputError
from vlmscope.methods.explain.compose import atoms, dissect_formulas, is_compound, mask_of, parse_formula
from vlmscope.methods.explain.concepts import PLACES, SEEN, all_concepts, concept_masks, parse
from vlmscope.methods.explain.score import score_explanations
from vlmscope.methods.explain.verify import verify_many
from vlmscope.results import Result
from vlmscope.zoo import truth

PROMPT = "what colour is the circle ?"  # any question: image tokens precede it


def patch_maps(vlm, images: Sequence[np.ndarray], site: str, encode: Callable[[torch.Tensor], torch.Tensor],
               prompt: str = PROMPT) -> torch.Tensor:
    """(image, rows, cols, feature) maps: `encode` (rows, d) -> (rows, feature) applied to `site` at
    every image patch of one image per example (e.g. `sae.encode`)."""
    x = vlm.prepare(list(images), [prompt] * len(images))
    _, cache = vlm.run_with_cache(x, site)
    pos = vlm.positions(x)[vlm.site(site).stream]
    sel = (pos.row >= 0) & (pos.image <= 0)  # (batch, pos)
    rows, cols = int(pos.row[sel].max()) + 1, int(pos.col[sel].max()) + 1
    with torch.no_grad():
        feats = encode(cache[site][sel].float())  # (n_patches, feature)
    out = torch.zeros(len(images), rows, cols, feats.shape[-1])
    b, _ = sel.nonzero(as_tuple=True)
    out[b, pos.row[sel], pos.col[sel]] = feats.float().cpu()
    return out


def reading_order(vlm, site: str, prompt: str = PROMPT) -> list[int]:
    """The patch indices (row * cols + col) of one image in the order `site`'s stream holds its tokens."""
    from vlmscope.data import render

    x = vlm.prepare([render(truth.examples(0, 1)[0].scene)], [prompt])
    pos = vlm.positions(x)[vlm.site(site).stream]
    sel = (pos.row[0] >= 0) & (pos.image[0] <= 0)
    cols = int(pos.col[0][sel].max()) + 1
    return (pos.row[0][sel] * cols + pos.col[0][sel]).tolist()


@dataclass(frozen=True, repr=False)
class ExplainedFeatures(Result):
    """Per labelled SAE feature: its dissection label, simulation score and the verification verdict;
    `examined` counts every feature dissected, labelled or not."""

    kind = "explained_features"
    site: str
    features: torch.Tensor  # (feature,) latent indices
    labels: tuple[str, ...]
    iou: torch.Tensor  # (feature,) best IoU
    correlation: torch.Tensor  # (feature,) simulation score of the label
    precision: torch.Tensor  # (feature,)
    verdicts: tuple[str, ...]
    details: tuple[str, ...]
    examined: int
    ratio: torch.Tensor  # (feature,) the share of its peak it was labelled and verified at; NaN: top quantile

    @property
    def agreement(self) -> float:
        """Share of labelled features whose dissection label the verification loop says holds."""
        return sum(v == "holds" for v in self.verdicts) / max(len(self.verdicts), 1)

    @property
    def agreement_examined(self) -> float:
        """The same share over every examined feature: an unlabelled feature counts as not agreeing."""
        return sum(v == "holds" for v in self.verdicts) / max(self.examined, 1)

    def __repr__(self) -> str:
        return (f"ExplainedFeatures({len(self.labels)} of {self.examined} features labelled at {self.site}, "
                f"agreement {self.agreement:.2f}, over all {self.agreement_examined:.2f})")

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame({"feature": self.features.tolist(), "label": list(self.labels),
                             "iou": self.iou.tolist(), "correlation": self.correlation.tolist(),
                             "precision": self.precision.tolist(), "fires above (share of peak)": self.ratio.tolist(),
                             "verdict": list(self.verdicts), "detail": list(self.details)})


CONCEPTS = ("colour", "shape", "size", "cell", "patch", "row", "column", "object", "background", "tone")
# shares of its peak a feature is dissected at (explain_sae_features): labelled at the best-fitting one
LEVELS = (0.1, 0.25, 0.4, 0.55)


def frequent_latents(vlm, sae, site: str, n_features: int = 50, n: int = 300, seed: int = 0):
    """The `n_features` latents that fire on most patches of n zoo scenes (seed), most frequent first:
    (latents (feature,), maps (scene, rows, cols, d_sae), scenes)."""
    from vlmscope.data import render

    scenes = [e.scene for e in truth.examples(seed, n)]
    maps = torch.cat([patch_maps(vlm, [render(s) for s in scenes[i:i + 100]], site, sae.encode)
                      for i in range(0, n, 100)])  # (scene, rows, cols, d_sae)
    freq = (maps > 0).float().mean((0, 1, 2))
    alive = int((freq > 0).sum())
    if not alive:
        raise InputError(f"no latent of the SAE fires at {site} on {n} scenes: nothing to explain")
    return freq.argsort(descending=True)[:min(n_features, alive)], maps, scenes


def explain_sae_features(vlm, sae, site: str, n_features: int = 50, n: int = 300, seed: int = 0,
                         quantile: float = 0.8, n_bases: int = 24, attributes: Sequence[str] = CONCEPTS,
                         min_iou: float = 0.5, length: int = 3,
                         ratio: float | Sequence[float] | None = LEVELS,
                         seen: bool | None = None) -> tuple[ExplainedFeatures, dict[str, float]]:
    """Label the most frequent SAE latents at `site` by dissection on n zoo scenes with formulas of
    up to `length` concepts (compose.py; 1: single concepts, Bau et al.), those with an IoU >= min_iou
    get a label; score the labels by simulation, and test each label with the verification loop on
    controlled scenes; agreement is the share of labels that hold (and of all examined features).
    Patch-level concepts only by default: a whole-image "domain=..." mask wins IoU for any
    unselective feature. min_iou 0.5 rather than Bau et al.'s 0.04: on a 3 x 3 map a random map of
    the same firing rate reaches IoU 0.1-0.2 with the larger masks (see `chance_iou`); 0.5 means
    feature and explanation overlap more than they differ. ratio: the shares of each feature's peak
    it is dissected at; it is labelled at the one where its label fits best (`dissect_formulas`) and
    verified at that same share, so that both judge the same firing (a graded SAE latent, strong on
    one value and weak on its neighbours, is read where it is most concept-like). One share: that
    one; None: its top `quantile` (Bau et al.), verified at the loop's own 0.25 of the peak.
    seen: add what earlier image tokens show (`concepts.SEEN`: "seen_shape=cross", "seen=none") to
    the vocabulary; None: where the site is in the language model, which reads the image tokens in
    order (pass False for a prefix LM whose image tokens see each other, as PaliGemma's)."""
    seen = vlm.site(site).stream == "lm" if seen is None else seen
    if seen and (order := reading_order(vlm, site)) != sorted(order):
        raise InputError(f"{site} reads the image's patches in the order {order}; the verification loop's "
                         "scenes for what earlier tokens show assume row by row: pass seen=False")
    feats, maps, scenes = frequent_latents(vlm, sae, site, n_features, n, seed)
    fmaps = maps[..., feats].permute(3, 0, 1, 2)  # (feature, scene, rows, cols)
    vocab = all_concepts((*attributes, *SEEN) if seen else attributes)
    masks = concept_masks(scenes, tuple(maps.shape[1:3]), vocab)
    names = [unit_name(int(f)) for f in feats]
    dis = dissect_formulas(fmaps, masks, quantile, names, min_iou, length, ratio=ratio)
    labelled = [i for i, lab in enumerate(dis.labels) if lab]
    lab_feats = feats[labelled]
    labels = tuple(dis.labels[i] for i in labelled)
    lab_names = [names[i] for i in labelled]
    sim = score_explanations(fmaps[labelled], labels, masks, quantile, lab_names, thresholds=dis.threshold[labelled])
    lab_ratio = dis.ratio[labelled]
    per_feature = None if bool(lab_ratio.isnan().all()) else lab_ratio.tolist()

    checks = verify_many(site_features(vlm, sae, site, lab_feats.tolist()), labels, n_bases=n_bases, seed=seed + 1,
                         names=lab_names, ratios=per_feature) if labels else []
    res = ExplainedFeatures(site, lab_feats, labels, dis.iou[labelled], sim.correlation, sim.precision,
                            tuple(c.verdict for c in checks), tuple(c.detail for c in checks), len(feats), lab_ratio)
    chance = chance_iou(fmaps, masks, dis.threshold)
    own = torch.stack([chance_iou(fmaps[i:i + 1], {lab: mask_of(lab, masks)}, dis.threshold[i:i + 1])[0, 0]
                       for i, lab in zip(labelled, labels)]) if labels else torch.tensor([float("nan")])
    scores = {"features examined": len(feats), "features labelled": len(labelled), "labelling bar (IoU)": min_iou,
              "longest formula (concepts)": length, "labels joining several concepts": sum(map(is_compound, labels)),
              "dissection / verification agreement": res.agreement,
              "agreement over all examined features": res.agreement_examined,
              "mean best IoU": float(dis.iou.mean()), "mean best single-concept IoU": float(dis.concept_iou.mean()),
              "largest chance IoU (random map, same firing rate)": float(chance.max()),
              "largest chance IoU of a label (random map, same firing rate)": float(own.max()),
              "mean simulation correlation": float(sim.correlation.nanmean()),
              "mean label precision": float(sim.precision.nanmean())}
    for v in ("holds", "too broad", "too narrow", "does not hold"):
        scores[f"verdict: {v}"] = sum(c.verdict == v for c in checks)
    if untested := sum(c.verdict == "untested" for c in checks):  # no controlled scene shows what the label names
        scores["verdict: untested"] = untested
    kinds = [{parse(a)[0] for a in atoms(parse_formula(lab))} for lab in labels]
    for kind in ("patch", "row", "column", "object", "background", "cell", "colour", "shape", "size", "tone"):
        scores[f"labels naming {kind}"] = sum(kind in k for k in kinds)
    scores["labels naming a position (patch, row or column)"] = sum(bool(k & set(PLACES)) for k in kinds)
    if seen:
        told = [bool(k & set(SEEN)) for k in kinds]
        scores["labels naming what earlier image tokens show"] = sum(told)
        scores["of those, labels that hold"] = sum(t and c.verdict == "holds" for t, c in zip(told, checks))
        best = max(((float(res.iou[i]), lab) for i, lab in enumerate(labels)
                    if told[i] and checks[i].verdict == "holds"), default=None)
        if best:
            scores["best-fitting such label that holds"] = f"{best[1]} (IoU {best[0]:.2f})"
    return res, scores


def refine_explained(vlm, sae, explained: ExplainedFeatures, rounds: int = 3, n_bases: int = 24, seed: int = 0,
                     max_concepts: int = 6, ratios: Sequence[float] | None = None) -> tuple[list, dict[str, float]]:
    """Run the refinement loop (refine.py) on every labelled feature of `explained` whose label does not
    hold, from the same verification seed as `explain_sae_features` (seed + 1), so round 0 repeats its
    verdict (at the share of its peak the label was verified at, if any). ratios: the shares of its
    peak each feature may be read to fire above (default refine.RATIOS). Returns (one Refinement per
    such feature, scores)."""
    from vlmscope.methods.explain.refine import RATIOS, refine

    ratios = tuple(ratios) if ratios is not None else RATIOS

    out = []
    for f, label, verdict, at in zip(explained.features.tolist(), explained.labels, explained.verdicts,
                                     explained.ratio.tolist()):
        if verdict == "holds":
            continue
        mine = ratios if math.isnan(at) else (at, *(r for r in ratios if r != at))  # round 0 at the label's share
        out.append(refine(lambda images, f=f: patch_maps(vlm, images, explained.site, sae.encode)[..., f], label,
                          rounds, n_bases, seed + 1, f"latent {f}", ratios=mine, max_concepts=max_concepts))
    held = sum(v == "holds" for v in explained.verdicts)
    fixed = sum(r.holds for r in out)
    scores = {"refinement rounds": rounds, "labels refined": len(out), "refined labels that hold": fixed,
              "labels that hold after refinement": held + fixed,
              "agreement after refinement": (held + fixed) / max(len(explained.verdicts), 1),
              "agreement after refinement, over all examined": (held + fixed) / max(explained.examined, 1)}
    return out, scores


def tune_sae_features(vlm, sae, site: str, features: Sequence[int] | None = None, n_features: int = 50,
                      n: int = 300, seed: int = 0, n_bases: int = 24, min_share: float = 0.1,
                      explained: ExplainedFeatures | None = None, where: str = "any"):
    """Tuning curves (tuning.py) of SAE latents at `site`: the given `features`, or the `n_features`
    most frequent on n zoo scenes (as `explain_sae_features` examines them), each described,
    verified on fresh bases and scored by simulation. sae None: the site's own units (an MLP site's
    neurons), which `features` must then name. where: the patches each response is read at ("any",
    "object", "background"; `tuning.read`). With `explained` (the same latents' dissection), the
    scores also count the latents that a categorical label or their curves explain.
    Returns (TuningCurves, TuningVerification, scores)."""
    from vlmscope.methods.explain.tuning import explain_tuning

    if features is None:
        if sae is None:
            raise InputError(f"without an SAE, name the units of {site} to tune (features=[...])")
        feats = frequent_latents(vlm, sae, site, n_features, n, seed)[0].tolist()
    else:
        feats = [int(f) for f in features]
        width = sae.cfg.d_sae if sae is not None else _width(vlm, site)
        if bad := [f for f in feats if not 0 <= f < width]:
            owner = "this SAE" if sae is not None else site
            raise InputError(f"{'latents' if sae is not None else 'units'} {bad} are not in {owner} (0..{width - 1})")

    names = [unit_name(f, None if sae is not None else site) for f in feats]
    curves, checks, sim = explain_tuning(site_features(vlm, sae, site, feats), n_bases, seed, names, min_share,
                                         where=where)
    held = [v == "holds" for v in checks.verdicts]
    scores = {"features tuned": len(feats), "with a tuning explanation": sum(bool(e) for e in checks.explanations),
              "tuning explanations that hold": sum(held),
              "tuning explanations incomplete": sum(v == "incomplete" for v in checks.verdicts),
              "mean simulation correlation (tuning)": float(sim.nanmean()),
              "median simulation correlation (tuning)": float(sim.nanmedian())}
    if explained is not None:
        label_holds = {int(f) for f, v in zip(explained.features.tolist(), explained.verdicts) if v == "holds"}
        either = [f in label_holds or h for f, h in zip(feats, held)]
        scores |= {"examined: a label or tuning curves hold": sum(either),
                   "examined: tuning curves hold where no label does": sum(h and f not in label_holds
                                                                           for f, h in zip(feats, held)),
                   "share of examined explained either way": sum(either) / max(len(feats), 1)}
    return curves, checks, scores


def unit_name(index: int, site: str | None = None) -> str:
    """How results name a latent ("latent 58") or, given its site, a site's own unit ("<site> unit 5")."""
    return f"latent {index}" if site is None else f"{site} unit {index}"


def unit_index(name: str) -> int:
    """The latent or unit index in a `unit_name`."""
    return int(name.rsplit(" ", 1)[1])


def site_features(vlm, sae, site: str, features: Sequence[int]):
    """images -> (n, rows, cols, feature) maps of the given SAE latents at `site` (sae None: the site's
    own units), the feature function the verification loop and tuning curves read."""
    encode = sae.encode if sae is not None else (lambda rows: rows)
    feats = list(features)

    def maps(images):
        return patch_maps(vlm, images, site, encode)[..., feats]

    return maps


def _width(vlm, site: str) -> int:
    """How many units `site` holds per image patch (one zoo image run)."""
    from vlmscope.data import render

    return patch_maps(vlm, [render(truth.examples(0, 1)[0].scene)], site, lambda rows: rows).shape[-1]


def chance_iou(maps: torch.Tensor, masks: dict[str, torch.Tensor], threshold: torch.Tensor) -> torch.Tensor:
    """(feature, concept) expected IoU of a random map firing as often as each feature does (above
    its dissection threshold) with each concept's mask: p q / (p + q - p q)."""
    p = (maps.flatten(1) > threshold[:, None]).float().mean(1)[:, None]  # (feature, 1)
    q = torch.stack([m.float().mean() for m in masks.values()])[None]  # (1, concept)
    return p * q / (p + q - p * q).clamp_min(1e-12)
