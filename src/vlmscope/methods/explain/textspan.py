"""TEXTSPAN (Gandelsman et al. 2024): what each attention head of a dual encoder's vision tower
writes into the image embedding, named by text.

1. `head_contributions`: the image embedding as a sum of direct contributions — the embeddings,
   every head of every layer, each layer's attention bias and MLP, and a constant — read at the
   pooled (CLS) token. The final LayerNorm is made linear by freezing its scale as in the paper:
   LN(x) = γ ⊙ (x − mean(x)) / σ(x) + β with σ(x) of the actual x held fixed, so the map from the
   residual stream to the embedding is linear and the contributions sum to the model's embedding
   exactly (up to float error). Towers that pool with a non-linear head (SigLIP's attention
   pooling + MLP) have no such decomposition and are refused.
2. `textspan`: per head, greedily pick from a caption pool the text direction that explains most of
   the variance of the head's outputs across images, project it out of both, and repeat.
3. `head_ablation`: mean-ablate named heads at every position of the tower (their total effect)
   and measure zero-shot accuracy per attribute; `HeadContributions.ablated` mean-ablates only
   their direct contributions to the embedding, as the paper does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vlmscope.errors import InputError
from vlmscope.model.interventions import ablate
from vlmscope.results import Result, long_frame


@dataclass(frozen=True, repr=False)
class HeadContributions(Result):
    """Direct contributions to the image embedding: `values` (image, component, d_proj); the
    components sum to `embedding` (image, d_proj), the model's `vision.proj`."""

    kind = "head_contributions"
    components: tuple[str, ...]  # "embed", "L{i}.H{h}", "L{i}.attn.bias", "L{i}.mlp", "bias"
    values: torch.Tensor  # (image, component, d_proj)
    embedding: torch.Tensor  # (image, d_proj)

    def heads(self, layers: Sequence[int] | None = None) -> list[int]:
        """Indices of the per-head components (of the given layers)."""
        out = []
        for i, c in enumerate(self.components):
            if ".H" in c and (layers is None or int(c[1:c.index(".")]) in layers):
                out.append(i)
        return out

    def ablated(self, components: Sequence[str]) -> torch.Tensor:
        """(image, d_proj) embeddings with the named components' direct contributions mean-ablated
        (each replaced by its mean over these images), as the paper ablates heads."""
        unknown = sorted(set(components) - set(self.components))
        if unknown:
            raise InputError(f"unknown components {unknown}; valid: {', '.join(self.components)}")
        idx = [self.components.index(c) for c in components]
        parts = self.values[:, idx]  # (image, k, d_proj)
        return self.embedding - (parts - parts.mean(0)).sum(1)

    def to_dataframe(self):
        """Per component: mean norm of its contribution and its variance across images."""
        import pandas as pd

        centred = self.values - self.values.mean(0)
        return pd.DataFrame({"component": list(self.components),
                             "mean_norm": self.values.norm(dim=-1).mean(0).tolist(),
                             "variance": centred.pow(2).sum(-1).mean(0).tolist()})


def _pooled_position(vlm, inputs) -> int:
    roles = vlm.positions(inputs)["vision"].roles(0)
    special = [i for i, r in enumerate(roles) if r == "special"]
    if len(special) != 1:
        raise InputError("head_contributions reads the embedding at the vision tower's pooled (CLS) token; this "
                         f"tower has {len(special)} special positions (SigLIP pools with a non-linear head)")
    return special[0]


