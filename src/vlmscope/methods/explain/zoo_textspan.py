"""TEXTSPAN on the zoo's dual encoder, checked by ablation (Gandelsman et al. 2024, on shapes-clip).

Each vision head is named by the attribute (colour, shape, size, position, background) whose texts
explain most of its variance across one-object scenes; then each attribute's heads are mean-ablated
and zero-shot classification of every attribute is measured, both through the heads' direct
contributions to the embedding (`HeadContributions.ablated`, as the paper ablates) and through their
total effect (`head_ablation`'s intervention: every position of the tower). A name is confirmed
when ablating the heads takes more of their own attribute's evidence than of the others'.
`evidence_by_component` says which components (heads, MLPs, embeddings) write each attribute's
evidence directly: an attribute the MLPs write gets no head.

Choices, stated: the pool holds one training-form text per attribute value (shapes-clip's
`describe`: "a red object", "a circle", "a object at top-left"; backgrounds "a object on a plain
background ."), each minus its attribute's mean embedding, so a text direction says *which* value
rather than "an object is described". An attribute whose texts the text tower maps to one point
(smallest pairwise 1 - cos below `min_spread`) gives no direction to name a head with: it is left
out of the pool and still measured. Evidence for an attribute is the mean over images of the true
class's cosine minus the mean cosine over its classes (scale-free, unlike accuracy, which saturates).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from vlmscope.data import COLOURS, DOMAINS, POSITIONS, SHAPES, SIZES, render
from vlmscope.data.scene import place, random_attrs
from vlmscope.methods.explain.textspan import TextSpanResult, head_contributions, head_mean_ablations, textspan
from vlmscope.results import Result, long_frame

VALUES = {"colour": COLOURS, "shape": SHAPES, "size": SIZES, "position": POSITIONS, "background": DOMAINS}


def attribute_texts() -> dict[str, list[str]]:
    """attribute -> one text per value, in the form shapes-clip was trained on (see module docstring)."""
    out = {a: [f"a {v} object" for v in VALUES[a]] for a in ("colour", "size")}
    out["shape"] = [f"a {v}" for v in SHAPES]
    out["position"] = [f"a object at {v}" for v in POSITIONS]
    out["background"] = [f"a object on a {v} background ." for v in DOMAINS]
    return {a: out[a] for a in VALUES}


@dataclass(frozen=True, repr=False)
class AttributeHeads(Result):
    """Heads named by TEXTSPAN and the zero-shot evidence and accuracy per attribute with each
    attribute's heads mean-ablated (group "none": nothing ablated), directly and in total."""

    kind = "attribute_heads"
    heads: tuple[str, ...]  # "L{i}.H{h}"
    attributes: tuple[str, ...]  # measured attributes
    named: tuple[str, ...]  # attributes whose texts are in the pool (distinguishable in text space)
    share: torch.Tensor  # (head, named) share of the head's variance each attribute's texts explain
    assigned: tuple[str, ...]  # per head, the named attribute of largest share
    spread: torch.Tensor  # (attribute,) smallest pairwise 1 - cos between the attribute's texts
    groups: tuple[str, ...]  # "none", then each named attribute that got heads
    modes: tuple[str, ...]  # "direct", "total"
    accuracy: torch.Tensor  # (mode, group, attribute)
    evidence: torch.Tensor  # (mode, group, attribute)
    # (head, attribute) share of the attribute's evidence removed by mean-ablating that head alone at
    # every position (total effect, direct and through later layers); None in results saved before it
    head_drop: torch.Tensor | None = None

    def causal_heads(self) -> dict[str, tuple[str, float, str]]:
        """attribute -> (the head whose ablation alone removes most of its evidence, that share, the
        attribute TEXTSPAN names that head for): does the direct-effect name match the causal role?"""
        if self.head_drop is None:
            return {}
        out = {}
        for j, a in enumerate(self.attributes):
            i = int(self.head_drop[:, j].argmax())
            out[a] = (self.heads[i], float(self.head_drop[i, j]), self.assigned[i])
        return out

    def heads_for(self, attribute: str) -> list[str]:
        return [h for h, a in zip(self.heads, self.assigned) if a == attribute]

    @property
    def evidence_drop(self) -> torch.Tensor:
        """(mode, group, attribute) share of the attribute's evidence the ablation removes."""
        return 1 - self.evidence / self.evidence[:, :1]

    @property
    def accuracy_drop(self) -> torch.Tensor:
        return self.accuracy[:, :1] - self.accuracy

    def own_other(self, mode: str, metric: str = "evidence") -> dict[str, tuple[float, float]]:
        """group -> (drop of its own attribute, mean drop of the other named attributes)."""
        drop = (self.evidence_drop if metric == "evidence" else self.accuracy_drop)[self.modes.index(mode)]
        out = {}
        for g, name in enumerate(self.groups):
            if name in self.named:
                others = [float(drop[g, self.attributes.index(a)]) for a in self.named if a != name]
                out[name] = (float(drop[g, self.attributes.index(name)]), sum(others) / max(len(others), 1))
        return out

    def learned(self, margin: float = 0.5) -> tuple[str, ...]:
        """Attributes the model classifies zero-shot at least `margin` of the way from chance to 1."""
        out = []
        for j, a in enumerate(self.attributes):
            chance = 1 / len(VALUES[a])
            if float(self.accuracy[0, 0, j]) >= chance + margin * (1 - chance):
                out.append(a)
        return tuple(out)

    def confirmed(self, ratio: float = 1.5, min_drop: float = 0.05) -> tuple[str, ...]:
        """Learned attributes whose heads, ablated directly or in total, remove at least `min_drop` of
        their own attribute's evidence and at least `ratio` times as much as of the others' (on
        average); the floor keeps a head that barely matters from passing on a ratio of two near-zero
        drops, and an attribute the model does not classify (at initialisation, say) has no evidence
        whose shares mean anything."""
        out = []
        learned = self.learned()
        for a in self.named:
            if a not in learned:
                continue
            pairs = [self.own_other(m).get(a) for m in self.modes]  # (own, other) per mode; None: no heads
            if any(p and p[0] >= min_drop and p[0] >= ratio * p[1] for p in pairs):
                out.append(a)
        return tuple(out)

    def __repr__(self) -> str:
        found = {a: len(self.heads_for(a)) for a in self.named}
        return f"AttributeHeads({len(self.heads)} heads, named {found}, measured {list(self.attributes)})"

    def to_dataframe(self):
        coords = {"mode": list(self.modes), "group": list(self.groups), "attribute": list(self.attributes)}
        df = long_frame(self.accuracy, ("mode", "group", "attribute"), coords, "accuracy")
        df["accuracy_drop"] = self.accuracy_drop.flatten().tolist()
        df["evidence_drop"] = self.evidence_drop.flatten().tolist()
        return df


