"""A firing table written as a short formula: the groups of patches where a feature fires (each a
key of value indices, one per attribute) covered by products of value sets, then put in the words
of `concepts.py` ("colour=red AND size=large AND NOT shape=triangle", "row=2", "background").

Multi-valued logic minimisation in the manner of ESPRESSO's expand-and-cover, kept small: each on
group grows into a product (an attribute dropped where that takes in no off group, else widened
value by value), redundant products are removed, and the formula mentioning fewest concepts over
every order of widening is kept. Groups never observed count either way.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from vlmscope.data.vocab import GRID
from vlmscope.methods.explain.compose import Formula, to_text
from vlmscope.methods.explain.concepts import VALUES


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


def formula_size(f: Formula) -> int:
    """Concepts a formula mentions, counting repeats."""
    return 1 if isinstance(f, str) else sum(formula_size(g) for g in f[1:])


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
        if best is None or (formula_size(f), len(to_text(f))) < (formula_size(best), len(to_text(best))):
            best = f
    return to_text(best)
