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
- "does not hold": it rarely fires on the explained value, or is both partial and unselective.

Three explanations name no attribute value and get their own controls. "object" (fires on any
object): every value of every object attribute is a "value" that must fire (>= `hold`), and the same
bases with the object removed must not (<= `off`; "too broad" otherwise). "patch=k" (fires at patch k
whatever it shows) and "background" (fires wherever no object is) read the response patch by patch
on the bases with the object moved through every cell and removed: "patch=k" must fire at patch k
both when it shows the object and when it shows background, and rarely at other patches;
"background" at every background patch and rarely at the object's.

A formula of concepts (compose.py: "(patch=0 OR patch=1) AND background") and "row=r" / "column=c"
are judged patch by patch (`judge_formula`) on scenes that vary every attribute the formula names
together (`formula_scenes`): the patches are grouped by their values of those attributes, and the
formula holds when the feature fires on every group it includes and rarely on every group it excludes.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from vlmscope.data import render
from vlmscope.data.scene import CELL, JITTER, Scene, place, random_attrs
from vlmscope.data.vocab import DOMAINS, GRID
from vlmscope.errors import InputError
from vlmscope.methods.explain.compose import atoms, evaluate, is_compound, parse_formula
from vlmscope.methods.explain.concepts import (
    MID_GREY,
    OBJECT_ATTRIBUTES,
    PLACES,
    SCENE_ATTRIBUTES,
    VALUES,
    WHOLE,
    concept_masks,
    parse,
    tone,
)
from vlmscope.results import Result

FeatureFn = Callable[[list[np.ndarray]], torch.Tensor]  # images -> (n, rows, cols[, feature])


@dataclass(frozen=True, repr=False)
class Verification(Result):
    """Responses of a feature to controlled images varying one attribute, and the verdict."""

    kind = "verification"
    feature: str
    explanation: str
    values: tuple[str, ...]  # the varied attribute's values (a formula: the kinds of patch it tells apart)
    response: torch.Tensor  # (base, value) max over patches; patch=k, background: (scene, value) at that patch
    fire_rate: torch.Tensor  # (value,) share of bases where it fires
    threshold: float
    verdict: str
    detail: str
    explained: torch.Tensor  # (value,) bool: the values the explanation says it fires on

    def __repr__(self) -> str:
        detail = f"; {self.detail}" if self.detail else ""
        return f"Verification({self.feature}: {self.explanation!r} {self.verdict}{detail})"

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame({"value": list(self.values), "fire_rate": self.fire_rate.tolist(),
                             "mean_response": self.response.nanmean(0).tolist(),
                             "explained": self.explained.tolist()})


def base_scenes(n: int, seed: int = 0) -> list[Scene]:
    """n random single-object scenes (random shape, colour, size, cell, background)."""
    rng = np.random.default_rng([seed, 4241])
    return [place(rng, random_attrs(rng, 1), domain=DOMAINS[int(rng.integers(len(DOMAINS)))]) for _ in range(n)]


