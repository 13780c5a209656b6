"""Compositional explanations (Mu & Andreas 2020): a feature's label as a logical formula of concepts.

A single concept names what a feature does only when the feature is that concept; many features
fire on "patch 4 when it shows background" or on "purple or blue objects". A formula joins the
concepts of `concepts.py` with AND, OR, AND NOT and NOT, NOT binding tightest, then AND, then OR:
"(patch=4 OR patch=5) AND background", "colour=purple OR colour=blue", "object AND NOT size=small".

`dissect_formulas` labels each feature with the formula of highest IoU found by Mu & Andreas's
beam search: start from the best single concepts, extend every formula in the beam by AND, OR or
AND NOT with every concept, keep the best `beam`, up to `length` concepts. A longer formula
replaces a shorter one only when it gains at least `min_gain` IoU: at equal fit the shorter
explanation is the better one, and every extra concept can only fit the dataset's accidents more.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from vlmscope.errors import InputError
from vlmscope.methods.explain.concepts import parse
from vlmscope.methods.explain.describe import dissect
from vlmscope.results import Result

Formula = str | tuple  # a concept, ("not", f), ("and", f, g) or ("or", f, g)
_TOKEN = re.compile(r"\s*(\(|\)|[^\s()]+)")


def parse_formula(text: str) -> Formula:
    """"(patch=4 OR patch=5) AND background" -> ("and", ("or", "patch=4", "patch=5"), "background");
    every concept is checked against the world's values (`concepts.parse`)."""
    tokens = _TOKEN.findall(text)
    pos = 0

    def peek() -> str | None:
        return tokens[pos] if pos < len(tokens) else None

    def take() -> str:
        nonlocal pos
        if pos >= len(tokens):
            raise InputError(f"formula {text!r} ends early; write e.g. 'colour=red AND NOT size=small'")
        pos += 1
        return tokens[pos - 1]

    def chain(word: str, operand) -> Formula:  # operands joined left to right by `word`
        f = operand()
        while peek() == word:
            take()
            f = (word.lower(), f, operand())
        return f

    def disjunction() -> Formula:
        return chain("OR", conjunction)

    def conjunction() -> Formula:
        return chain("AND", negation)

    def negation() -> Formula:
        if peek() == "NOT":
            take()
            return ("not", negation())
        tok = take()
        if tok == "(":
            f = disjunction()
            if peek() != ")":
                raise InputError(f"formula {text!r}: a '(' is not closed")
            take()
            return f
        if tok in ("AND", "OR", ")"):
            raise InputError(f"formula {text!r}: {tok!r} where a concept was expected")
        parse(tok)  # a clear error for an unknown concept
        return tok

    f = disjunction()
    if pos != len(tokens):
        raise InputError(f"formula {text!r}: unexpected {tokens[pos]!r}; join concepts with AND, OR, AND NOT")
    return f


def to_text(f: Formula) -> str:
    """The formula written back, with parentheses only where precedence needs them."""
    if isinstance(f, str):
        return f
    if f[0] == "not":
        inner = to_text(f[1])
        return f"NOT {inner}" if isinstance(f[1], str) or f[1][0] == "not" else f"NOT ({inner})"
    op = f[0].upper()

    def side(g: Formula) -> str:
        loose = not isinstance(g, str) and g[0] == "or" and f[0] == "and"
        return f"({to_text(g)})" if loose else to_text(g)

    return f"{side(f[1])} {op} {side(f[2])}"


def atoms(f: Formula) -> list[str]:
    """The concepts a formula names, in order, each once."""
    if isinstance(f, str):
        return [f]
    return list(dict.fromkeys(a for g in f[1:] for a in atoms(g)))


def is_compound(explanation: str) -> bool:
    """Whether an explanation is a formula rather than a single concept."""
    return not isinstance(parse_formula(explanation), str)


