"""Tuning curves: what a graded feature responds to, and by how much — a describer for the features
no categorical label names.

A feature graded along colour (strong on red, weaker on orange and purple, weak on green) is cut by
any firing threshold through the colour nearest it, so a label such as "colour=red OR colour=orange"
is too narrow at one share of its peak and too broad at another (docs/explain.md). Tuning curves
name it as a neuroscientist reads a neuron: around the single-object scenes it responds to most
(its preferred stimuli, from a pool of random ones), one attribute varied through all its values
with everything else held fixed (the verification loop's `controls`), the feature's mean response
per value (its maximum over patches; `where`: over the object's or the background's), and the share
of the response's variance the attribute explains (epsilon-squared over bases x values, so a
9-valued attribute does not win by chance). The attributes that explain at least `min_share` and
move the response by at least `min_range` of its range are the explanation, each value at its
level, a share of the feature's peak (`levels`):

    colour 62%: red 1.00 > orange 0.83 > purple 0.60 > yellow 0.48 > blue 0.15 > green 0.11;
    size 21%: small 0.90 > large 0.52

The explanation is a simulator (Bills et al. 2023) that needs no LLM: `score_tuning` predicts the
response to fresh single-object scenes, every attribute drawn at random, as the product of the named
curves' levels (separable tuning), and correlates the prediction with the real response.
`verify_tuning` measures the curves again around fresh bases: the explanation holds when every named
curve replicates (Pearson r >= `r_min` with the stated levels) and still explains `min_share`, and no
attribute it leaves out matters there (else it is "incomplete"; it names at most `most`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vlmscope.errors import InputError
from vlmscope.methods.explain.concepts import OBJECT_ATTRIBUTES, SCENE_ATTRIBUTES, VALUES, concept_masks
from vlmscope.methods.explain.controls import base_scenes, controlled_scenes
from vlmscope.methods.explain.score import correlation
from vlmscope.methods.explain.verdicts import trait
from vlmscope.methods.explain.verify import FeatureFn, patch_responses
from vlmscope.results import Result

TUNED = (*OBJECT_ATTRIBUTES, *SCENE_ATTRIBUTES)  # colour, shape, size, cell, domain, tone
Curves = dict[str, dict[str, float]]  # attribute -> value -> level, in the explanation's order


def variance_share(response: torch.Tensor) -> float:
    """The share of the variance of `response` (base, value) explained by the value, adjusted for the
    number of values (epsilon-squared: 1 - within / (n - k) over total / (n - 1), floored at 0); the
    bases' spread (every other attribute) stays in the unexplained part."""
    x = response.double()
    n_base, k = x.shape
    n = n_base * k
    grand = x.mean()
    total = float(((x - grand) ** 2).sum())
    if k < 2 or n <= k or total == 0:
        return 0.0
    between = n_base * float(((x.mean(0) - grand) ** 2).sum())
    return max(0.0, 1 - ((total - between) / (n - k)) / (total / (n - 1)))


