"""Describers: what a feature, neuron or representation means, in words.

(a) `dissect`: network dissection (Bau et al. 2017). A feature's activation map over patches is
    thresholded at its top quantile over the dataset; its IoU with each concept's patch mask
    (ground truth, `concepts.concept_masks`) ranks the concepts, the best one is its label.
(b) Patchscopes decoding lives in patchscope.py.
(c) `describe_with_llm`: an optional describer that sends the evidence to an LLM behind an
    OpenAI-compatible chat-completions endpoint given by URL (nothing is sent unless called;
    `llm_messages` shows exactly what would be sent).
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from vlmscope.errors import InputError
from vlmscope.results import Result, long_frame


@dataclass(frozen=True, repr=False)
class Dissection(Result):
    """IoU (feature, concept) of thresholded activation maps with concept masks."""

    kind = "dissection"
    features: tuple[str, ...]
    concepts: tuple[str, ...]
    iou: torch.Tensor  # (feature, concept)
    threshold: torch.Tensor  # (feature,)
    quantile: float
    min_iou: float  # below it a feature gets no label ("", Bau et al. call units detectors above 0.04)

    @property
    def labels(self) -> tuple[str, ...]:
        """The concept of highest IoU per feature, "" where that IoU is below `min_iou`."""
        best = self.iou.max(1)
        return tuple(self.concepts[i] if v >= self.min_iou else ""
                     for i, v in zip(best.indices.tolist(), best.values.tolist()))

    @property
    def best_iou(self) -> torch.Tensor:
        return self.iou.max(1).values

    def __repr__(self) -> str:
        return f"Dissection({len(self.features)} features x {len(self.concepts)} concepts, q={self.quantile})"

    def to_dataframe(self):
        return long_frame(self.iou, ("feature", "concept"), {"feature": list(self.features),
                                                             "concept": list(self.concepts)}, "iou")


def dissect(maps: torch.Tensor, masks: Mapping[str, torch.Tensor], quantile: float = 0.8,
            features: Sequence[str] | None = None, min_iou: float = 0.04, ratio: float | None = None) -> Dissection:
    """maps: (feature, scene, rows, cols) activations (or one feature, (scene, rows, cols));
    masks: concept -> (scene, rows, cols) bool. IoU summed over the dataset, as Bau et al. A feature
    fires above its top `quantile` (Bau et al.), or, with `ratio`, above ratio x its peak (the rule
    of the verification loop, for graded features such as SAE latents)."""
    maps = maps[None] if maps.dim() == 3 else maps
    if not 0 <= quantile < 1:
        raise InputError(f"quantile must be in [0, 1), got {quantile}")
    flat = maps.flatten(1).float()  # (feature, scene * rows * cols)
    k = max(1, int(quantile * flat.shape[1]))
    thr = flat.kthvalue(k, dim=1).values  # (feature,)
    if ratio is not None:
        if not 0 <= ratio < 1:
            raise InputError(f"ratio must be in [0, 1), got {ratio}")
        peak = flat.amax(1)
        thr = torch.where(peak > 0, ratio * peak, torch.inf)
    on = flat > thr[:, None]
    concepts = tuple(masks)
    m = torch.stack([masks[c].flatten() for c in concepts]).to(on.device)  # (concept, cells)
    if m.shape[1] != on.shape[1]:
        raise InputError(f"masks cover {m.shape[1]} patch cells but the maps {on.shape[1]}")
    inter = on.float() @ m.float().T  # (feature, concept)
    union = on.sum(1, keepdim=True) + m.sum(1)[None] - inter
    iou = inter / union.clamp_min(1)
    features = tuple(features) if features is not None else tuple(str(i) for i in range(len(maps)))
    return Dissection(features, concepts, iou, thr, float(quantile), float(min_iou))


# --- (c) an optional LLM describer -------------------------------------------------------------------

SYSTEM = ("You explain what a feature of a vision-language model responds to. The images come from a "
          "synthetic world of coloured shapes (colours, shapes, sizes, 3x3 grid cells, backgrounds). "
          "Answer with one short phrase, then one sentence of justification.")


def llm_messages(evidence: Mapping[str, Any]) -> list[dict[str, str]]:
    """The chat messages `describe_with_llm` sends: a fixed system prompt and the evidence as JSON."""
    body = json.dumps(evidence, indent=1, sort_keys=True, default=str)
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"Evidence about the feature:\n{body}\nWhat does it respond to?"}]


@dataclass(frozen=True, repr=False)
class LLMDescription(Result):
    """What was sent (messages, evidence) and what came back."""

    kind = "llm_description"
    url: str
    model: str
    messages: tuple[dict, ...]
    evidence: dict
    description: str

    def __repr__(self) -> str:
        return f"LLMDescription({self.description[:60]!r} from {self.model} at {self.url})"

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame([{"url": self.url, "model": self.model, "description": self.description,
                              "prompt": self.messages[-1]["content"]}])


def describe_with_llm(evidence: Mapping[str, Any], url: str, model: str = "gpt-4o-mini",
                      api_key: str | None = None, timeout: float = 30.0) -> LLMDescription:
    """POST the evidence to an OpenAI-compatible endpoint (`url`: the server base, e.g.
    "http://127.0.0.1:8000/v1", or the full .../chat/completions) and return its description."""
    if not url.startswith(("http://", "https://")):
        raise InputError(f"the LLM endpoint must be an http(s) URL, got {url!r}")
    endpoint = url if url.rstrip("/").endswith("/chat/completions") else url.rstrip("/") + "/chat/completions"
    messages = llm_messages(evidence)
    payload = json.dumps({"model": model, "messages": messages, "temperature": 0}).encode()
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    req = urllib.request.Request(endpoint, data=payload, headers=headers, method="POST")
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        doc = json.loads(resp.read().decode())
    try:
        text = doc["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise InputError(f"{endpoint} answered without choices[0].message.content: {str(doc)[:200]}") from None
    return LLMDescription(endpoint, model, tuple(messages), json.loads(json.dumps(dict(evidence), default=str)),
                          str(text).strip())
