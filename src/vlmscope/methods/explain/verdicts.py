"""How the verification loop decides (see verify.py): the `Verification` result, when a feature
counts as firing, the verdict from firing rates, and which other attribute a too-narrow feature
depends on."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vlmscope.data.scene import Scene
from vlmscope.methods.explain.concepts import OBJECT_ATTRIBUTES, SCENE_ATTRIBUTES, scene_value
from vlmscope.results import Result


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


def firing_threshold(response: torch.Tensor, ratio: float, given: float | None = None) -> float:
    """A feature fires above `given` when set (the activation its label was found at), else above
    `ratio` x its largest response (never, if it never responds)."""
    if given is not None:
        return float(given)
    peak = float(response.max())
    return ratio * peak if peak > 0 else float("inf")


def decide(on: float, off_max: float, hold: float, off: float, reach: float | None = None) -> str:
    """on: the rate on the whole explained set; off_max: the highest rate outside it; reach: the rate
    on the part of the explained set it fires on most (= on for one value)."""
    broad, narrow = off_max > off, on < hold
    if (on if reach is None else reach) <= off or (broad and narrow):
        return "does not hold"
    return "too broad" if broad else "too narrow" if narrow else "holds"


def marked(n: int, *on: int) -> torch.Tensor:
    m = torch.zeros(n, dtype=torch.bool)
    m[list(on)] = True
    return m


def trait(scene: Scene, attribute: str) -> str:
    if attribute in SCENE_ATTRIBUTES:
        return scene_value(scene, attribute)
    o = scene.objects[0]
    return str(o.cell) if attribute == "cell" else getattr(o, attribute)


def depends_on(fired: torch.Tensor, bases: Sequence[Scene], varied: str | Sequence[str],
               min_score: float = 0.0) -> str:
    """The other attribute that best explains where the feature fired (one scene per observation):
    the largest share of the firing's variance explained by the attribute's values, adjusted for
    their number (epsilon-squared, so a 9-valued attribute does not win by chance over a 2-valued
    one), if above `min_score`; `varied`: the attribute(s) the explanation names, not candidates."""
    best, text = min_score, ""
    for attr in (*OBJECT_ATTRIBUTES, *SCENE_ATTRIBUTES):
        if attr == varied or attr in varied:
            continue
        obs = [(trait(b, attr), bool(f)) for f, b in zip(fired.tolist(), bases)
               if b.objects or attr in SCENE_ATTRIBUTES]
        names = list(dict.fromkeys(v for v, _ in obs))
        labels = torch.tensor([names.index(v) for v, _ in obs], dtype=torch.long)
        fires = torch.tensor([f for _, f in obs], dtype=torch.bool)
        score = epsilon_squared(fires, labels)
        if score > best:
            best = score
            rates = {v: float(fires[labels == i].float().mean()) for i, v in enumerate(names)}
            high = sorted(v for v, r in rates.items() if r >= 0.5)
            if 0 < len(high) < len(rates):
                text = f"depends on {attr}: fires for " + ", ".join(high)
            else:  # on every value (or none) at least half the time: say where most
                top = max(rates, key=rates.get)
                text = f"depends on {attr}: fires most for {top} ({rates[top]:.2f} vs {min(rates.values()):.2f})"
    return text


def epsilon_squared(fired: torch.Tensor, labels: torch.Tensor) -> float:
    """The share of a 0/1 variable's variance (fired, (n,) bool) explained by groups (labels: (n,) or
    (n, attr), one group per distinct row), adjusted for their number: 1 − (within / (n − k)) /
    (total / (n − 1)), so k groups do not win by chance; −inf where undefined (one group, or no variance)."""
    n = len(fired)
    if n == 0:
        return float("-inf")
    group = labels.unique(dim=0, return_inverse=True)[1] if labels.dim() > 1 else labels.unique(return_inverse=True)[1]
    k = int(group.max()) + 1
    x = fired.double()
    mean = float(x.mean())
    total = n * mean * (1 - mean)  # sum of squares of a 0/1 variable
    if k < 2 or n <= k or total == 0:
        return float("-inf")
    count = torch.bincount(group, minlength=k).double()
    rate = torch.bincount(group, weights=x, minlength=k) / count
    within = total - float((count * (rate - mean) ** 2).sum())
    return 1 - (within / (n - k)) / (total / (n - 1))