@dataclass(frozen=True, repr=False)
class TuningCurves(Result):
    """Each feature's response to single-object scenes varying one attribute at a time."""

    kind = "tuning_curves"
    features: tuple[str, ...]
    attributes: tuple[str, ...]
    response: dict[str, torch.Tensor]  # attribute -> (feature, base, value) max over patches
    share: torch.Tensor  # (feature, attribute) share of the response's variance the attribute explains
    bases: torch.Tensor  # (feature, base) which scenes of the pool each feature was measured around
    where: str  # the patches the response was read at: "any", "object" or "background"
    seed: int  # the pool's (or the bases') seed: `base_scenes(pool or n_bases, seed)`
    pool: int  # how many random scenes the preferred bases were chosen from; 0: the bases themselves

    def curve(self, i: int, attribute: str) -> torch.Tensor:
        """(value,) feature i's mean response to each value of `attribute` (VALUES order)."""
        return self.response[attribute][i].mean(0)

    def peak(self, i: int) -> float:
        """Feature i's largest mean response to any value of any attribute: the explanation's unit."""
        return max(float(self.curve(i, a).max()) for a in self.attributes)

    def floor(self, i: int) -> float:
        """Zero, or feature i's lowest mean response where that is negative (a neuron before its
        nonlinearity, a residual direction): levels are read from there to the peak."""
        return min(0.0, *(float(self.curve(i, a).min()) for a in self.attributes))

    def levels(self, i: int, attribute: str) -> torch.Tensor:
        """(value,) feature i's curve for `attribute` as shares of its range from `floor` to `peak`
        (for a non-negative feature, of its peak)."""
        lo, hi = self.floor(i), self.peak(i)
        c = self.curve(i, attribute)
        return (c - lo) / (hi - lo) if hi > lo else torch.zeros_like(c)

    def span(self, i: int, attribute: str) -> float:
        """How far `attribute` moves feature i's mean response, as a share of its range (`levels`)."""
        c = self.levels(i, attribute)
        return float(c.max() - c.min())

    def matters(self, i: int, min_share: float = 0.1, min_range: float = 0.2) -> list[str]:
        """The attributes that explain at least `min_share` of feature i's response and move it by at
        least `min_range` of its peak, largest share first."""
        order = self.share[i].argsort(descending=True, stable=True).tolist()
        return [self.attributes[j] for j in order if float(self.share[i, j]) >= min_share
                and self.span(i, self.attributes[j]) >= min_range]

    def named(self, i: int, min_share: float = 0.1, most: int = 3, min_range: float = 0.2) -> list[str]:
        """The (at most `most`) attributes feature i's explanation names (`matters`)."""
        return self.matters(i, min_share, min_range)[:most]

    def explanation(self, i: int, min_share: float = 0.1, most: int = 3, min_range: float = 0.2) -> str:
        """Feature i's curves in words ('' when no attribute matters), see the module doc."""
        parts = []
        for a in self.named(i, min_share, most, min_range):
            c = self.levels(i, a)
            order = c.argsort(descending=True).tolist()
            share = float(self.share[i, self.attributes.index(a)])
            parts.append(f"{a} {share:.0%}: " + " > ".join(f"{VALUES[a][j]} {float(c[j]):.2f}" for j in order))
        return "; ".join(parts)

    def explanations(self, min_share: float = 0.1, most: int = 3, min_range: float = 0.2) -> tuple[str, ...]:
        return tuple(self.explanation(i, min_share, most, min_range) for i in range(len(self.features)))

    def __repr__(self) -> str:
        told = sum(bool(e) for e in self.explanations())
        return f"TuningCurves({len(self.features)} features over {', '.join(self.attributes)}; {told} explained)"

    def to_dataframe(self):
        """One row per feature, attribute and value: the mean response, its level (`levels`) and the
        attribute's share of the variance."""
        import pandas as pd

        rows = []
        for i, f in enumerate(self.features):
            for j, a in enumerate(self.attributes):
                for v, r, x in zip(VALUES[a], self.curve(i, a).tolist(), self.levels(i, a).tolist()):
                    rows.append({"feature": f, "attribute": a, "value": v, "mean_response": r, "level": x,
                                 "share": float(self.share[i, j])})
        return pd.DataFrame(rows)


def tuning_curves(features: FeatureFn, n_bases: int = 24, seed: int = 0, names: Sequence[str] | None = None,
                  attributes: Sequence[str] = TUNED, pool: int | None = 240, where: str = "any") -> TuningCurves:
    """Measure the tuning curves of one or many features (`features(images)` -> (n, rows, cols) or
    (n, rows, cols, feature)): from each of `n_bases` single-object scenes, every attribute varied
    through all its values. pool: draw that many random scenes and measure each feature around the
    `n_bases` it responds to most (its preferred stimuli, as a neuron's tuning is measured), so that
    an attribute that matters only in some context (colour, for small objects in the middle column)
    shows; None: the same `n_bases` random scenes for every feature. where: the patches its response is
    read at (`read`: "any", "object" or "background")."""
    bad = [a for a in attributes if a not in TUNED]
    if bad or not attributes:
        raise InputError(f"tuning curves vary {list(TUNED)}; got {bad or 'none'}")
    if pool is not None and pool < n_bases:
        raise InputError(f"a pool of {pool} scenes cannot give {n_bases} preferred bases per feature")
    scenes = base_scenes(pool or n_bases, seed)
    if pool:
        r = read(features, scenes, where)  # (scene, feature)
        chosen = r.T.argsort(dim=1, descending=True, stable=True)[:, :n_bases].contiguous()  # (feature, base)
    else:
        chosen = None
    used = torch.arange(n_bases) if chosen is None else chosen.unique()  # sorted scene indices measured
    bases = [scenes[int(u)] for u in used]
    response = {}
    for a in attributes:
        r = read(features, controlled_scenes(a, bases), where)  # (base * value, feature)
        r = r.view(len(bases), len(VALUES[a]), -1).permute(2, 0, 1)  # (feature, base, value)
        if chosen is None:
            chosen = used.repeat(r.shape[0], 1)
        at = torch.searchsorted(used, chosen)  # (feature, base) rows of `bases`
        response[a] = r[torch.arange(r.shape[0])[:, None], at].contiguous()
    n = len(chosen)
    names = tuple(names) if names is not None else tuple(str(i) for i in range(n))
    if len(names) != n:
        raise InputError(f"{len(names)} names for {n} features")
    share = torch.tensor([[variance_share(response[a][i]) for a in attributes] for i in range(n)])
    return TuningCurves(names, tuple(attributes), response, share.reshape(n, len(attributes)), chosen, where, seed,
                        pool or 0)