def evaluate(f: Formula | str, masks: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The formula's mask from its concepts' masks (any shape, all alike)."""
    if isinstance(f, str) and f not in masks:
        f = parse_formula(f)
    if isinstance(f, str):
        return masks[f]
    if f[0] == "not":
        return ~evaluate(f[1], masks)
    a, b = evaluate(f[1], masks), evaluate(f[2], masks)
    return a & b if f[0] == "and" else a | b


def mask_of(explanation: str, masks: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The mask of a concept or a formula of concepts, from the concepts' masks (any mask named
    exactly `explanation` is taken as it is)."""
    if explanation in masks:
        return masks[explanation]
    missing = [a for a in atoms(parse_formula(explanation)) if a not in masks]
    if missing:
        raise InputError(f"no mask for concepts {missing[:5]} of {explanation!r}; masks cover {list(masks)[:8]}...")
    return evaluate(explanation, masks)


def _iou(on: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """IoU of one firing vector (cells,) with masks (..., cells)."""
    inter = (m & on).sum(-1).float()
    return inter / (m.sum(-1) + on.sum() - inter).float().clamp_min(1)


def beam_search(on: torch.Tensor, masks: Mapping[str, torch.Tensor], length: int = 3, beam: int = 5,
                min_gain: float = 0.05) -> tuple[str, float]:
    """The formula of highest IoU with `on` (cells,) bool over concepts `masks` (concept -> (cells,)
    bool), up to `length` concepts; returns (formula text, IoU)."""
    names = list(masks)
    m = torch.stack([masks[c].flatten() for c in names])  # (concept, cells)
    iou = _iou(on, m)
    order = iou.argsort(descending=True)[:beam].tolist()
    frontier = [(names[i], {i}, m[i], float(iou[i])) for i in order]  # (formula, concepts used, mask, iou)
    best, best_iou = frontier[0][0], frontier[0][3]
    for _ in range(length - 1):
        cands = []
        for f, used, fm, _ in frontier:
            for op, new in (("and", fm & m), ("or", fm | m), ("and not", fm & ~m)):  # (concept, cells)
                cands += [(v, f, used, op, j, new[j]) for j, v in enumerate(_iou(on, new).tolist()) if j not in used]
        cands.sort(key=lambda c: -c[0])
        seen, frontier = set(), []
        for v, f, used, op, j, fm in cands:
            key = fm.numpy().tobytes()
            if key in seen:  # the same patches as a formula already kept
                continue
            seen.add(key)
            grown = ("and", f, ("not", names[j])) if op == "and not" else (op, f, names[j])
            frontier.append((grown, used | {j}, fm, v))
            if len(frontier) == beam:
                break
        if frontier and frontier[0][3] >= best_iou + min_gain:
            best, best_iou = frontier[0][0], frontier[0][3]
    return to_text(best), best_iou


@dataclass(frozen=True, repr=False)
class FormulaDissection(Result):
    """Per feature: the best formula of concepts (Mu & Andreas) and the best single concept, with IoU."""

    kind = "formula_dissection"
    features: tuple[str, ...]
    formulas: tuple[str, ...]
    iou: torch.Tensor  # (feature,) IoU of the formula
    concepts: tuple[str, ...]  # the best single concept per feature
    concept_iou: torch.Tensor  # (feature,)
    threshold: torch.Tensor  # (feature,) the activation above which the feature counts as firing
    ratio: torch.Tensor  # (feature,) that threshold as a share of the feature's peak; NaN where set by `quantile`
    quantile: float
    min_iou: float
    length: int
    min_gain: float

    @property
    def labels(self) -> tuple[str, ...]:
        """The formula per feature, "" where its IoU is below `min_iou`."""
        return tuple(f if v >= self.min_iou else "" for f, v in zip(self.formulas, self.iou.tolist()))

    def __repr__(self) -> str:
        labelled = sum(bool(x) for x in self.labels)
        return (f"FormulaDissection({len(self.features)} features, {labelled} labelled, formulas up to {self.length} "
                f"concepts, mean IoU {float(self.iou.mean()):.2f} vs {float(self.concept_iou.mean()):.2f} for one)")

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame({"feature": list(self.features), "formula": list(self.formulas), "iou": self.iou.tolist(),
                             "concept": list(self.concepts), "concept_iou": self.concept_iou.tolist(),
                             "threshold": self.threshold.tolist(), "ratio": self.ratio.tolist()})


def dissect_formulas(maps: torch.Tensor, masks: Mapping[str, torch.Tensor], quantile: float = 0.8,
                     features: Sequence[str] | None = None, min_iou: float = 0.5, length: int = 3, beam: int = 5,
                     min_gain: float = 0.05, ratio: float | Sequence[float] | None = None) -> FormulaDissection:
    """maps (feature, scene, rows, cols); masks: concept -> (scene, rows, cols) bool. Each feature is
    thresholded as in `dissect` (its top `quantile`, or `ratio` x its peak), then labelled by `beam_search`.
    Several ratios: each feature is labelled at the share of its peak where its best formula's IoU is
    highest (the lowest share on ties), so that a graded feature is read where it is most concept-like
    and the verification loop can judge it at that same share (`ratio` per feature in the result)."""
    if length < 1 or beam < 1:
        raise InputError(f"length and beam must be >= 1, got length={length}, beam={beam}")
    if ratio is not None and not isinstance(ratio, (int, float)):
        levels = sorted(float(r) for r in ratio)
        if not levels:
            raise InputError("ratio: give one share of the peak or several, got none")
        each = [dissect_formulas(maps, masks, quantile, features, min_iou, length, beam, min_gain, r) for r in levels]
        pick = torch.stack([d.iou for d in each]).argmax(0).tolist()  # the first (lowest share) of equal IoUs
        rows = list(zip(pick, range(len(pick))))
        return FormulaDissection(each[0].features, tuple(each[j].formulas[i] for j, i in rows),
                                 torch.stack([each[j].iou[i] for j, i in rows]),
                                 tuple(each[j].concepts[i] for j, i in rows),
                                 torch.stack([each[j].concept_iou[i] for j, i in rows]),
                                 torch.stack([each[j].threshold[i] for j, i in rows]),
                                 torch.tensor([levels[j] for j in pick], dtype=torch.float64), float(quantile),
                                 float(min_iou), int(length), float(min_gain))
    single = dissect(maps, masks, quantile, features, min_iou, ratio)
    maps = maps[None] if maps.dim() == 3 else maps
    on = maps.flatten(1).float() > single.threshold[:, None]  # (feature, cells)
    flat = {c: m.flatten() for c, m in masks.items()}
    found = [beam_search(o, flat, length, beam, min_gain) for o in on]
    best = single.iou.max(1)
    return FormulaDissection(single.features, tuple(f for f, _ in found), torch.tensor([v for _, v in found]),
                             tuple(single.concepts[i] for i in best.indices.tolist()), best.values,
                             single.threshold,
                             torch.full((len(found),), float("nan") if ratio is None else ratio, dtype=torch.float64),
                             float(quantile), float(min_iou), int(length), float(min_gain))