@torch.no_grad()
def head_contributions(vlm, inputs: Mapping[str, Any]) -> HeadContributions:
    """Decompose the image embeddings of `inputs` (images and any texts) into direct contributions,
    through the final LayerNorm with its scale frozen (see the module docstring)."""
    if not vlm.adapter.dual_encoder or "vision.norm" not in vlm.site_table:
        raise InputError("TEXTSPAN needs a dual encoder whose pooled token goes through a final LayerNorm "
                         "(site vision.norm) and a linear projection (vision.proj)")
    norm = vlm.model.get_submodule(vlm.site("vision.norm").module)
    proj = vlm.model.get_submodule(vlm.site("vision.proj").module)
    if not isinstance(norm, nn.LayerNorm) or not isinstance(proj, nn.Linear):
        raise InputError(f"the pooled embedding passes through {type(norm).__name__} and {type(proj).__name__}; "
                         "TEXTSPAN's exact decomposition needs LayerNorm and Linear")
    cls = _pooled_position(vlm, inputs)
    n = vlm.n_layers("vision")
    sites = ["vision.embed", "vision.proj", f"vision.blocks.{n - 1}.resid_post"]
    sites += [f"vision.blocks.{i}.{s}" for i in range(n) for s in ("attn.z", "mlp.out")]
    _, cache = vlm.run_with_cache(inputs, sites)
    names, parts = ["embed"], [cache["vision.embed"][:, cls].double()]  # each (image, d)
    for i in range(n):
        out_proj = vlm.model.get_submodule(vlm.site(f"vision.blocks.{i}.attn.z").module)
        z = cache[f"vision.blocks.{i}.attn.z"][:, cls].double()  # (image, head, d_head)
        w = out_proj.weight.double().view(out_proj.weight.shape[0], z.shape[1], z.shape[2])  # (d, head, d_head)
        per_head = torch.einsum("bhk,dhk->bhd", z, w)  # (image, head, d)
        for h in range(z.shape[1]):
            names.append(f"L{i}.H{h}")
            parts.append(per_head[:, h])
        bias = out_proj.bias.double() if out_proj.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
        names.append(f"L{i}.attn.bias")
        parts.append(bias.expand_as(parts[0]))
        names.append(f"L{i}.mlp")
        parts.append(cache[f"vision.blocks.{i}.mlp.out"][:, cls].double())
    resid = torch.stack(parts, 1)  # (image, component, d)
    x = cache[f"vision.blocks.{n - 1}.resid_post"][:, cls].double()  # (image, d), the sum of the parts
    sigma = (x.var(-1, unbiased=False) + norm.eps).sqrt()  # (image,) the frozen scale
    gamma = norm.weight.double() if norm.weight is not None else 1.0
    centred = resid - resid.mean(-1, keepdim=True)  # LayerNorm's centring is linear
    values = (gamma * centred / sigma[:, None, None]) @ proj.weight.double().T  # (image, component, d_proj)
    const = proj.weight.double() @ norm.bias.double() if norm.bias is not None else 0.0
    const = const + (proj.bias.double() if proj.bias is not None else 0.0)
    values = torch.cat([values, torch.as_tensor(const).expand(values.shape[0], 1, values.shape[-1])], 1)
    names.append("bias")
    return HeadContributions(tuple(names), values.float(), cache["vision.proj"].float())


@dataclass(frozen=True, repr=False)
class TextSpanResult(Result):
    """Per head, the texts chosen greedily and the cumulative share of the head's variance they explain."""

    kind = "textspan"
    heads: tuple[str, ...]  # "L{i}.H{h}"
    texts: tuple[tuple[str, ...], ...]  # (head, n_texts)
    text_ids: torch.Tensor  # (head, n_texts) indices into the pool
    explained: torch.Tensor  # (head, n_texts) cumulative explained-variance fraction
    variance: torch.Tensor  # (head,) total variance of the head's contribution across images

    def __post_init__(self):  # a loaded result holds JSON lists: restore the nested tuples
        object.__setattr__(self, "texts", tuple(tuple(row) for row in self.texts))

    def __repr__(self) -> str:
        return f"TextSpanResult({len(self.heads)} heads x {self.text_ids.shape[1]} texts)"

    def attributes(self, attribute_of: Mapping[str, str], k: int = 3) -> dict[str, str]:
        """Head -> the attribute most of its first k texts name (`attribute_of`: text -> attribute);
        heads whose texts name no attribute are left out."""
        from collections import Counter

        out = {}
        for head, texts in zip(self.heads, self.texts):
            votes = Counter(attribute_of[t] for t in texts[:k] if t in attribute_of)
            if votes:
                out[head] = votes.most_common(1)[0][0]
        return out

    def attribute_shares(self, attribute_of: Mapping[str, str]) -> tuple[tuple[str, ...], torch.Tensor]:
        """(attributes, (head, attribute) share of each head's variance its chosen texts of each
        attribute explain): the explained-variance gain of every pick, summed per attribute."""
        attributes = tuple(dict.fromkeys(attribute_of.values()))
        gain = torch.diff(self.explained, dim=1, prepend=torch.zeros(len(self.heads), 1))  # (head, n_texts)
        out = torch.zeros(len(self.heads), len(attributes))
        for h, texts in enumerate(self.texts):
            for r, t in enumerate(texts):
                if t in attribute_of:
                    out[h, attributes.index(attribute_of[t])] += gain[h, r]
        return attributes, out

    def to_dataframe(self):
        df = long_frame(self.explained, ("head", "rank"), {"head": list(self.heads)}, "explained")
        df["text"] = [t for row in self.texts for t in row]
        return df


