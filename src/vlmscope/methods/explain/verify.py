"""The verification loop (after MAIA, Shaham et al. 2024): test an explanation with controlled images.

Given a feature (any function from images to patch activations) and an explanation such as
"colour=red", single-object scenes of the shapes world are generated and, from each base scene,
one attribute is varied through all its values with everything else held fixed
(`Scene.with_object`, or the background for "domain=..."). The feature's response (its maximum
over patches) is thresholded at `ratio` (0.25) x its largest response over all generated images, and the
firing rate per value decides the verdict, stated about the feature against its explanation:

- "holds": it fires on the explained value (rate >= `hold`) and rarely on any other (<= `off`);
- "too broad": it fires on the explained value and also on others (the feature is broader than
  the explanation: an explanation "colour=red" of a feature that fires on every object);
- "too narrow": it fires on only part of the explained value's scenes and on no other value (the
  feature is narrower: it also depends on another attribute, named in `detail`);
- "does not hold": it rarely fires on the explained value, or is both partial and unselective;
- "untested": a formula no controlled patch satisfies ("colour=red AND seen_colour=green" when no
  base object is red), so nothing can be judged; a batch of explanations goes on with the others.

Three explanations name no attribute value and get their own controls. "object" (fires on any
object): every value of every object attribute is a "value" that must fire (>= `hold`), and the same
bases with the object removed must not (<= `off`; "too broad" otherwise). "patch=k" (fires at patch k
whatever it shows) and "background" (fires wherever no object is) read the response patch by patch
on the bases with the object moved through every cell and removed: "patch=k" must fire at patch k
both when it shows the object and when it shows background, and rarely at other patches;
"background" at every background patch and rarely at the object's.

A formula of concepts (compose.py: "(patch=0 OR patch=1) AND background"), "row=r" / "column=c"
and what earlier patches show ("seen_colour=red", concepts.SEEN) are judged patch by patch
(`judge_formula`) on scenes that vary every attribute the formula names together
(`formula_scenes`): the patches are grouped by their values of those attributes, and the formula
holds when the feature fires on every group it includes and rarely on every group it excludes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from vlmscope.data import render
from vlmscope.data.scene import Scene
from vlmscope.errors import InputError
from vlmscope.methods.explain.compose import is_compound
from vlmscope.methods.explain.concepts import OBJECT_ATTRIBUTES, PLACES, SEEN, VALUES, parse
from vlmscope.methods.explain.controls import (  # noqa: F401  (re-exported: the loop's scenes)
    base_scenes,
    controlled_scenes,
    empty_scenes,
    formula_axes,
    formula_key,
    formula_scenes,
    object_values,
    patch_variants,
    vary,
)
from vlmscope.methods.explain.verdicts import Verification, decide, depends_on, firing_threshold, marked
from vlmscope.methods.explain.verify_formula import judge_formula

FeatureFn = Callable[[list[np.ndarray]], torch.Tensor]  # images -> (n, rows, cols[, feature])


def judge(response: torch.Tensor, explanation: str, bases: Sequence[Scene], feature: str = "feature",
          ratio: float = 0.25, hold: float = 0.8, off: float = 0.2, threshold: float | None = None) -> Verification:
    """The verdict from responses (base, value) of the explained attribute's values (see module doc)."""
    attr, value = parse(explanation)
    if attr not in VALUES or attr in PLACES:
        raise InputError(f"judge reads an attribute value; {explanation!r} needs judge_object, judge_patch or "
                         "judge_formula")
    values = VALUES[attr]
    e = values.index(value)
    threshold = firing_threshold(response, ratio, threshold)
    fires = response > threshold  # (base, value)
    rate = fires.float().mean(0)
    on = float(rate[e])
    others = torch.cat([rate[:e], rate[e + 1:]])
    off_max = float(others.max()) if others.numel() else 0.0
    broad, narrow = off_max > off, on < hold
    verdict = decide(on, off_max, hold, off)
    detail = ""
    if broad:
        detail = "also fires on " + ", ".join(f"{attr}={values[i]}" for i in range(len(values))
                                              if i != e and float(rate[i]) > off)
    elif narrow and on > off:
        detail = depends_on(fires[:, e], bases, attr)
    return Verification(feature, explanation, values, response.float(), rate, threshold, verdict, detail,
                        marked(len(values), e))


