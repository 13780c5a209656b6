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
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from vlmscope.data import render
from vlmscope.data.scene import CELL, JITTER, Scene, place, random_attrs
from vlmscope.data.vocab import DOMAINS, GRID
from vlmscope.methods.explain.concepts import VALUES, parse
from vlmscope.results import Result

FeatureFn = Callable[[list[np.ndarray]], torch.Tensor]  # images -> (n, rows, cols[, feature])


@dataclass(frozen=True, repr=False)
class Verification(Result):
    """Responses of a feature to controlled images varying one attribute, and the verdict."""

    kind = "verification"
    feature: str
    explanation: str
    values: tuple[str, ...]  # the varied attribute's values
    response: torch.Tensor  # (base, value) max-over-patches response
    fire_rate: torch.Tensor  # (value,) share of bases where it fires
    threshold: float
    verdict: str
    detail: str

    def __repr__(self) -> str:
        detail = f"; {self.detail}" if self.detail else ""
        return f"Verification({self.feature}: {self.explanation!r} {self.verdict}{detail})"

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame({"value": list(self.values), "fire_rate": self.fire_rate.tolist(),
                             "mean_response": self.response.mean(0).tolist(),
                             "explained": [f"{self.explanation.split('=')[0]}={v}" == self.explanation
                                           for v in self.values]})


def base_scenes(n: int, seed: int = 0) -> list[Scene]:
    """n random single-object scenes (random shape, colour, size, cell, background)."""
    rng = np.random.default_rng([seed, 4241])
    return [place(rng, random_attrs(rng, 1), domain=DOMAINS[int(rng.integers(len(DOMAINS)))]) for _ in range(n)]


def vary(scene: Scene, attribute: str, value: str) -> Scene:
    """The scene with its first object's `attribute` (or the background domain) set to `value`."""
    if attribute == "domain":
        return replace(scene, domain=value)
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
    o = scene.objects[0]
    return scene.domain if attribute == "domain" else str(o.cell) if attribute == "cell" else getattr(o, attribute)


def judge(response: torch.Tensor, explanation: str, bases: Sequence[Scene], feature: str = "feature",
          ratio: float = 0.25, hold: float = 0.8, off: float = 0.2) -> Verification:
    """The verdict from responses (base, value) of the explained attribute's values (see module doc)."""
    attr, value = parse(explanation)
    values = VALUES[attr]
    e = values.index(value)
    peak = float(response.max())
    threshold = ratio * peak if peak > 0 else float("inf")
    fires = response > threshold  # (base, value)
    rate = fires.float().mean(0)
    on = float(rate[e])
    others = torch.cat([rate[:e], rate[e + 1:]])
    off_max = float(others.max()) if others.numel() else 0.0
    broad, narrow = off_max > off, on < hold
    if on <= off:
        verdict = "does not hold"
    elif not broad and not narrow:
        verdict = "holds"
    elif broad and not narrow:
        verdict = "too broad"
    elif narrow and not broad:
        verdict = "too narrow"
    else:
        verdict = "does not hold"
    detail = ""
    if broad:
        detail = "also fires on " + ", ".join(f"{attr}={values[i]}" for i in range(len(values))
                                              if i != e and float(rate[i]) > off)
    elif narrow and on > off:
        detail = _narrowing(fires[:, e], bases, attr)
    return Verification(feature, explanation, values, response.float(), rate, threshold, verdict, detail)


def _narrowing(fired: torch.Tensor, bases: Sequence[Scene], varied: str) -> str:
    """The other attribute whose values best separate the bases where the feature fired."""
    best, text = -1.0, ""
    for attr in VALUES:
        if attr == varied:
            continue
        groups: dict[str, list[bool]] = {}
        for f, b in zip(fired.tolist(), bases):
            groups.setdefault(_trait(b, attr), []).append(bool(f))
        rates = {v: sum(x) / len(x) for v, x in groups.items()}
        spread = max(rates.values()) - min(rates.values())
        if spread > best:
            best = spread
            text = f"depends on {attr}: fires for " + ", ".join(sorted(v for v, r in rates.items() if r >= 0.5))
    return text


def responses(feature: FeatureFn, scenes: Sequence[Scene], batch_size: int = 64) -> torch.Tensor:
    """The feature's maximum over patches for each scene: (scene,) or (scene, feature)."""
    out = []
    for i in range(0, len(scenes), batch_size):
        maps = feature([render(s) for s in scenes[i:i + batch_size]])  # (n, rows, cols[, feature])
        out.append(maps.flatten(1, 2).amax(1).float().cpu())
    return torch.cat(out)


def verify(feature: FeatureFn, explanation: str, n_bases: int = 24, seed: int = 0, name: str = "feature",
           **judge_kwargs) -> Verification:
    """Generate controlled scenes for the explained attribute, measure the feature, judge."""
    return verify_many(feature, [explanation], n_bases, seed, [name], **judge_kwargs)[0]


def verify_many(features: FeatureFn, explanations: Sequence[str], n_bases: int = 24, seed: int = 0,
                names: Sequence[str] | None = None, **judge_kwargs) -> list[Verification]:
    """Verify many features at once: `features(images)` returns (n, rows, cols, feature), or (n, rows,
    cols) when one explanation is given; scenes are generated and run once per attribute."""
    bases = base_scenes(n_bases, seed)
    names = list(names) if names is not None else [str(i) for i in range(len(explanations))]
    attrs = {parse(e)[0] for e in explanations}
    measured = {}
    for a in sorted(attrs):
        r = responses(features, controlled_scenes(a, bases))  # (scene[, feature])
        r = r[:, None] if r.dim() == 1 else r
        measured[a] = r.view(n_bases, len(VALUES[a]), -1)  # (base, value, feature)
    return [judge(measured[parse(e)[0]][..., i if measured[parse(e)[0]].shape[-1] > 1 else 0], e, bases, n,
                  **judge_kwargs) for i, (e, n) in enumerate(zip(explanations, names))]
