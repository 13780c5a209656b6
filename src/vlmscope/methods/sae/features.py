"""What SAE features see: the data a feature browser draws (Bricken et al. 2023's feature pages;
Neuronpedia), and concept detection scored against ground truth.

`feature_views` runs the model over input batches and keeps, per feature, the top-activating
examples with the feature's activation at every image patch (placed by the positions' patch
row/column), a histogram of its non-zero activations, how often it fires, and — where the site
is in the LM's residual stream — its direct logit effect: the decoder direction read through the
LM's final norm and unembedding (`VLM.unembed`), the tokens it promotes and suppresses most.

`concept_f1` scores, for each concept, how well the best single feature detects it: per-row
labels (e.g. the colour of the object at each patch) against "the feature is active" (> 0), F1
per (concept, feature), best feature per concept.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from vlmscope.methods.sae.base import SAE
from vlmscope.model.positions import IMAGE, PositionSpec
from vlmscope.results import Result, long_frame

RESIDUAL = ("embed", "resid_pre", "resid_mid", "resid_post", "attn.out", "mlp.out")


@dataclass(frozen=True, repr=False)
class FeatureViews(Result):
    """Per feature: top examples with patch maps, activation histogram, frequency, logit effect."""

    kind = "sae_features"
    site: str
    features: torch.Tensor  # (feature,) latent ids
    top_rows: torch.Tensor  # (feature, top) stream row (an image for vision sites), -1 if unfilled
    top_examples: torch.Tensor  # (feature, top) example index in the stream of batches
    top_values: torch.Tensor  # (feature, top) the feature's max over the row's selected positions
    patch_maps: torch.Tensor  # (feature, top, grid_row, grid_col) activation per patch, NaN off-image
    hist_counts: torch.Tensor  # (feature, bin) counts of the non-zero activations
    hist_edges: torch.Tensor  # (feature, bin + 1)
    frequency: torch.Tensor  # (feature,) fraction of selected positions where it is active
    logit_top_ids: torch.Tensor  # (feature, t) tokens its decoder direction promotes; (feature, 0): undefined
    logit_top_values: torch.Tensor  # (feature, t)
    logit_bottom_ids: torch.Tensor  # (feature, t) tokens it suppresses
    logit_bottom_values: torch.Tensor  # (feature, t)
    n_positions: int = 0

    @property
    def has_logit_effect(self) -> bool:
        return self.logit_top_ids.shape[1] > 0

    def __repr__(self) -> str:
        return (f"FeatureViews({len(self.features)} features at {self.site}, top {self.top_values.shape[1]}, "
                f"grid {tuple(self.patch_maps.shape[2:])}, logit effect {self.has_logit_effect})")

    def to_dataframe(self):
        """One row per (feature, rank): the example, its max activation, the feature's frequency."""
        f, t = self.top_values.shape
        df = long_frame(self.top_values, ("feature", "rank"), {"feature": self.features.tolist()}, "value")
        df["example"] = self.top_examples.flatten().tolist()
        df["row"] = self.top_rows.flatten().tolist()
        df["frequency"] = self.frequency.repeat_interleave(t).tolist()
        return df


def _grid(pos) -> tuple[int, int]:
    if pos.grid is not None:
        return tuple(pos.grid)
    on = pos.row >= 0
    return (int(pos.row[on].max()) + 1, int(pos.col[on].max()) + 1) if on.any() else (1, 1)