def judge_object(response: torch.Tensor, empty: torch.Tensor, feature: str = "feature", ratio: float = 0.25,
                 hold: float = 0.8, off: float = 0.2, threshold: float | None = None) -> Verification:
    """"object": the feature (max over patches) fires on every value of every object attribute and
    not on the empty scenes. response (base, value) over `object_values()`; empty (base,)."""
    values = (*object_values(), "empty")
    r = torch.cat([response, empty[:, None]], 1)  # (base, value)
    threshold = firing_threshold(r, ratio, threshold)
    rate = (r > threshold).float().mean(0)  # (value,)
    on, off_max = float(rate[:-1].min()), float(rate[-1])
    verdict = decide(on, off_max, hold, off, reach=float(rate[:-1].max()))
    detail = "also fires on empty scenes" if off_max > off else ""
    if on < hold and verdict != "does not hold":  # the attribute whose values it separates most
        by_attr = {a: {v.partition("=")[2]: x for v, x in zip(values, rate.tolist()) if v.startswith(a + "=")}
                   for a in OBJECT_ATTRIBUTES}
        a = max(by_attr, key=lambda k: max(by_attr[k].values()) - min(by_attr[k].values()))
        fired = ", ".join(v for v, x in by_attr[a].items() if x >= 0.5) or "none half the time"
        detail = "; ".join(x for x in (detail, f"depends on {a}: fires for {fired}") if x)
    return Verification(feature, "object", values, r.float(), rate, threshold, verdict, detail,
                        marked(len(values), *range(len(values) - 1)))


def judge_patch(maps: torch.Tensor, explanation: str, feature: str = "feature", ratio: float = 0.25,
                hold: float = 0.8, off: float = 0.2, threshold: float | None = None) -> Verification:
    """"patch=k" (the patch, whatever it shows) or "background" (every patch showing no object),
    from maps (base, variant, rows, cols) over `patch_variants()`: the object in each cell, then empty.
    "patch=k" holds when the feature fires at patch k whether it shows the object or background, and
    rarely at any other patch; "background" when it fires at every patch that shows background and
    rarely at the object's patch."""
    attr, value = parse(explanation)
    n_base, n_var = maps.shape[:2]
    cells = maps.shape[2] * maps.shape[3]
    if n_var != cells + 1:
        raise InputError(f"judge_patch needs one variant per grid cell plus the empty scene on a patch grid of the "
                         f"scene's cells; got {n_var} variants for {maps.shape[2]}x{maps.shape[3]} patches")
    flat = maps.flatten(2)  # (base, variant, patch)
    threshold = firing_threshold(flat, ratio, threshold)
    fires = flat > threshold
    shows_object = torch.zeros(n_var, cells, dtype=torch.bool)  # (variant, patch)
    shows_object[torch.arange(cells), torch.arange(cells)] = True  # variant k: the object sits at patch k
    obj = shows_object[None].expand(n_base, -1, -1)
    bg_rate = (fires & ~obj).sum((0, 1)).float() / (~obj).sum((0, 1)).float()  # (patch,)
    obj_rate = (fires & obj).sum((0, 1)).float() / obj.sum((0, 1)).float().clamp_min(1)  # (patch,)
    if attr == "background":
        values = (*[str(k) for k in range(cells)], "object")
        rate = torch.cat([bg_rate, (fires & obj).sum()[None].float() / obj.sum()])
        nan = torch.tensor(float("nan"))
        at_object = torch.where(obj, flat, nan).flatten(0, 1).nanmean(1, keepdim=True)  # NaN for the empty scenes
        response = torch.cat([torch.where(obj, nan, flat).flatten(0, 1), at_object], 1)  # (scene, value)
        on, off_max = float(bg_rate.min()), float(rate[-1])
        verdict = decide(on, off_max, hold, off, reach=float(bg_rate.max()))
        explained = marked(len(values), *range(cells))
        detail = "also fires on the object" if off_max > off else ""
        if on < hold and verdict != "does not hold":
            at = [str(k) for k in range(cells) if float(bg_rate[k]) >= hold]
            detail = "; ".join(x for x in (detail, "only at patches " + (", ".join(at) or "none")) if x)
    elif attr == "patch":
        k = int(value)
        values = tuple(str(j) for j in range(cells))
        rate = fires.float().mean((0, 1))  # (patch,)
        response = flat.flatten(0, 1)  # (scene, patch)
        on = min(float(bg_rate[k]), float(obj_rate[k]))
        others = torch.cat([rate[:k], rate[k + 1:]])
        off_max = float(others.max())
        verdict = decide(on, off_max, hold, off, reach=max(float(bg_rate[k]), float(obj_rate[k])))
        explained = marked(len(values), k)
        detail = ("also fires at patch " + ", ".join(v for v, x in zip(values, rate.tolist()) if v != value and x > off)
                  if off_max > off else "")
        if on < hold and verdict != "does not hold":
            only = "background" if bg_rate[k] > obj_rate[k] else "an object"
            detail = "; ".join(x for x in (detail, f"only when the patch shows {only}") if x)
    else:
        raise InputError(f"judge_patch reads 'patch=k' or 'background', got {explanation!r}")
    return Verification(feature, explanation, values, response.float(), rate, threshold, verdict, detail, explained)