def _scores(img: torch.Tensor, texts: dict[str, torch.Tensor], labels: dict[str, torch.Tensor]):
    """(accuracy, evidence) per attribute of unit image embeddings against unit class texts."""
    img = F.normalize(img.float(), dim=-1)
    acc, ev = [], []
    for a, t in texts.items():
        cos = img @ t.T  # (image, class)
        rows = torch.arange(len(img))
        acc.append(float((cos.argmax(-1) == labels[a]).float().mean()))
        ev.append(float((cos[rows, labels[a]] - cos.mean(-1)).mean()))
    return acc, ev


def evidence_by_component(hc, texts: dict[str, torch.Tensor], labels: dict[str, torch.Tensor]) -> torch.Tensor:
    """(component, attribute) share of each attribute's zero-shot evidence that each component writes
    directly: its centred contribution projected on the attribute's centred class texts, the true
    class minus the mean over classes, averaged over images, divided by the sum over components.
    Says where an attribute is written (heads, MLPs, embeddings), which TEXTSPAN over heads cannot."""
    values = hc.values.float() - hc.values.float().mean(0)  # (image, component, d_proj)
    rows = torch.arange(len(values))
    out = []
    for a, t in texts.items():
        proj = values @ (t - t.mean(0)).T  # (image, component, class)
        ev = (proj[rows, :, labels[a]] - proj.mean(-1)).mean(0)  # (component,)
        out.append(ev / ev.sum())
    return torch.stack(out, 1)


def _spread(t: torch.Tensor) -> float:
    cos = t @ t.T
    return float((1 - cos[~torch.eye(len(t), dtype=torch.bool)]).min())