def textspan(contrib: HeadContributions, text_emb: torch.Tensor, texts: Sequence[str],
             layers: Sequence[int] | None = None, n_texts: int = 5) -> TextSpanResult:
    """TEXTSPAN's greedy basis per head of `layers` (default: the last two): the text whose
    direction captures most of the head's remaining variance, then both the head's outputs and
    the pool are projected off it. Texts are unit-normalised once and not after each removal (as
    in the paper's code), so a text that earlier picks already explain scores low."""
    if text_emb.shape[0] != len(texts):
        raise InputError(f"{text_emb.shape[0]} text embeddings for {len(texts)} texts")
    if layers is None:
        all_layers = sorted({int(c[1:c.index(".")]) for c in contrib.components if ".H" in c})
        layers = all_layers[-2:]
    idx = contrib.heads(layers)
    if not idx:
        raise InputError(f"no heads in layers {list(layers)}; components: {contrib.components[:6]}...")
    pool = text_emb.double()  # (text, d)
    n_texts = min(n_texts, len(texts))
    ids, explained, variance = [], [], []
    for i in idx:
        c = contrib.values[:, i].double()
        c = c - c.mean(0)  # (image, d)
        total = c.pow(2).sum()
        r = torch.nn.functional.normalize(pool, dim=-1)  # (text, d)
        chosen, ev = [], []
        for _ in range(n_texts):
            score = (c @ r.T).pow(2).sum(0)  # (text,) variance along each (remaining) text
            score[chosen] = -1.0
            j = int(score.argmax())
            d = r[j] / r[j].norm().clamp_min(1e-12)
            c = c - (c @ d)[:, None] * d
            r = r - (r @ d)[:, None] * d
            chosen.append(j)
            ev.append(float(1 - c.pow(2).sum() / total) if total > 0 else 0.0)
        ids.append(chosen)
        explained.append(ev)
        variance.append(float(total) / c.shape[0])
    heads = tuple(contrib.components[i] for i in idx)
    return TextSpanResult(heads, tuple(tuple(texts[j] for j in row) for row in ids), torch.tensor(ids),
                          torch.tensor(explained), torch.tensor(variance))


@dataclass(frozen=True, repr=False)
class HeadAblation(Result):
    """Zero-shot accuracy per attribute with named groups of heads mean-ablated; row 0 is no ablation."""

    kind = "head_ablation"
    groups: tuple[str, ...]  # "none", then the ablated groups' names
    heads: tuple[tuple[str, ...], ...]  # the heads of each group
    attributes: tuple[str, ...]
    accuracy: torch.Tensor  # (group, attribute)

    def __post_init__(self):  # a loaded result holds JSON lists: restore the nested tuples
        object.__setattr__(self, "heads", tuple(tuple(row) for row in self.heads))

    @property
    def drop(self) -> torch.Tensor:
        """(group, attribute) accuracy lost against no ablation."""
        return self.accuracy[:1] - self.accuracy

    def to_dataframe(self):
        df = long_frame(self.accuracy, ("group", "attribute"),
                        {"group": list(self.groups), "attribute": list(self.attributes)}, "accuracy")
        df["drop"] = self.drop.flatten().tolist()
        return df


def _zero_shot(vlm, pixel_values: torch.Tensor, prompts: Mapping[str, Mapping[str, Any]],
               labels: Mapping[str, torch.Tensor], interventions) -> list[float]:
    accs = []
    for attr, text in prompts.items():
        out = vlm.run({**text, "pixel_values": pixel_values}, interventions)
        pred = out.logits_per_image.argmax(-1).cpu()  # (image,)
        accs.append(float((pred == labels[attr].cpu()).float().mean()))
    return accs


def head_mean_ablations(heads: Sequence[str], reference: Mapping[str, torch.Tensor]) -> list:
    """Interventions mean-ablating heads "L{i}.H{h}" of the vision tower at every position, each set
    to its mean over `reference` (site -> (image, pos, head, d_head) attn.z activations)."""
    by_layer: dict[int, list[int]] = {}
    for h in heads:
        layer, head = h[1:].split(".H")
        by_layer.setdefault(int(layer), []).append(int(head))
    return [ablate(f"vision.blocks.{li}.attn.z", "mean", heads=hs, reference=reference[f"vision.blocks.{li}.attn.z"]
                   .mean(0)) for li, hs in sorted(by_layer.items())]


def head_ablation(vlm, pixel_values: torch.Tensor, prompts: Mapping[str, Mapping[str, Any]],
                  labels: Mapping[str, torch.Tensor], groups: Mapping[str, Sequence[str]],
                  reference_pixels: torch.Tensor | None = None) -> HeadAblation:
    """Zero-shot accuracy per attribute (prompts[attr]: text inputs, one per class; labels[attr]:
    (image,) class index) with each group of heads ("L{i}.H{h}") mean-ablated at every position,
    the mean taken over `reference_pixels` (default: these images)."""
    if set(prompts) != set(labels):
        raise InputError(f"prompts cover {sorted(prompts)} but labels cover {sorted(labels)}")
    ref_in = {**next(iter(prompts.values())), "pixel_values": reference_pixels if reference_pixels is not None
              else pixel_values}
    _, ref = vlm.run_with_cache(ref_in, "vision.blocks.*.attn.z")
    rows = [_zero_shot(vlm, pixel_values, prompts, labels, ())]
    for heads in groups.values():
        rows.append(_zero_shot(vlm, pixel_values, prompts, labels, head_mean_ablations(heads, ref)))
    return HeadAblation(("none", *groups), ((),) + tuple(tuple(h) for h in groups.values()), tuple(prompts),
                        torch.tensor(rows))