WHERE = ("any", "object", "background")  # the patches a feature's response is read at


def read(features: FeatureFn, scenes: Sequence, where: str = "any") -> torch.Tensor:
    """(scene, feature) each feature's largest response over the patches `where` says: any patch, the
    object's, or the background's (a neuron strongest on objects may carry the background style in
    its weaker background response)."""
    if where not in WHERE:
        raise InputError(f"where={where!r}: the response is read at one of {list(WHERE)}")
    maps = patch_responses(features, scenes)  # (scene, rows, cols[, feature])
    maps = maps[..., None] if maps.dim() == 3 else maps
    if where != "any":
        keep = concept_masks(scenes, (maps.shape[1], maps.shape[2]), [where])[where]  # (scene, rows, cols)
        maps = maps.masked_fill(~keep[..., None], float("-inf"))
    return maps.flatten(1, 2).amax(1).nan_to_num(neginf=0.0)


def preferred_scene(curves: TuningCurves, i: int, rank: int = 0):
    """The scene feature i was measured around at `rank` (0: the one it responds to most)."""
    return base_scenes(curves.pool or curves.bases.shape[1], curves.seed)[int(curves.bases[i, rank])]


def tuning_views(features: FeatureFn, curves: TuningCurves, i: int, attributes: Sequence[str] | None = None,
                 rank: int = 0) -> dict[str, tuple[list, torch.Tensor]]:
    """What the curves summarise, as images: feature i's preferred scene (`rank`) varied through every
    value of each attribute (default: those its explanation names, else all), with feature i's map
    over patches on each: {attribute: (scenes, maps (value, rows, cols))} (`plots_features.tuning_grid`
    draws it)."""
    base = preferred_scene(curves, i, rank)
    attributes = list(attributes) if attributes is not None else (curves.named(i) or list(curves.attributes))
    out = {}
    for a in attributes:
        scenes = controlled_scenes(a, [base])
        maps = patch_responses(features, scenes)
        out[a] = (scenes, maps[..., i if maps.shape[-1] > 1 else 0] if maps.dim() == 4 else maps)
    return out


_PART = re.compile(r"^\s*(\w+)\s+[\d.]+%\s*:\s*(.+)$")


def parse_tuning(text: str) -> Curves:
    """'colour 62%: red 1.00 > orange 0.83 > ...; size 21%: small 0.90 > large 0.52' -> {attribute:
    {value: level}}. Every value of a named attribute must be given, as `TuningCurves.explanation`
    writes them."""
    out: Curves = {}
    for part in (p for p in text.split(";") if p.strip()):
        m = _PART.match(part)
        if not m:
            raise InputError(f"a tuning explanation reads 'attribute NN%: value level > value level ...', got {part!r}")
        attr, body = m.groups()
        if attr not in TUNED:
            raise InputError(f"unknown attribute {attr!r} in {part!r}; tuning curves vary {list(TUNED)}")
        levels = {}
        for item in body.split(">"):
            bits = item.split()
            if len(bits) != 2 or bits[0] not in VALUES[attr]:
                raise InputError(f"{item.strip()!r} in {part!r} is not '<value> <level>' with a value of {attr}: "
                                 f"{list(VALUES[attr])}")
            levels[bits[0]] = float(bits[1])
        if set(levels) != set(VALUES[attr]):
            raise InputError(f"{attr} needs a level for every value {list(VALUES[attr])}, got {list(levels)}")
        out[attr] = levels
    return out


def predict(curves: Curves, scenes: Sequence) -> torch.Tensor:
    """(scene,) the response the curves predict for single-object scenes: the product of each named
    attribute's level at the scene's value (separable tuning: a feature that needs small objects in
    the middle column is silent on large ones, whatever their colour). Meant for non-negative
    features (SAE latents, neurons after their nonlinearity)."""
    pred = torch.ones(len(scenes), dtype=torch.float64)
    for attr, levels in curves.items():
        pred *= torch.tensor([levels[trait(s, attr)] for s in scenes], dtype=torch.float64)
    return pred


def score_tuning(features: FeatureFn, explanations: Sequence[str], n: int = 300, seed: int = 2,
                 where: str = "any") -> torch.Tensor:
    """(feature,) simulation score (Bills et al.): the correlation between each explanation's
    prediction (`predict`) and the feature's real response on n fresh single-object scenes with every
    attribute at random; NaN for an empty explanation."""
    scenes = base_scenes(n, seed)
    real = read(features, scenes, where)
    out = torch.full((len(explanations),), float("nan"))
    for i, e in enumerate(explanations):
        if e:
            out[i] = correlation(real[:, i if real.shape[1] > 1 else 0], predict(parse_tuning(e), scenes).float())
    return out


