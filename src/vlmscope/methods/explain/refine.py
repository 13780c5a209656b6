"""Refining an explanation by experiment: the loop MAIA runs (Shaham et al. 2024) — hypothesis,
controlled experiment, revised hypothesis — on the shapes world, where the experiments are exact.

Each round verifies the current explanation (verify.py). If it does not hold, the feature is read
patch by patch on new controlled scenes that vary every attribute the explanation names together
("row" and "column" read as "patch"; "object" and "background" as "object"). Then, one at a time
and at most two, the attribute that explains most more of where it fires (epsilon-squared of the
patch-level firing, as the verdicts' "depends on") joins them and the scenes are read again.
The patches are grouped by their values of those attributes, and the next explanation is a short
formula true on the groups where the feature fires on most patches and false on the others
(cover.py). Each proposal is verified on scenes drawn from another seed than the ones it was read
from, so an explanation is never judged on the data that produced it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vlmscope.errors import InputError
from vlmscope.methods.explain.compose import atoms, parse_formula
from vlmscope.methods.explain.concepts import OBJECT_ATTRIBUTES, PLACES, SCENE_ATTRIBUTES, SEEN, WHOLE, parse
from vlmscope.methods.explain.controls import base_scenes, kind_scenes
from vlmscope.methods.explain.cover import cover_text, formula_size
from vlmscope.methods.explain.verdicts import epsilon_squared, firing_threshold
from vlmscope.methods.explain.verify import FeatureFn, patch_responses, verify
from vlmscope.methods.explain.verify_formula import FiringTable, firing_table, patch_traits
from vlmscope.results import Result

# the shares of its peak a feature may be read to fire above: the verification loop's 0.25 first
RATIOS = (0.25, 0.4, 0.55)
# what a patch can be grouped by: the object at it, where it is, whether it shows an object, the image
READ_ATTRIBUTES = (*OBJECT_ATTRIBUTES, "patch", "object", *SCENE_ATTRIBUTES)


@dataclass(frozen=True, repr=False)
class Refinement(Result):
    """Each round's explanation (the first given), its verdict on fresh controlled scenes, and the
    attributes the next explanation was read from ("" after the last round)."""

    kind = "refinement"
    feature: str
    explanations: tuple[str, ...]
    verdicts: tuple[str, ...]
    details: tuple[str, ...]
    read: tuple[str, ...]  # per round, "colour, size": the attributes the next proposal was read over
    ratios: tuple[float, ...]  # per round, the share of its peak above which the feature counts as firing
    stopped: str  # why the loop ended

    @property
    def final(self) -> str:
        return self.explanations[-1]

    @property
    def holds(self) -> bool:
        return self.verdicts[-1] == "holds"

    def __repr__(self) -> str:
        at = [f" above {r:g} of its peak" if r != self.ratios[0] else "" for r in self.ratios]
        steps = " -> ".join(f"{e!r} ({v}{a})" for e, v, a in zip(self.explanations, self.verdicts, at))
        return f"Refinement({self.feature}: {steps}; {self.stopped})"

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame({"round": range(len(self.explanations)), "explanation": list(self.explanations),
                             "verdict": list(self.verdicts), "detail": list(self.details), "read": list(self.read),
                             "ratio": list(self.ratios)})


def read_attributes(explanation: str) -> list[str]:
    """The attributes an explanation's firing is read over: those it names, "row" and "column" as
    "patch" (finer), "object" and "background" as "object"."""
    out: list[str] = []
    for a in atoms(parse_formula(explanation)):
        kind = parse(a)[0]
        kind = "patch" if kind in PLACES else "object" if kind in WHOLE else kind
        if kind not in out:
            out.append(kind)
    return out


def _candidates(attrs: Sequence[str]) -> tuple[str, ...]:
    """The attributes a reading may add: the object's, the patch's and the scene's, and what earlier
    patches show when the explanation already speaks of it (a causal reader's feature)."""
    return (*READ_ATTRIBUTES, *SEEN) if set(attrs) & set(SEEN) else READ_ATTRIBUTES


def best_split(table: FiringTable, scenes, grid: tuple[int, int], candidates: Sequence[str],
               min_gain: float = 0.05) -> str | None:
    """The attribute that, joined to the table's, explains most more of where the feature fires
    (gain in epsilon-squared of the patch-level firing), if it gains at least `min_gain`."""
    base = epsilon_squared(table.fired, table.group)
    best, choice = max(base, 0.0) + min_gain, None
    for c in candidates:
        extra = patch_traits(scenes, grid, [c]).flatten(0, 2)  # (patch, 1)
        score = epsilon_squared(table.fired, torch.cat([table.group[:, None], extra], 1))
        if score >= best:
            best, choice = score, c
    return choice


def decisive_table(maps: torch.Tensor, scenes, attrs: Sequence[str], ratios: Sequence[float], hold: float = 0.8,
                   off: float = 0.2) -> tuple[FiringTable, float]:
    """The firing table at the ratio of the peak (of `ratios`, the first on ties) that leaves the
    fewest patches in groups the verdict rules cannot call (firing on more than `off`, less than `hold`)."""
    best: tuple[float, float, FiringTable] | None = None
    for r in ratios:
        table = firing_table(maps, scenes, attrs, firing_threshold(maps.flatten(), r))
        decided = float(table.count[(table.rate <= off) | (table.rate >= hold)].sum() / table.count.sum())
        if best is None or decided > best[0] + 1e-9:
            best = (decided, r, table)
    return best[2], best[1]


def propose(features: FeatureFn, explanation: str, bases, ratios: Sequence[float] = (0.25,), min_count: int = 4,
            min_gain: float = 0.05, max_extra: int = 2, max_scenes: int = 3000
            ) -> tuple[str | None, list[str], float]:
    """One reading: (the next explanation, or None / "" when the feature fires on no / every group; the
    attributes it was read over: the explanation's, then up to `max_extra` more, each the one that
    explains most more of the firing, by at least `min_gain`; the ratio of the peak it fires above,
    the most decisive of `ratios`)."""
    attrs = read_attributes(explanation)
    most = len(attrs) + max_extra
    while True:
        scenes = kind_scenes(attrs, bases, max_scenes)
        maps = patch_responses(features, scenes)
        table, ratio = decisive_table(maps, scenes, attrs, ratios)
        if len(attrs) >= most:
            break
        extra = best_split(table, scenes, (maps.shape[1], maps.shape[2]),
                           [a for a in _candidates(attrs) if a not in attrs], min_gain)
        if extra is None:
            break
        attrs = [*attrs, extra]
    kept = table.count >= min_count
    keys = [tuple(k) for k in table.keys[kept].tolist()]
    return cover_text(attrs, keys, (table.rate[kept] >= 0.5).tolist()), attrs, ratio


def refine(features: FeatureFn, explanation: str, rounds: int = 3, n_bases: int = 24, seed: int = 0,
           name: str = "feature", ratios: Sequence[float] = RATIOS, max_concepts: int = 6,
           **judge_kwargs) -> Refinement:
    """Verify `explanation`; while it does not hold (at most `rounds` times), read the feature on new
    controlled scenes, propose the formula its firing supports, and verify that on fresh scenes. A
    proposal mentioning more than `max_concepts` concepts ends the loop: it would be a truth table,
    not an explanation. The feature fires above a ratio of its peak: the first of `ratios` for the
    given explanation; for a proposal, the one of `ratios` whose reading left the fewest patches in
    undecided groups, and the proposal is verified at that ratio (a graded feature, strong on red and
    weak on orange, is "colour=red" above 0.55 of its peak).
    The first verdict is `verify(..., seed=seed)`'s; round r reads from seed + 2r + 1 and verifies on
    seed + 2r + 2."""
    if rounds < 0:
        raise InputError(f"rounds must be >= 0, got {rounds}")
    if not ratios or not all(0 < r < 1 for r in ratios):
        raise InputError(f"ratios must be shares of the peak in (0, 1), got {tuple(ratios)}")
    parse_formula(explanation)  # a clear error for a malformed one
    explanations, verdicts, details, read, used = [explanation], [], [], [], [float(ratios[0])]
    stopped = f"{rounds} rounds done"
    for r in range(rounds + 1):
        v = verify(features, explanations[-1], n_bases, seed + 2 * r, name, ratio=used[-1], **judge_kwargs)
        verdicts.append(v.verdict)
        details.append(v.detail)
        if v.verdict == "holds":
            stopped = "holds"
            break
        if r == rounds:
            break
        nxt, attrs, ratio = propose(features, explanations[-1], base_scenes(n_bases, seed + 2 * r + 1), ratios)
        read.append(", ".join(attrs))
        if not nxt or nxt in explanations:
            stopped = {None: "fires on no group", "": "fires on every group"}.get(nxt, f"proposed {nxt!r} again")
            break
        if formula_size(parse_formula(nxt)) > max_concepts:
            stopped = f"the firing needs more than {max_concepts} concepts: {nxt!r}"
            break
        explanations.append(nxt)
        used.append(float(ratio))
    read += [""] * (len(explanations) - len(read))
    return Refinement(name, tuple(explanations), tuple(verdicts), tuple(details), tuple(read), tuple(used), stopped)
