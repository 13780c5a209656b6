"""Verifying a formula of concepts (compose.py) patch by patch: the patches of its controlled scenes
(`controls.formula_scenes`) are grouped by their values of the attributes it names, so the formula
is true or false on a whole group; it holds when the feature fires on every group it includes and
rarely on every group it excludes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vlmscope.data.scene import Scene
from vlmscope.errors import InputError
from vlmscope.methods.explain.compose import atoms, evaluate, parse_formula
from vlmscope.methods.explain.concepts import VALUES, WHOLE, concept_masks, parse
from vlmscope.methods.explain.verdicts import Verification, decide, depends_on, firing_threshold


def patch_traits(scenes: Sequence[Scene], grid: tuple[int, int], attrs: Sequence[str]) -> torch.Tensor:
    """(scene, rows, cols, attr) index of each patch's value of each attribute, -1 where it has none
    (a background patch has no colour); "object" is 1 on an object's patches, 0 elsewhere."""
    cols = []
    for a in attrs:
        names = ["object"] if a == "object" else [f"{a}={v}" for v in VALUES[a]]
        m = torch.stack(list(concept_masks(scenes, grid, names).values()))  # (value, scene, rows, cols)
        cols.append(m.long().argmax(0).where(m.any(0), -1) if a != "object" else m[0].long())
    return torch.stack(cols, -1)


@dataclass(frozen=True)
class FiringTable:
    """Patches grouped by their values of `attrs`, with the share of each group where the feature fires."""

    attrs: tuple[str, ...]
    keys: torch.Tensor  # (group, attr) each group's value index per attribute (-1: none, e.g. a background's colour)
    rate: torch.Tensor  # (group,) share of the group's patches where the feature fires
    count: torch.Tensor  # (group,) patches
    group: torch.Tensor  # (patch,) each patch's group, patches in (scene, row, col) order
    fired: torch.Tensor  # (patch,) bool


def firing_table(maps: torch.Tensor, scenes: Sequence[Scene], attrs: Sequence[str], threshold: float) -> FiringTable:
    """maps (scene, rows, cols) of one feature, grouped by each patch's values of `attrs` (attributes of
    `concepts.VALUES`, or "object": 1 on an object's patches)."""
    traits = patch_traits(scenes, (maps.shape[1], maps.shape[2]), attrs).flatten(0, 2)  # (patch, attr)
    keys, group = traits.unique(dim=0, return_inverse=True)  # (group, attr), (patch,)
    fired = maps.flatten().float() > threshold
    count = torch.bincount(group, minlength=len(keys))
    rate = torch.bincount(group, weights=fired.double(), minlength=len(keys)) / count.clamp_min(1)
    return FiringTable(tuple(attrs), keys, rate.float(), count, group, fired)


def judge_formula(maps: torch.Tensor, scenes: Sequence[Scene], explanation: str, feature: str = "feature",
                  ratio: float = 0.25, hold: float = 0.8, off: float = 0.2, min_count: int = 4,
                  threshold: float | None = None) -> Verification:
    """A formula of concepts ("(patch=4 OR patch=5) AND background", see compose.py), read patch by
    patch on its controlled scenes (`formula_scenes`): maps (scene, rows, cols). The patches are grouped
    by their values of the attributes the formula names (a formula is true or false on a whole
    group); it holds when the feature fires on every group the formula includes (>= `hold`) and
    rarely on every group it excludes (<= `off`). Groups of fewer than `min_count` patches are not judged;
    when no group is one the formula includes, the verdict is "untested"."""
    f = parse_formula(explanation)
    names = atoms(f)
    attrs = list(dict.fromkeys("object" if parse(a)[0] in WHOLE else parse(a)[0] for a in names))
    grid = (maps.shape[1], maps.shape[2])
    if len(scenes) != len(maps):
        raise InputError(f"{len(scenes)} scenes for {len(maps)} maps")
    truth = evaluate(f, concept_masks(scenes, grid, names)).flatten()  # (patch,)
    flat = maps.flatten().float()
    threshold = firing_threshold(flat, ratio, threshold)
    table = firing_table(maps, scenes, attrs, threshold)
    keys, group, rate, count = table.keys, table.group, table.rate, table.count
    inside = torch.bincount(group, weights=truth.double(), minlength=len(keys)) > count / 2  # (group,)
    keep = count >= min_count
    keys, rate, inside, count = keys[keep], rate[keep], inside[keep], count[keep]
    kept = torch.nonzero(keep).flatten()  # (group,) their index among all groups
    values = tuple(_group_name(attrs, k) for k in keys.tolist())
    if not inside.any():  # e.g. "colour=red AND seen_colour=green" when no base object is red: nothing to judge
        return Verification(feature, explanation, values, torch.zeros(1, len(values)), rate, threshold, "untested",
                            "no controlled patch satisfies it", inside)
    on, reach = float(rate[inside].min()), float(rate[inside].max())
    off_max = float(rate[~inside].max()) if (~inside).any() else 0.0
    verdict = decide(on, off_max, hold, off, reach)
    worst = [(x, v) for x, v, i in zip(rate.tolist(), values, inside.tolist()) if not i and x > off]
    missed = [(x, v) for x, v, i in zip(rate.tolist(), values, inside.tolist()) if i and x < hold]
    why = ""
    if missed and verdict != "does not hold":  # what the firing in the groups it misses depends on
        cells = maps[0].numel()
        short = [g for g, i, x in zip(kept.tolist(), inside.tolist(), rate.tolist()) if i and x < hold]
        at = torch.nonzero(torch.isin(group, torch.tensor(short))).flatten()  # (patch,)
        why = depends_on((flat[at] > threshold), [scenes[int(i) // cells] for i in at], attrs, min_score=0.25)
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
