"""Refining an explanation by experiment: the loop MAIA runs (Shaham et al. 2024) — hypothesis,
controlled experiment, revised hypothesis — on the shapes world, where the experiments are exact.

Each round verifies the current explanation (verify.py). If it does not hold, the feature is read
patch by patch on new controlled scenes that vary every attribute the explanation names together
("row" and "column" read as "patch"; "object" and "background" as "object"). Then, one at a time
and at most two, the attribute that explains most more of where it fires (epsilon-squared of the
patch-level firing, as the verdicts' "depends on") joins them and the scenes are read again.
The patches are grouped by their values of those attributes, and the next explanation is a short
formula true on the groups where the feature fires on most patches and false on the others
(`cover`). Each proposal is verified on scenes drawn from another seed than the ones it was read
from, so an explanation is never judged on the data that produced it.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vlmscope.data.vocab import GRID
from vlmscope.errors import InputError
from vlmscope.methods.explain.compose import Formula, atoms, parse_formula, to_text
from vlmscope.methods.explain.concepts import OBJECT_ATTRIBUTES, PLACES, SCENE_ATTRIBUTES, VALUES, WHOLE, parse
from vlmscope.methods.explain.controls import axis_scenes, base_scenes
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


def reading_scenes(attrs: Sequence[str], bases, max_scenes: int = 3000):
    """Scenes varying `attrs` together: object and scene attributes through their values; "patch" and
    "object" move the object through every cell and add the emptied scene."""
    moves = bool({"patch", "object"} & set(attrs))
    axes = [a for a in (*OBJECT_ATTRIBUTES, *SCENE_ATTRIBUTES) if a in attrs or (a == "cell" and moves)]
    return axis_scenes(axes, bases, moves, max_scenes)


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


def cover(keys: Sequence[tuple[int, ...]], on: Sequence[bool], order: Sequence[int] | None = None
          ) -> list[list[frozenset[int]]]:
    """A short cover of the `on` keys by cubes (one set of values per attribute) containing no key
    that is off. Each uncovered on key grows into a cube: an attribute is dropped (all its values)
    where that takes in no off key, else widened one value at a time where that takes in more on keys;
    then cubes whose on keys others cover are removed. Unobserved combinations count as either.
    `order`: the attributes in the order they are widened (default: most values first)."""
    keys = [tuple(k) for k in keys]
    n_attr = len(keys[0]) if keys else 0
    domains = [sorted({k[i] for k in keys}) for i in range(n_attr)]
    on_keys = [k for k, o in zip(keys, on) if o]
    off_keys = [k for k, o in zip(keys, on) if not o]

    def inside(cube, k) -> bool:
        return all(v in s for v, s in zip(k, cube))

    def clean(cube) -> bool:
        return not any(inside(cube, k) for k in off_keys)

    cubes: list[list[frozenset[int]]] = []
    order = list(order) if order is not None else sorted(range(n_attr), key=lambda i: -len(domains[i]))
    for seed in on_keys:
        if any(inside(c, seed) for c in cubes):
            continue
        cube = [frozenset([v]) for v in seed]
        for i in order:
            whole = cube[:i] + [frozenset(domains[i])] + cube[i + 1:]
            if clean(whole):
                cube = whole
                continue
            for v in domains[i]:
                wider = cube[:i] + [cube[i] | {v}] + cube[i + 1:]
                if v not in cube[i] and clean(wider) and any(inside(wider, k) and not inside(cube, k) for k in on_keys):
                    cube = wider
        cubes.append(cube)
    for c in sorted(cubes, key=lambda c: sum(inside(c, k) for k in on_keys)):  # smallest first
        rest = [d for d in cubes if d is not c]
        if all(any(inside(d, k) for d in rest) for k in on_keys if inside(c, k)):
            cubes = rest
    return cubes


def _any(concepts: Sequence[Formula]) -> Formula:
    f = concepts[0]
    for g in concepts[1:]:
        f = ("or", f, g)
    return f


def _all(parts: Sequence[Formula]) -> Formula:
    f = parts[0]
    for g in parts[1:]:
        f = ("and", f, g)
    return f


def _literal(attr: str, chosen: frozenset[int], domain: Sequence[int]) -> tuple[Formula | None, bool]:
    """A set of an attribute's values (indices into VALUES; -1: the patch shows no object) as concepts
    (None when it allows every observed value), and whether the set leaves out patches without an
    object that the concepts do not (the caller then adds "object" once)."""
    if set(domain) <= chosen:
        return None, False
    if attr == "object":
        return ("object" if 1 in chosen else "background"), False
    names = VALUES[attr]
    real = sorted(v for v in chosen if v >= 0)
    rest = sorted(v for v in domain if v >= 0 and v not in chosen)
    if not real:  # only patches showing no object
        return "background", False
    if attr == "patch":  # a whole row or column reads better by its name
        for kind, cells in (("row", lambda r: [r * GRID + c for c in range(GRID)]),
                            ("column", lambda c: [r * GRID + c for r in range(GRID)])):
            for j in range(GRID):
                if real == cells(j):
                    return f"{kind}={j}", False
    if len(real) <= max(len(rest), 1):
        f = _any([f"{attr}={names[v]}" for v in real])
        return (("or", "background", f) if -1 in chosen else f), False
    nots = _all([("not", f"{attr}={names[v]}") for v in rest]) if rest else None
    return nots, -1 not in chosen and -1 in domain


def _cube_formula(attrs, cube, domains) -> Formula | None:
    """One cube as a conjunction of concepts (None: it allows everything)."""
    parts = [_literal(a, s, d) for a, s, d in zip(attrs, cube, domains)]
    lits = [f for f, _ in parts if f is not None]
    # "NOT colour=red" is also true where no object is: say "object" unless another concept does
    implied = any((-1 not in s and -1 in d and not needs) or (a == "object" and 0 not in s)
                  for a, (_, needs), s, d in zip(attrs, parts, cube, domains))
    if any(needs for _, needs in parts) and not implied:
        lits = ["object", *lits]
    return _all(lits) if lits else None


def _size(f: Formula) -> int:
    """Concepts a formula mentions, counting repeats."""
    return 1 if isinstance(f, str) else sum(_size(g) for g in f[1:])


def cover_text(attrs: Sequence[str], keys: Sequence[tuple[int, ...]], on: Sequence[bool]) -> str | None:
    """The shortest formula (fewest concepts mentioned) of `cover`'s cubes over every order of
    widening the attributes (None when the feature fires on no group; "" on every group)."""
    if not any(on):
        return None
    domains = [sorted({k[i] for k in keys}) for i in range(len(attrs))]
    orders = itertools.permutations(range(len(attrs))) if len(attrs) <= 4 else [None]
    best: Formula | None = None
    for order in orders:
        terms = [_cube_formula(attrs, c, domains) for c in cover(keys, on, order)]
        if any(t is None for t in terms):
            return ""
        f = _any(terms)
        if best is None or (_size(f), len(to_text(f))) < (_size(best), len(to_text(best))):
            best = f
    return to_text(best)


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
    while True:
        scenes = reading_scenes(attrs, bases, max_scenes)
        maps = patch_responses(features, scenes)
        table, ratio = decisive_table(maps, scenes, attrs, ratios)
        if len(attrs) >= len(read_attributes(explanation)) + max_extra:
            break
        extra = best_split(table, scenes, (maps.shape[1], maps.shape[2]),
                           [a for a in READ_ATTRIBUTES if a not in attrs], min_gain)
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
        if _size(parse_formula(nxt)) > max_concepts:
            stopped = f"the firing needs more than {max_concepts} concepts: {nxt!r}"
            break
        explanations.append(nxt)
        used.append(float(ratio))
    read += [""] * (len(explanations) - len(read))
    return Refinement(name, tuple(explanations), tuple(verdicts), tuple(details), tuple(read), tuple(used), stopped)