@torch.no_grad()
def zoo_textspan(vlm, n: int = 300, seed: int = 0, layers: list[int] | None = None, min_spread: float = 1e-3
                 ) -> tuple[AttributeHeads, TextSpanResult, dict[str, float | str]]:
    """TEXTSPAN over the heads of `layers` (default: every layer; the paper keeps the last four of
    24, where the direct effects are, but in a 3-layer tower the first layer's heads write colour
    directly) on n one-object scenes, heads named and checked by ablation. Returns (heads, the
    TEXTSPAN basis, scores)."""
    rng = np.random.default_rng([seed, 8191])
    scenes = [place(rng, random_attrs(rng, 1)) for _ in range(n)]
    prompts = attribute_texts()
    flat = [t for ts in prompts.values() for t in ts]
    x = vlm.prepare([render(s) for s in scenes], flat)
    hc = head_contributions(vlm, x)
    _, cache = vlm.run_with_cache(x, "text.proj")
    emb = F.normalize(cache["text.proj"].float(), dim=-1)  # (text, d_proj)
    texts, start = {}, 0
    for a, ts in prompts.items():
        texts[a], start = emb[start:start + len(ts)], start + len(ts)
    obj = [s.objects[0] for s in scenes]
    labels = {a: torch.tensor([VALUES[a].index(getattr(o, a)) for o in obj]) for a in ("colour", "shape", "size")}
    labels["position"] = torch.tensor([o.cell for o in obj])
    labels["background"] = torch.tensor([DOMAINS.index(s.domain) for s in scenes])
    spread = {a: _spread(t) for a, t in texts.items()}
    named = tuple(a for a in prompts if spread[a] >= min_spread)
    pool = torch.cat([texts[a] - texts[a].mean(0) for a in named])  # (text, d_proj) contrasts
    pool_texts = [t for a in named for t in prompts[a]]
    n_layers = vlm.n_layers("vision")
    ts = textspan(hc, pool, pool_texts, layers=list(layers) if layers is not None else list(range(n_layers)),
                  n_texts=len(pool_texts))
    attrs, share = ts.attribute_shares({t: a for a in named for t in prompts[a]})
    share = share[:, [attrs.index(a) for a in named]]  # (head, named)
    assigned = tuple(named[int(i)] for i in share.argmax(1))
    groups = {a: [h for h, g in zip(ts.heads, assigned) if g == a] for a in named}
    groups = {a: hs for a, hs in groups.items() if hs}
    _, ref = vlm.run_with_cache(x, "vision.blocks.*.attn.z")

    def total(heads: list[str]):  # (accuracy, evidence) with `heads` mean-ablated at every position
        _, hurt = vlm.run_with_cache(x, "vision.proj", interventions=head_mean_ablations(heads, ref))
        return _scores(hurt["vision.proj"], texts, labels)

    rows: dict[str, list] = {"direct": [_scores(hc.embedding, texts, labels)]}
    rows["total"] = [rows["direct"][0]]
    for hs in groups.values():
        rows["direct"].append(_scores(hc.ablated(hs), texts, labels))
        rows["total"].append(total(hs))
    acc = torch.tensor([[r[0] for r in rs] for rs in rows.values()])  # (mode, group, attribute)
    ev = torch.tensor([[r[1] for r in rs] for rs in rows.values()])
    alone = [total([h])[1] for h in ts.heads]  # each head mean-ablated alone, in total
    head_drop = 1 - torch.tensor(alone) / ev[0, 0]  # (head, attribute)
    res = AttributeHeads(ts.heads, tuple(prompts), named, share, assigned, torch.tensor([spread[a] for a in prompts]),
                         ("none", *groups), tuple(rows), acc, ev, head_drop)
    scores = _summary(res)
    writers = evidence_by_component(hc, texts, labels)  # (component, attribute)
    kinds = {"heads": [".H" in c for c in hc.components], "MLPs": [c.endswith(".mlp") for c in hc.components]}
    for j, a in enumerate(prompts):
        for kind, mask in kinds.items():
            scores[f"TEXTSPAN: {a} evidence written directly by {kind}"] = float(writers[torch.tensor(mask), j].sum())
        top = int(writers[:, j].argmax())
        scores[f"TEXTSPAN: {a} evidence, largest direct writer"] = f"{hc.components[top]} ({writers[top, j]:.2f})"
    return res, ts, scores


def _summary(res: AttributeHeads) -> dict[str, float | str]:
    scores: dict[str, float | str] = {}
    for i, a in enumerate(res.attributes):
        scores[f"TEXTSPAN: zero-shot {a} accuracy"] = float(res.accuracy[0, 0, i])
        scores[f"TEXTSPAN: {a} texts, smallest 1 - cos"] = float(res.spread[i])
        scores[f"TEXTSPAN: {a} heads"] = " ".join(res.heads_for(a)) or "none"
    for mode in res.modes:
        for a, (own, other) in res.own_other(mode).items():
            scores[f"TEXTSPAN {a} heads, {mode} ablation: own evidence drop"] = own
            scores[f"TEXTSPAN {a} heads, {mode} ablation: other evidence drop"] = other
            scores[f"TEXTSPAN {a} heads, {mode} ablation: own / other"] = own / other if other > 0 else float("inf")
        for a, (own, other) in res.own_other(mode, "accuracy").items():
            scores[f"TEXTSPAN {a} heads, {mode} ablation: own accuracy drop"] = own
            scores[f"TEXTSPAN {a} heads, {mode} ablation: other accuracy drop"] = other
    scores["TEXTSPAN: attributes with heads"] = sum(bool(res.heads_for(a)) for a in res.named)
    confirmed = res.confirmed()
    for a in res.attributes:
        scores[f"TEXTSPAN {a} heads confirmed by ablation"] = float(a in confirmed)
    scores["TEXTSPAN: colour, shape, position with confirmed heads"] = sum(
        a in confirmed for a in ("colour", "shape", "position"))
    causal = res.causal_heads()
    for a, (head, drop, name) in causal.items():
        scores[f"TEXTSPAN: {a}, the head whose ablation alone removes most evidence"] = \
            f"{head} ({drop:.2f}; named {name})"
        scores[f"TEXTSPAN: {a}, largest evidence share one head's ablation removes"] = drop
    if causal:
        scores["TEXTSPAN: attributes whose most causal head is named for them"] = sum(
            name == a for a, (_, _, name) in causal.items())
    return scores