def vary(scene: Scene, attribute: str, value: str) -> Scene:
    """The scene with its first object's `attribute` (or the background's domain or tone) set to
    `value`; a tone change mirrors the grey level about the middle of its range (dark 100 <-> light 155)."""
    if attribute == "domain":
        return replace(scene, domain=value)
    if attribute == "tone":
        return scene if tone(scene) == value else replace(scene, grey=2 * MID_GREY - 1 - scene.grey)
    if attribute == "cell":
        o, k = scene.objects[0], int(value)
        dx, dy = o.x - (o.col * CELL + CELL // 2), o.y - (o.row * CELL + CELL // 2)
        return scene.with_object(0, cell=k, x=(k % GRID) * CELL + CELL // 2 + dx, y=(k // GRID) * CELL + CELL // 2 + dy)
    if attribute == "size":  # a large object tolerates less jitter: pull the centre in if needed
        o, j = scene.objects[0], JITTER[value]
        cx, cy = o.col * CELL + CELL // 2, o.row * CELL + CELL // 2
        x, y = cx + max(-j, min(j, o.x - cx)), cy + max(-j, min(j, o.y - cy))
        return scene.with_object(0, size=value, x=x, y=y)
    return scene.with_object(0, **{attribute: value})


def controlled_scenes(attribute: str, bases: Sequence[Scene]) -> list[Scene]:
    """Every base with `attribute` set to each of its values, base-major (base * values + value)."""
    return [vary(b, attribute, v) for b in bases for v in VALUES[attribute]]


def _trait(scene: Scene, attribute: str) -> str:
    if attribute in SCENE_ATTRIBUTES:
        return scene.domain if attribute == "domain" else tone(scene)
    o = scene.objects[0]
    return str(o.cell) if attribute == "cell" else getattr(o, attribute)


def judge(response: torch.Tensor, explanation: str, bases: Sequence[Scene], feature: str = "feature",
          ratio: float = 0.25, hold: float = 0.8, off: float = 0.2, threshold: float | None = None) -> Verification:
    """The verdict from responses (base, value) of the explained attribute's values (see module doc)."""
    attr, value = parse(explanation)
    if attr not in VALUES or attr in PLACES:
        raise InputError(f"judge reads an attribute value; {explanation!r} needs judge_object, judge_patch or "
                         "judge_formula")
    values = VALUES[attr]
    e = values.index(value)
    threshold = _threshold(response, ratio, threshold)
    fires = response > threshold  # (base, value)
    rate = fires.float().mean(0)
    on = float(rate[e])
    others = torch.cat([rate[:e], rate[e + 1:]])
    off_max = float(others.max()) if others.numel() else 0.0
    broad, narrow = off_max > off, on < hold
    verdict = _verdict(on, off_max, hold, off)
    detail = ""
    if broad:
        detail = "also fires on " + ", ".join(f"{attr}={values[i]}" for i in range(len(values))
                                              if i != e and float(rate[i]) > off)
    elif narrow and on > off:
        detail = _narrowing(fires[:, e], bases, attr)
    return Verification(feature, explanation, values, response.float(), rate, threshold, verdict, detail,
                        _one_hot(len(values), e))


def _one_hot(n: int, *on: int) -> torch.Tensor:
    m = torch.zeros(n, dtype=torch.bool)
    m[list(on)] = True
    return m


def _narrowing(fired: torch.Tensor, bases: Sequence[Scene], varied: str | Sequence[str],
               min_score: float = 0.0) -> str:
    """The other attribute that best explains where the feature fired (one scene per observation):
    the largest share of the firing's variance explained by the attribute's values, adjusted for
    their number (epsilon-squared, so a 9-valued attribute does not win by chance over a 2-valued
    one), if above `min_score`; `varied`: the attribute(s) the explanation names, not candidates."""
    best, text = min_score, ""
    for attr in (*OBJECT_ATTRIBUTES, *SCENE_ATTRIBUTES):
        if attr == varied or attr in varied:
            continue
        groups: dict[str, list[bool]] = {}
        for f, b in zip(fired.tolist(), bases):
            if b.objects or attr in SCENE_ATTRIBUTES:
                groups.setdefault(_trait(b, attr), []).append(bool(f))
        n, k = sum(map(len, groups.values())), len(groups)
        mean = sum(map(sum, groups.values())) / max(n, 1)
        total = n * mean * (1 - mean)  # sum of squares of a 0/1 variable
        if k < 2 or n <= k or total == 0:
            continue
        rates = {v: sum(x) / len(x) for v, x in groups.items()}
        within = total - sum(len(x) * (rates[v] - mean) ** 2 for v, x in groups.items())
        score = 1 - (within / (n - k)) / (total / (n - 1))
        if score > best:
            best = score
            text = f"depends on {attr}: fires for " + ", ".join(sorted(v for v, r in rates.items() if r >= 0.5))
    return text


def patch_responses(feature: FeatureFn, scenes: Sequence[Scene], batch_size: int = 64) -> torch.Tensor:
    """The feature at every patch of each scene: (scene, rows, cols[, feature])."""
    return torch.cat([feature([render(s) for s in scenes[i:i + batch_size]]).float().cpu()
                      for i in range(0, len(scenes), batch_size)])


def responses(feature: FeatureFn, scenes: Sequence[Scene], batch_size: int = 64) -> torch.Tensor:
    """The feature's maximum over patches for each scene: (scene,) or (scene, feature)."""
    return patch_responses(feature, scenes, batch_size).flatten(1, 2).amax(1)


def empty_scenes(bases: Sequence[Scene]) -> list[Scene]:
    """Every base with its object removed: the same background, nothing on it."""
    return [replace(b, objects=()) for b in bases]


def _threshold(response: torch.Tensor, ratio: float, given: float | None = None) -> float:
    """A feature fires above `given` when set (the activation its label was found at), else above
    `ratio` x its largest response (never, if it never responds)."""
    if given is not None:
        return float(given)
    peak = float(response.max())
    return ratio * peak if peak > 0 else float("inf")


def _verdict(on: float, off_max: float, hold: float, off: float, reach: float | None = None) -> str:
    """on: the rate on the whole explained set; off_max: the highest rate outside it; reach: the rate
    on the part of the explained set it fires on most (= on for one value)."""
    broad, narrow = off_max > off, on < hold
    if (on if reach is None else reach) <= off or (broad and narrow):
        return "does not hold"
    return "too broad" if broad else "too narrow" if narrow else "holds"


def judge_object(response: torch.Tensor, empty: torch.Tensor, feature: str = "feature", ratio: float = 0.25,
                 hold: float = 0.8, off: float = 0.2, threshold: float | None = None) -> Verification:
    """"object": the feature (max over patches) fires on every value of every object attribute and
    not on the empty scenes. response (base, value) over `object_values()`; empty (base,)."""
    values = (*object_values(), "empty")
    r = torch.cat([response, empty[:, None]], 1)  # (base, value)
    threshold = _threshold(r, ratio, threshold)
    rate = (r > threshold).float().mean(0)  # (value,)
    on, off_max = float(rate[:-1].min()), float(rate[-1])
    verdict = _verdict(on, off_max, hold, off, reach=float(rate[:-1].max()))
    detail = "also fires on empty scenes" if off_max > off else ""
    if on < hold and verdict != "does not hold":  # the attribute whose values it separates most
        by_attr = {a: {v.partition("=")[2]: x for v, x in zip(values, rate.tolist()) if v.startswith(a + "=")}
                   for a in OBJECT_ATTRIBUTES}
        a = max(by_attr, key=lambda k: max(by_attr[k].values()) - min(by_attr[k].values()))
        fired = ", ".join(v for v, x in by_attr[a].items() if x >= 0.5) or "none half the time"
        detail = "; ".join(x for x in (detail, f"depends on {a}: fires for {fired}") if x)
    return Verification(feature, "object", values, r.float(), rate, threshold, verdict, detail,
                        _one_hot(len(values), *range(len(values) - 1)))


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
    threshold = _threshold(flat, ratio, threshold)
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
        verdict = _verdict(on, off_max, hold, off, reach=float(bg_rate.max()))
        explained = _one_hot(len(values), *range(cells))
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
        verdict = _verdict(on, off_max, hold, off, reach=max(float(bg_rate[k]), float(obj_rate[k])))
        explained = _one_hot(len(values), k)
        detail = ("also fires at patch " + ", ".join(v for v, x in zip(values, rate.tolist()) if v != value and x > off)
                  if off_max > off else "")
        if on < hold and verdict != "does not hold":
            only = "background" if bg_rate[k] > obj_rate[k] else "an object"
            detail = "; ".join(x for x in (detail, f"only when the patch shows {only}") if x)
    else:
        raise InputError(f"judge_patch reads 'patch=k' or 'background', got {explanation!r}")
    return Verification(feature, explanation, values, response.float(), rate, threshold, verdict, detail, explained)


def _patch_traits(scenes: Sequence[Scene], grid: tuple[int, int], attrs: Sequence[str]) -> torch.Tensor:
    """(scene, rows, cols, attr) index of each patch's value of each attribute, -1 where it has none
    (a background patch has no colour); "object" is 1 on an object's patches, 0 elsewhere."""
    cols = []
    for a in attrs:
        names = ["object"] if a == "object" else [f"{a}={v}" for v in VALUES[a]]
        m = torch.stack(list(concept_masks(scenes, grid, names).values()))  # (value, scene, rows, cols)
        cols.append(m.long().argmax(0).where(m.any(0), -1) if a != "object" else m[0].long())
    return torch.stack(cols, -1)


def judge_formula(maps: torch.Tensor, scenes: Sequence[Scene], explanation: str, feature: str = "feature",
                  ratio: float = 0.25, hold: float = 0.8, off: float = 0.2, min_count: int = 4,
                  threshold: float | None = None) -> Verification:
    """A formula of concepts ("(patch=4 OR patch=5) AND background", see compose.py), read patch by
    patch on its controlled scenes (`formula_scenes`): maps (scene, rows, cols). The patches are grouped
    by their values of the attributes the formula names (a formula is true or false on a whole
    group); it holds when the feature fires on every group the formula includes (>= `hold`) and
    rarely on every group it excludes (<= `off`). Groups of fewer than `min_count` patches are not judged."""
    f = parse_formula(explanation)
    names = atoms(f)
    attrs = list(dict.fromkeys("object" if parse(a)[0] in WHOLE else parse(a)[0] for a in names))
    grid = (maps.shape[1], maps.shape[2])
    if len(scenes) != len(maps):
        raise InputError(f"{len(scenes)} scenes for {len(maps)} maps")
    truth = evaluate(f, concept_masks(scenes, grid, names)).flatten()  # (patch,)
    traits = _patch_traits(scenes, grid, attrs).flatten(0, 2)  # (patch, attr)
    keys, group = traits.unique(dim=0, return_inverse=True)  # (group, attr), (patch,)
    flat = maps.flatten().float()
    threshold = _threshold(flat, ratio, threshold)
    count = torch.bincount(group, minlength=len(keys))
    rate = torch.bincount(group, weights=(flat > threshold).double(), minlength=len(keys)) / count.clamp_min(1)
    inside = torch.bincount(group, weights=truth.double(), minlength=len(keys)) > count / 2  # (group,)
    keep = count >= min_count
    keys, rate, inside, count = keys[keep], rate[keep].float(), inside[keep], count[keep]
    kept = torch.nonzero(keep).flatten()  # (group,) their index among all groups
    values = tuple(_group_name(attrs, k) for k in keys.tolist())
    if not inside.any():
        raise InputError(f"no controlled patch satisfies {explanation!r}; it cannot be tested")
    on, reach = float(rate[inside].min()), float(rate[inside].max())
    off_max = float(rate[~inside].max()) if (~inside).any() else 0.0
    verdict = _verdict(on, off_max, hold, off, reach)
    worst = [(x, v) for x, v, i in zip(rate.tolist(), values, inside.tolist()) if not i and x > off]
    missed = [(x, v) for x, v, i in zip(rate.tolist(), values, inside.tolist()) if i and x < hold]
    why = ""
    if missed and verdict != "does not hold":  # what the firing in the groups it misses depends on
        cells = maps[0].numel()
        short = [g for g, i, x in zip(kept.tolist(), inside.tolist(), rate.tolist()) if i and x < hold]
        at = torch.nonzero(torch.isin(group, torch.tensor(short))).flatten()  # (patch,)
        why = _narrowing((flat[at] > threshold), [scenes[int(i) // cells] for i in at], attrs, min_score=0.25)
    detail = "; ".join(x for x in (
        "also fires on " + ", ".join(v for _, v in sorted(worst, reverse=True)[:3]) if worst else "",
        "misses " + ", ".join(v for _, v in sorted(missed)[:3]) if missed and verdict != "does not hold" else "",
        why) if x)
    response = torch.full((int(count.max()), len(values)), float("nan"))  # (observation, group)
    for j, g in enumerate(kept.tolist()):
        r = flat[group == g]
        response[:len(r), j] = r
    return Verification(feature, explanation, values, response, rate, threshold, verdict, detail, inside)


def _group_name(attrs: Sequence[str], key: Sequence[int]) -> str:
    parts = []
    for a, k in zip(attrs, key):
        if a == "object":
            parts.append("object" if k else "background")
        elif k >= 0:
            parts.append(f"{a}={VALUES[a][k]}")
    return " & ".join(parts) or "background"


def formula_axes(explanation: str) -> tuple[str, ...]:
    """The attributes a formula's controlled scenes vary together: those it names ("patch",
    "object" and "background" move the object through every cell, "cell")."""
    kinds = {parse(a)[0] for a in atoms(parse_formula(explanation))}
    moves = bool(kinds & {*PLACES, *WHOLE})
    return tuple(a for a in (*OBJECT_ATTRIBUTES, *SCENE_ATTRIBUTES) if a in kinds or (a == "cell" and moves))


def formula_scenes(explanation: str, bases: Sequence[Scene], max_scenes: int = 3000) -> list[Scene]:
    """Controlled scenes for a formula: from each base, every combination of values of the attributes
    it names (`formula_axes`), everything else held fixed, plus the base emptied when it speaks of
    patches, objects or background; only as many bases (at least 8) as keep it under `max_scenes`."""
    axes = formula_axes(explanation)
    empty = bool({parse(a)[0] for a in atoms(parse_formula(explanation))} & {*PLACES, *WHOLE})
    combos = list(itertools.product(*(VALUES[a] for a in axes)))
    n = max(8, min(len(bases), max_scenes // (len(combos) + empty)))
    out = []
    for b in bases[:n]:
        for combo in combos:
            s = b
            for a, v in zip(axes, combo):
                s = vary(s, a, v)
            out.append(s)
        if empty:
            out.append(replace(b, objects=()))
    return out


def object_values() -> tuple[str, ...]:
    """The values `judge_object` sees, attribute-major: "colour=red", ..., "cell=8"."""
    return tuple(f"{a}={v}" for a in OBJECT_ATTRIBUTES for v in VALUES[a])


def patch_variants(bases: Sequence[Scene]) -> list[Scene]:
    """Every base with its object in each cell, then empty, base-major (base * (cells + 1) + variant)."""
    cells = controlled_scenes("cell", bases)
    n = len(VALUES["cell"])
    return [s for i, e in enumerate(empty_scenes(bases)) for s in (*cells[i * n:(i + 1) * n], e)]


def _column(i: int, t: torch.Tensor) -> torch.Tensor:
    """Feature i of (..., feature), or the only one when one map serves every explanation."""
    return t[..., i if t.shape[-1] > 1 else 0]


def verify(feature: FeatureFn, explanation: str, n_bases: int = 24, seed: int = 0, name: str = "feature",
           **judge_kwargs) -> Verification:
    """Generate controlled scenes for the explained attribute, measure the feature, judge."""
    return verify_many(feature, [explanation], n_bases, seed, [name], **judge_kwargs)[0]


def verify_many(features: FeatureFn, explanations: Sequence[str], n_bases: int = 24, seed: int = 0,
                names: Sequence[str] | None = None, thresholds: Sequence[float] | None = None,
                **judge_kwargs) -> list[Verification]:
    """Verify many features at once: `features(images)` returns (n, rows, cols, feature), or (n, rows,
    cols) when one explanation is given; scenes are generated and run once per attribute. "object" is
    tested on every object attribute and on empty scenes, "patch=k" and "background" patch by patch,
    a formula of concepts (compose.py) patch by patch on the scenes of every attribute it names.
    thresholds: per feature, the activation above which it fires (e.g. the one dissection labelled it
    at), instead of a share of its peak on the controlled scenes."""
    bases = base_scenes(n_bases, seed)
    names = list(names) if names is not None else [str(i) for i in range(len(explanations))]
    compound = [is_compound(e) or parse(e)[0] in ("row", "column") for e in explanations]  # read as formulas
    kinds = {parse(e)[0] for e, c in zip(explanations, compound) if not c}
    needed = {a for a in kinds if a in VALUES and a not in PLACES}
    needed |= set(OBJECT_ATTRIBUTES) if "object" in kinds else set()
    sets = {a: controlled_scenes(a, bases) for a in needed}
    if kinds & {"patch", "background"}:
        sets["patch"] = patch_variants(bases)
    for e, c in zip(explanations, compound):
        if c:
            sets.setdefault(formula_axes(e), formula_scenes(e, bases))
    if "object" in kinds:
        sets["empty"] = empty_scenes(bases)

    def run(scenes):
        r = patch_responses(features, scenes)
        return r[..., None] if r.dim() == 3 else r  # (scene, rows, cols, feature)

    grids = {k: run(v) for k, v in sets.items()}  # (scene, rows, cols, feature)
    peak = {a: g.flatten(1, 2).amax(1).view(n_bases, -1, g.shape[-1])  # (base, value, feature)
            for a, g in grids.items() if isinstance(a, str)}
    out = []
    if thresholds is not None and len(thresholds) != len(explanations):
        raise InputError(f"{len(thresholds)} thresholds for {len(explanations)} explanations")
    for i, (e, n, c) in enumerate(zip(explanations, names, compound)):
        attr = None if c else parse(e)[0]
        if thresholds is not None:
            judge_kwargs["threshold"] = float(thresholds[i])
        if c:
            key = formula_axes(e)
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