@dataclass(frozen=True, repr=False)
class TuningVerification(Result):
    """Tuning explanations tested on fresh controlled scenes: per feature, the verdict and why, with
    the fresh curves it was judged on (`fresh`)."""

    kind = "tuning_verification"
    features: tuple[str, ...]
    explanations: tuple[str, ...]
    verdicts: tuple[str, ...]  # holds / incomplete / does not hold
    details: tuple[str, ...]
    attributes: tuple[str, ...]
    fresh_response: dict[str, torch.Tensor]  # attribute -> (feature, base, value), on the fresh bases
    fresh_share: torch.Tensor  # (feature, attribute)
    fresh_bases: torch.Tensor  # (feature, base)
    where: str
    seed: int  # the fresh pool's
    pool: int

    @property
    def fresh(self) -> TuningCurves:
        return TuningCurves(self.features, self.attributes, self.fresh_response, self.fresh_share, self.fresh_bases,
                            self.where, self.seed, self.pool)

    def __repr__(self) -> str:
        held = sum(v == "holds" for v in self.verdicts)
        return f"TuningVerification({held} of {len(self.verdicts)} tuning explanations hold)"

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame({"feature": list(self.features), "explanation": list(self.explanations),
                             "verdict": list(self.verdicts), "detail": list(self.details)})


def judge_tuning(fresh: TuningCurves, i: int, explanation: str, r_min: float = 0.9,
                 min_share: float = 0.1, min_range: float = 0.2) -> tuple[str, str]:
    """(verdict, detail) for feature i's explanation against its `fresh` curves (measured on new bases)."""
    if not explanation:
        return "does not hold", "no attribute explains it"
    stated = parse_tuning(explanation)
    share = dict(zip(fresh.attributes, fresh.share[i].tolist()))
    problems = []
    for attr, levels in stated.items():
        if attr not in share:
            raise InputError(f"the fresh curves do not vary {attr!r}; they vary {list(fresh.attributes)}")
        got = fresh.curve(i, attr).double()
        want = torch.tensor([levels[v] for v in VALUES[attr]], dtype=torch.float64)
        r = float(correlation(got, want)) if got.std() > 0 and want.std() > 0 else float("nan")
        if not r >= r_min or share[attr] < min_share:
            problems.append(f"{attr}: r {r:.2f} with the stated levels, explains {share[attr]:.0%}")
    if problems:
        return "does not hold", "; ".join(problems)
    missed = [a for a in fresh.matters(i, min_share, min_range) if a not in stated]
    if missed:
        return "incomplete", "also depends on " + ", ".join(f"{a} ({share[a]:.0%})" for a in missed)
    return "holds", ""


def verify_tuning(features: FeatureFn, explanations: Sequence[str], n_bases: int = 24, seed: int = 1,
                  names: Sequence[str] | None = None, r_min: float = 0.9, min_share: float = 0.1,
                  pool: int | None = 240, min_range: float = 0.2, where: str = "any") -> TuningVerification:
    """Measure the curves again on `n_bases` fresh bases (seed; `pool` as in `tuning_curves`) and judge each explanation
    (`judge_tuning`): holds, incomplete (an attribute it leaves out matters, `TuningCurves.matters`),
    or does not hold (a named curve does not replicate, or no longer explains `min_share`)."""
    for e in explanations:
        parse_tuning(e)  # clear errors before any scene is rendered
    fresh = tuning_curves(features, n_bases, seed, names, pool=pool, where=where)
    if len(fresh.features) != len(explanations):
        raise InputError(f"{len(explanations)} explanations for {len(fresh.features)} features")
    judged = [judge_tuning(fresh, i, e, r_min, min_share, min_range) for i, e in enumerate(explanations)]
    return TuningVerification(fresh.features, tuple(explanations), tuple(v for v, _ in judged),
                              tuple(d for _, d in judged), fresh.attributes, fresh.response, fresh.share,
                              fresh.bases, where, fresh.seed, fresh.pool)


def explain_tuning(features: FeatureFn, n_bases: int = 24, seed: int = 0, names: Sequence[str] | None = None,
                   min_share: float = 0.1, most: int = 3, pool: int | None = 240, min_range: float = 0.2,
                   where: str = "any") -> tuple[TuningCurves, TuningVerification, torch.Tensor]:
    """Describe, verify and score in one call: curves around bases of `seed`, verified around those of
    seed + 1, simulation scores on random scenes of seed + 2. Returns (curves, verification, scores
    (feature,))."""
    curves = tuning_curves(features, n_bases, seed, names, pool=pool, where=where)
    texts = curves.explanations(min_share, most, min_range)
    checks = verify_tuning(features, texts, n_bases, seed + 1, curves.features, min_share=min_share, pool=pool,
                           min_range=min_range, where=where)
    return curves, checks, score_tuning(features, texts, seed=seed + 2, where=where)