def patch_responses(feature: FeatureFn, scenes: Sequence[Scene], batch_size: int = 64) -> torch.Tensor:
    """The feature at every patch of each scene: (scene, rows, cols[, feature])."""
    return torch.cat([feature([render(s) for s in scenes[i:i + batch_size]]).float().cpu()
                      for i in range(0, len(scenes), batch_size)])


def responses(feature: FeatureFn, scenes: Sequence[Scene], batch_size: int = 64) -> torch.Tensor:
    """The feature's maximum over patches for each scene: (scene,) or (scene, feature)."""
    return patch_responses(feature, scenes, batch_size).flatten(1, 2).amax(1)


def _column(i: int, t: torch.Tensor) -> torch.Tensor:
    """Feature i of (..., feature), or the only one when one map serves every explanation."""
    return t[..., i if t.shape[-1] > 1 else 0]


def verify(feature: FeatureFn, explanation: str, n_bases: int = 24, seed: int = 0, name: str = "feature",
           **judge_kwargs) -> Verification:
    """Generate controlled scenes for the explained attribute, measure the feature, judge."""
    return verify_many(feature, [explanation], n_bases, seed, [name], **judge_kwargs)[0]


def verify_many(features: FeatureFn, explanations: Sequence[str], n_bases: int = 24, seed: int = 0,
                names: Sequence[str] | None = None, thresholds: Sequence[float] | None = None,
                ratios: Sequence[float] | None = None, **judge_kwargs) -> list[Verification]:
    """Verify many features at once: `features(images)` returns (n, rows, cols, feature), or (n, rows,
    cols) when one explanation is given; scenes are generated and run once per attribute. "object" is
    tested on every object attribute and on empty scenes, "patch=k" and "background" patch by patch,
    a formula of concepts (compose.py) patch by patch on the scenes of every attribute it names.
    thresholds: per feature, the activation above which it fires (e.g. the one dissection labelled it
    at), instead of a share of its peak on the controlled scenes. ratios: per feature, the share of
    that peak it fires above (e.g. the share dissection labelled it at), instead of one `ratio`."""
    for what, given in (("thresholds", thresholds), ("ratios", ratios)):
        if given is not None and len(given) != len(explanations):
            raise InputError(f"{len(given)} {what} for {len(explanations)} explanations")
    bases = base_scenes(n_bases, seed)
    names = list(names) if names is not None else [str(i) for i in range(len(explanations))]
    compound = [is_compound(e) or parse(e)[0] in ("row", "column", *SEEN) for e in explanations]  # read as formulas
    kinds = {parse(e)[0] for e, c in zip(explanations, compound) if not c}
    needed = {a for a in kinds if a in VALUES and a not in PLACES}
    needed |= set(OBJECT_ATTRIBUTES) if "object" in kinds else set()
    sets = {a: controlled_scenes(a, bases) for a in needed}
    if kinds & {"patch", "background"}:
        sets["patch"] = patch_variants(bases)
    for e, c in zip(explanations, compound):
        if c:
            sets.setdefault(formula_key(e), formula_scenes(e, bases))
    if "object" in kinds:
        sets["empty"] = empty_scenes(bases)

    def run(scenes):
        r = patch_responses(features, scenes)
        return r[..., None] if r.dim() == 3 else r  # (scene, rows, cols, feature)

    grids = {k: run(v) for k, v in sets.items()}  # (scene, rows, cols, feature)
    peak = {a: g.flatten(1, 2).amax(1).view(n_bases, -1, g.shape[-1])  # (base, value, feature)
            for a, g in grids.items() if isinstance(a, str)}
    out = []
    for i, (e, n, c) in enumerate(zip(explanations, names, compound)):
        attr = None if c else parse(e)[0]
        if thresholds is not None:
            judge_kwargs["threshold"] = float(thresholds[i])
        if ratios is not None:
            judge_kwargs["ratio"] = float(ratios[i])
        if c:
            key = formula_key(e)
            out.append(judge_formula(_column(i, grids[key]), sets[key], e, n, **judge_kwargs))
        elif attr == "object":
            r = torch.cat([_column(i, peak[a]) for a in OBJECT_ATTRIBUTES], 1)  # (base, value)
            out.append(judge_object(r, _column(i, peak["empty"])[:, 0], n, **judge_kwargs))
        elif attr in ("patch", "background"):
            g = grids["patch"]
            out.append(judge_patch(_column(i, g.view(n_bases, -1, *g.shape[1:])), e, n, **judge_kwargs))
        else:
            out.append(judge(_column(i, peak[attr]), e, bases, n, **judge_kwargs))
    return out
