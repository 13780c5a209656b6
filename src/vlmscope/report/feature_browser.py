"""The web app's SAE feature browser: which features fire most over a fixed set of shapes-world
scenes, and, for one feature, the scenes where it fires most with its activation at every patch
(Bricken et al. 2023's feature pages), labelled by network dissection (Bau et al. 2017) against
the scenes' ground-truth concept masks.

Scenes are the app's own (`scene-SEED`, `SCENE_SEEDS`), so the page shows them through
/api/image. Every function returns plain JSON-ready values.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from vlmscope.methods.explain.concepts import all_concepts, concept_masks
from vlmscope.methods.explain.describe import dissect
from vlmscope.methods.explain.zoo_features import patch_maps

SCENE_SEEDS = tuple(range(1000, 1048))  # the scenes features are ranked and shown on
ATTRIBUTES = ("colour", "shape", "size", "cell")  # patch-level concepts the labels may name
LISTED, TOP, BATCH = 24, 8, 16


def scenes_of(seeds: Sequence[int]) -> list:
    """The shapes-world scene of each seed (as `app.scene_image` draws it)."""
    from vlmscope.data import sample_scene

    return [sample_scene(np.random.default_rng(s)) for s in seeds]


def feature_maps(vlm, sae, scenes: Sequence, features: torch.Tensor | None = None) -> torch.Tensor:
    """(scene, rows, cols, feature) SAE activations at every image patch of each scene, for
    `features` (default all), BATCH scenes per model run."""
    from vlmscope.data import render

    def encode(acts: torch.Tensor) -> torch.Tensor:  # (patches, d_in) -> (patches, feature)
        h = sae.encode(acts)
        return h if features is None else h[:, features]

    return torch.cat([patch_maps(vlm, [render(s) for s in scenes[i:i + BATCH]], sae.cfg.site, encode)
                      for i in range(0, len(scenes), BATCH)])


def _labels(maps: torch.Tensor, scenes: Sequence) -> tuple[tuple[str, ...], list[float]]:
    """Dissection label and its IoU per feature of (scene, rows, cols, feature) maps."""
    masks = concept_masks(scenes, tuple(maps.shape[1:3]), all_concepts(ATTRIBUTES))
    dis = dissect(maps.permute(3, 0, 1, 2), masks)
    return dis.labels, dis.best_iou.tolist()


def list_features(vlm, sae, seeds: Sequence[int] = SCENE_SEEDS, n: int = LISTED) -> list[dict]:
    """The n features active at the most image patches of the scenes (dead ones left out), each
    with its firing frequency, its largest activation and its dissection label ("" if none)."""
    scenes = scenes_of(seeds)
    fired = torch.zeros(sae.cfg.d_sae)
    for i in range(0, len(scenes), BATCH):  # one batch at a time: d_sae may be large
        fired += (feature_maps(vlm, sae, scenes[i:i + BATCH]) > 0).sum((0, 1, 2))
    order = fired.argsort(descending=True, stable=True)[:n]
    chosen = order[fired[order] > 0]
    if len(chosen) == 0:
        return []
    maps = feature_maps(vlm, sae, scenes, chosen)  # (scene, rows, cols, feature)
    labels, iou = _labels(maps, scenes)
    cells = maps.shape[0] * maps.shape[1] * maps.shape[2]
    peak = maps.amax((0, 1, 2))  # (feature,)
    return [{"id": int(f), "frequency": float(fired[f]) / cells, "max": float(peak[j]), "label": labels[j],
             "iou": iou[j]} for j, f in enumerate(chosen.tolist())]


def feature_page(vlm, sae, feature: int, seeds: Sequence[int] = SCENE_SEEDS, top: int = TOP) -> dict:
    """One feature's top scenes (by its largest patch activation) with its activation at every
    patch, its frequency and its dissection label."""
    scenes = scenes_of(seeds)
    maps = feature_maps(vlm, sae, scenes, torch.tensor([feature]))  # (scene, rows, cols, 1)
    peak = maps.amax((1, 2, 3))  # (scene,)
    best = peak.argsort(descending=True, stable=True)[:top]
    best = best[peak[best] > 0]
    labels, iou = _labels(maps, scenes)
    return {"id": feature, "site": sae.cfg.site, "frequency": float((maps > 0).float().mean()),
            "max": float(peak.max()), "label": labels[0], "iou": iou[0], "scenes": len(scenes),
            "grid": list(maps.shape[1:3]),
            "top": [{"image": f"scene-{seeds[s]}", "seed": seeds[s], "act": float(peak[s]),
                     "map": maps[s, :, :, 0].tolist()} for s in best.tolist()]}
