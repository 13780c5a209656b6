"""The scene probe: what is at each grid cell, read from *all* of a stream's image tokens together.

A per-patch probe needs one token per cell, which a resampler (BLIP-2's queries) does not keep. The
scene probe asks the same question of every architecture: for each cell c, a linear probe on the
concatenated image tokens of one image (vision: CLS + patches; connector: its output tokens; LM:
the image positions) predicts the attribute of the object at c, or "empty". Its mean accuracy over
the cells measures how much of the scene's layout -- which object is where -- a site still holds,
so position lost at a connector shows as a fall between the tower and the connector.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vlmscope.data import patch_objects
from vlmscope.data.vocab import GRID
from vlmscope.methods.probing import ConceptTrace, ProbeConfig, fit_probes, trace_sites
from vlmscope.model.positions import IMAGE
from vlmscope.zoo import truth

SCENE_ATTRIBUTES = ("colour", "shape", "size", "object")  # "object": is there an object at the cell at all


def cell_labels(scenes: Sequence, attribute: str) -> torch.Tensor:
    """(cell, scene) class of the object at each cell (its `attribute` value), or the extra class
    "empty"; attribute "object" gives 1 for an object, 0 for none."""
    if attribute not in SCENE_ATTRIBUTES:
        raise ValueError(f"unknown scene attribute {attribute!r}; valid: {', '.join(SCENE_ATTRIBUTES)}")
    empty = 0 if attribute == "object" else len(truth.ATTRIBUTES[attribute])
    out = torch.full((GRID * GRID, len(scenes)), empty, dtype=torch.long)
    for b, scene in enumerate(scenes):
        owner = patch_objects(scene, (GRID, GRID)).ravel()  # (cells,) object index or -1
        for c, k in enumerate(owner.tolist()):
            if k >= 0:
                out[c, b] = 1 if attribute == "object" else truth.object_value(scene.objects[k], attribute)
    return out


def image_tokens(vlm, positions, cache, site: str, n: int) -> torch.Tensor:
    """(examples, tokens * d): a site's image tokens of each example, concatenated in order (the
    whole sequence for vision streams, whose rows are images)."""
    stream = vlm.site(site).stream
    act = cache[site].float().cpu()  # (rows, pos, d)
    if stream == "vision":
        return act.reshape(n, -1)
    pos = positions[stream]  # vlm.positions(inputs), computed once by the caller
    keep = pos.role == IMAGE  # (rows, pos)
    per_row = keep.sum(1)
    if not bool((per_row == per_row[0]).all()):
        raise ValueError(f"{site}: examples have different numbers of image tokens ({per_row.tolist()}); the scene "
                         "probe needs one fixed layout")
    return act[keep].reshape(n, -1)


def scene_trace(vlm, attribute: str = "colour", n: int = 600, seed: int = 0, sites: Sequence[str] | None = None,
                config: ProbeConfig | None = None) -> tuple[ConceptTrace, dict[str, float]]:
    """The scene probe at every site; score = mean test accuracy over the 9 cells. Scores: the last
    vision block, the connector, the last LM block, and the largest fall."""
    return scene_traces(vlm, (attribute,), n, seed, sites, config)[attribute]


def scene_traces(vlm, attributes: Sequence[str], n: int = 600, seed: int = 0, sites: Sequence[str] | None = None,
                 config: ProbeConfig | None = None) -> dict[str, tuple[ConceptTrace, dict[str, float]]]:
    """scene_trace for several attributes from one forward over the same scenes."""
    exs = truth.examples(seed, n)
    x = truth.inputs_for(vlm, exs)
    sites = list(sites or trace_sites(vlm, ("vision", "connector", "lm")))
    labels = {a: cell_labels([e.scene for e in exs], a) for a in attributes}  # each (cell, n)
    _, cache = vlm.run_with_cache(x, sites)
    positions = vlm.positions(x)
    feats = {site: image_tokens(vlm, positions, cache, site, n) for site in sites}  # each (n, tokens * d)
    return {a: _trace(a, sites, feats, labels[a], n, config) for a in attributes}


def _trace(attribute: str, sites: list[str], feats: dict, labels: torch.Tensor, n: int, config
           ) -> tuple[ConceptTrace, dict[str, float]]:
    score, control = [], []
    for site in sites:
        r = fit_probes(feats[site].expand(labels.shape[0], -1, -1), labels, config, target=f"{attribute} at each cell")
        score.append(float(r.score.mean()))
        control.append(float(r.control_score.mean()))
    trace = ConceptTrace.of(f"{attribute} at each cell", sites, torch.tensor(score), torch.tensor(control),
                            torch.full((len(sites),), n))
    scores: dict = {}
    for part in ("vision", "connector", "lm"):  # the last site of each part probed
        i = trace.last_of(part)
        if i is not None:
            scores[f"scene {attribute} at {sites[i]}"] = score[i]
    scores |= {f"largest drop in scene {attribute}": trace.drop, "drop after": trace.drop_after}
    return trace, scores