@torch.no_grad()
def feature_views(sae: SAE, vlm, batches: Iterable[Mapping[str, Any]], features: Sequence[int] | None = None,
                  site: str | None = None, positions: PositionSpec = None, top: int = 8, bins: int = 32,
                  logit_tokens: int = 10) -> FeatureViews:
    """Feature-browser data for `features` (default all) of `sae` over model input batches.
    Patch maps show the first image of each row; `positions` defaults to the SAE's own."""
    site = site or sae.cfg.site
    positions = positions if positions is not None else sae.cfg.positions
    feats = torch.arange(sae.cfg.d_sae) if features is None else torch.tensor(list(features)).long()
    n_f = len(feats)
    best_v = torch.full((n_f, top), float("-inf"))
    best_row = torch.full((n_f, top), -1, dtype=torch.long)
    best_ex = torch.full((n_f, top), -1, dtype=torch.long)
    maps: torch.Tensor | None = None
    values, ids = [], []
    fired = torch.zeros(n_f)
    n_pos, row0, ex0 = 0, 0, 0
    for inputs in batches:
        pos = vlm.positions(inputs)[vlm.site(site).stream]
        _, cache = vlm.run_with_cache(inputs, site)
        mask = pos.select(positions)  # (batch, pos)
        h = sae.encode(cache[site].float())[..., feats]  # (batch, pos, feature)
        h = torch.where(mask[..., None].to(h.device), h, 0.0).cpu()
        on = (h > 0) & mask[..., None]
        fired += on.sum((0, 1)).float()
        n_pos += int(mask.sum())
        b_idx, p_idx, f_idx = on.nonzero(as_tuple=True)
        values.append(h[b_idx, p_idx, f_idx])
        ids.append(f_idx)
        grid = _grid(pos)
        if maps is None:
            maps = torch.full((n_f, top, *grid), float("nan"))
        batch_maps = _patch_maps(h, pos, mask, grid)  # (batch, feature, gr, gc)
        row_max = h.amax(1).T  # (feature, batch)
        cand_v = torch.cat([best_v, row_max], 1)
        keep = cand_v.topk(top, dim=1).indices  # (feature, top)
        n_b = h.shape[0]
        cand_row = torch.cat([best_row, torch.arange(row0, row0 + n_b).expand(n_f, -1)], 1)
        cand_ex = torch.cat([best_ex, (pos.example + ex0).expand(n_f, -1)], 1)
        cand_maps = torch.cat([maps, batch_maps.transpose(0, 1)], 1)  # (feature, top + batch, gr, gc)
        best_v, best_row, best_ex = cand_v.gather(1, keep), cand_row.gather(1, keep), cand_ex.gather(1, keep)
        maps = cand_maps[torch.arange(n_f)[:, None], keep]
        row0 += n_b
        ex0 += int(pos.example.max()) + 1
    best_row[best_v == float("-inf")] = -1
    best_ex[best_v == float("-inf")] = -1
    counts, edges = _histograms(torch.cat(values) if values else torch.zeros(0),
                                torch.cat(ids) if ids else torch.zeros(0, dtype=torch.long), n_f, bins)
    tops = _logit_effect(sae, vlm, site, feats, logit_tokens)
    return FeatureViews(site=site, features=feats, top_rows=best_row, top_examples=best_ex,
                        top_values=best_v.clamp_min(0), patch_maps=maps if maps is not None else
                        torch.full((n_f, top, 1, 1), float("nan")), hist_counts=counts, hist_edges=edges,
                        frequency=fired / max(n_pos, 1), logit_top_ids=tops[0], logit_top_values=tops[1],
                        logit_bottom_ids=tops[2], logit_bottom_values=tops[3], n_positions=n_pos)


def _patch_maps(h: torch.Tensor, pos, mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(batch, pos, feature) activations -> (batch, feature, grid_row, grid_col) for each row's first
    image (NaN where no selected patch lies; the max where tiles put several on one cell)."""
    b, _, f = h.shape
    cells = grid[0] * grid[1]
    first = torch.where(pos.image >= 0, pos.image, 1 << 30).amin(1, keepdim=True)  # (batch, 1)
    inside = (pos.row >= 0) & (pos.row < grid[0]) & (pos.col >= 0) & (pos.col < grid[1])
    on = (pos.role == IMAGE) & (pos.image == first) & mask & inside
    rows, p = on.nonzero(as_tuple=True)
    flat = rows * cells + pos.row[rows, p] * grid[1] + pos.col[rows, p]  # (n,) cell of each patch
    out = torch.full((b * cells, f), float("-inf"))
    out.scatter_reduce_(0, flat[:, None].expand(-1, f), h[rows, p], "amax")
    out = torch.where(torch.isinf(out), float("nan"), out)
    return out.view(b, grid[0], grid[1], f).permute(0, 3, 1, 2)


def _histograms(values: torch.Tensor, ids: torch.Tensor, n_f: int, bins: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    counts = torch.zeros(n_f, bins)
    edges = torch.zeros(n_f, bins + 1)
    for i in range(n_f):
        v = values[ids == i]
        hi = float(v.max()) if v.numel() else 1.0
        edges[i] = torch.linspace(0.0, hi, bins + 1)
        if v.numel():
            counts[i] = torch.histc(v, bins=bins, min=0.0, max=hi)
    return counts, edges


def _logit_effect(sae: SAE, vlm, site: str, feats: torch.Tensor, t: int) -> tuple[torch.Tensor, ...]:
    empty = (torch.zeros(len(feats), 0, dtype=torch.long), torch.zeros(len(feats), 0))
    in_resid = site.startswith("lm.") and (site == "lm.embed" or site.split(".", 3)[-1] in RESIDUAL)
    if not in_resid or "lm.logits" not in vlm.site_table:
        return (*empty, *empty)
    w = sae.W_dec[feats].detach()
    directions = w / w.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # (feature, d_in)
    dtype = next(vlm.model.parameters()).dtype  # the device may be offloaded: ask the VLM for its main one
    logits = vlm.unembed(directions.to(device=vlm.device, dtype=dtype)).float().cpu()  # (feature, vocab)
    t = min(t, logits.shape[-1])
    top, bottom = logits.topk(t, dim=-1), logits.topk(t, dim=-1, largest=False)
    return top.indices, top.values, bottom.indices, bottom.values


# --- concepts against ground truth -----------------------------------------------------------------


@dataclass(frozen=True, repr=False)
class ConceptF1(Result):
    """Best single-feature F1 per concept (a feature 'detects' a concept where it is active)."""

    kind = "concept_f1"
    concepts: tuple[str, ...]
    best_f1: torch.Tensor  # (concept,)
    best_feature: torch.Tensor  # (concept,) latent id
    precision: torch.Tensor  # (concept,) of the best feature
    recall: torch.Tensor  # (concept,)
    support: torch.Tensor  # (concept,) rows with the concept
    goal: float = 0.8
    threshold: torch.Tensor | None = None  # (concept,) activation level the best feature is read at

    @property
    def uncaptured(self) -> tuple[str, ...]:
        """Concepts whose best feature stays below the goal F1."""
        f1 = self.best_f1.tolist()
        return tuple(c for c, f in zip(self.concepts, f1, strict=True) if not f >= self.goal)

    def __repr__(self) -> str:
        return (f"ConceptF1({len(self.concepts)} concepts, mean best F1 {float(self.best_f1.mean()):.3f}, "
                f"{len(self.uncaptured)} below {self.goal})")

    def to_dataframe(self):
        df = long_frame(self.best_f1, ("concept",), {"concept": list(self.concepts)}, "best_f1")
        for k in ("best_feature", "precision", "recall", "support"):
            df[k] = getattr(self, k).tolist()
        return df


def concept_f1(labels: torch.Tensor, acts: torch.Tensor,
               concepts: Sequence[str] | Mapping[str, int] | None = None, threshold: float = 0.0,
               goal: float = 0.8, chunk: int = 8192, levels: int = 1) -> ConceptF1:
    """For each concept (a label value), the feature whose activity (> threshold) best matches the
    rows carrying it. labels (rows,) ints, -1 for rows to leave out; acts (rows, features).
    concepts: names for label values 0..C-1, or {name: label value} to score only some (other
    values, e.g. 'no object', still count as negatives). levels > 1 also tries each feature as a
    detector above `levels - 1` quantiles of its positive activations (the best level is kept and
    reported in `threshold`), since a feature may fire weakly off its concept."""
    if labels.shape[0] != acts.shape[0]:
        raise ValueError(f"labels have {labels.shape[0]} rows but activations {acts.shape[0]}")
    if concepts is None:
        concepts = [str(v) for v in range(int(labels.max()) + 1)]
    table = dict(concepts) if isinstance(concepts, Mapping) else {str(c): i for i, c in enumerate(concepts)}
    values = torch.tensor(list(table.values()), dtype=torch.long)
    keep = labels >= 0
    labels, acts = labels[keep], acts[keep]
    cuts = torch.full((1, acts.shape[1]), float(threshold))
    if levels > 1:
        q = torch.linspace(0, 1, levels + 1)[1:-1]
        pos = torch.where(acts > threshold, acts, torch.nan)
        cuts = torch.cat([cuts, torch.nanquantile(pos.float(), q, dim=0).nan_to_num(float("inf"))])
    support = (labels[:, None] == values[None]).sum(0).double()  # (concepts,)
    best_f1 = torch.full((len(values),), -1.0, dtype=torch.float64)
    best = torch.zeros(len(values), dtype=torch.long)
    best_tp = torch.zeros(len(values), dtype=torch.float64)
    best_fired = torch.ones(len(values), dtype=torch.float64)
    best_cut = torch.zeros(len(values))
    rows = torch.arange(len(values))
    for cut in cuts:  # (features,) one threshold per feature
        tp = torch.zeros(len(values), acts.shape[1], dtype=torch.float64)
        fired = torch.zeros(acts.shape[1], dtype=torch.float64)
        for s in range(0, len(labels), chunk):
            on = (acts[s:s + chunk] > cut[None]).double()  # (rows, features)
            y = (labels[s:s + chunk, None] == values[None]).double()  # (rows, concepts)
            tp += y.T @ on
            fired += on.sum(0)
        f1 = 2 * tp / (fired[None] + support[:, None]).clamp_min(1)
        arg = f1.argmax(1)
        better = f1[rows, arg] > best_f1
        best_f1 = torch.where(better, f1[rows, arg], best_f1)
        best = torch.where(better, arg, best)
        best_tp = torch.where(better, tp[rows, arg], best_tp)
        best_fired = torch.where(better, fired[arg], best_fired)
        best_cut = torch.where(better, cut[arg].float(), best_cut)
    return ConceptF1(concepts=tuple(table), best_f1=best_f1.float(), best_feature=best,
                     precision=(best_tp / best_fired.clamp_min(1)).float(),
                     recall=(best_tp / support.clamp_min(1)).float(), support=support.long(), goal=goal,
                     threshold=best_cut)
