"""Patchscopes (Ghandeharioun et al. 2024): decode a hidden representation by writing it into another
forward pass, the target, and reading what the model says next.

- `patchscope_logits`: the target's next-token logits with one vector written per row, at any site
  and one position per row (an image patch of a blank image, a placeholder word).
- `patchscope_inputs`: the same as a result, the top-k next tokens per vector.
- `patchscope`: the text-only form of the paper: `lm.blocks.{layer}.resid_post` at a placeholder
  token of a text prompt.
The zoo check (an image token's state answering a question about its object) is zoo_patchscope.py.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from vlmscope.errors import InputError
from vlmscope.methods.metrics import last_logits
from vlmscope.model.interventions import patch
from vlmscope.results import Result


@dataclass(frozen=True, repr=False)
class PatchscopeResult(Result):
    """Top next-token predictions of the target with each vector written in."""

    kind = "patchscope"
    site: str  # where the vectors were written
    prompt: str  # the target's text
    position: str  # where in the target, in words
    labels: tuple[str, ...]
    top_ids: torch.Tensor  # (vector, k)
    top_probs: torch.Tensor  # (vector, k)
    top_tokens: tuple[tuple[str, ...], ...]

    def __post_init__(self):  # a loaded result holds JSON lists: restore the nested tuples
        object.__setattr__(self, "top_tokens", tuple(tuple(row) for row in self.top_tokens))

    def __repr__(self) -> str:
        return f"PatchscopeResult({len(self.labels)} vectors at {self.site}, {self.position} of {self.prompt!r})"

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame([{"vector": lab, "rank": r, "token": t, "prob": float(self.top_probs[i, r])}
                             for i, lab in enumerate(self.labels) for r, t in enumerate(self.top_tokens[i])])


@torch.no_grad()
def patchscope_logits(vlm, vectors: torch.Tensor, site: str, inputs: Mapping[str, Any], positions
                      ) -> torch.Tensor:
    """(row, vocab) next-token logits of the target `inputs` with vectors[i] (row, d) written into
    `site` at row i's one selected position (`positions`: any position spec, e.g. a (row, pos) mask)."""
    vectors = vectors[None] if vectors.dim() == 1 else vectors
    stream = vlm.site(site).stream
    mask = vlm.select(inputs, positions, stream=stream)  # (row, pos)
    if mask.shape[0] != len(vectors) or not (mask.sum(1) == 1).all():
        raise InputError(f"patchscope writes one vector per row at one position: {len(vectors)} vectors, "
                         f"positions per row {mask.sum(1).tolist()}")
    dtype = next(vlm.model.parameters()).dtype
    source = torch.zeros(*mask.shape, vectors.shape[-1], dtype=dtype)  # (row, pos, d)
    source[mask] = vectors.to(dtype).cpu()
    return last_logits(vlm, vlm.run(inputs, [patch(site, source, positions=mask)]), inputs).float()


def patchscope_inputs(vlm, vectors: torch.Tensor, site: str, inputs: Mapping[str, Any], positions, k: int = 5,
                      labels: Sequence[str] | None = None, prompt: str = "", where: str = "") -> PatchscopeResult:
    """`patchscope_logits` as the top-k next tokens per vector; `prompt` and `where` describe the
    target and the position for the record."""
    vectors = vectors[None] if vectors.dim() == 1 else vectors
    probs = patchscope_logits(vlm, vectors, site, inputs, positions).softmax(-1)  # (row, vocab)
    top = probs.topk(min(k, probs.shape[-1]), dim=-1)
    tok = vlm.tokenizer
    words = tuple(tuple(str(t) for t in tok.convert_ids_to_tokens(row)) for row in top.indices.tolist())
    labels = tuple(labels) if labels is not None else tuple(str(i) for i in range(len(vectors)))
    return PatchscopeResult(site, prompt, where, labels, top.indices.cpu(), top.values.cpu(), words)


def patchscope(vlm, vectors: torch.Tensor, layer: int, prompt: str, placeholder: str, k: int = 5,
               labels: Sequence[str] | None = None) -> PatchscopeResult:
    """Write each vector (n, d) into `lm.blocks.{layer}.resid_post` at the (last) placeholder token
    of the text-only `prompt` and read the top-k next tokens after the prompt's last token."""
    vectors = vectors[None] if vectors.dim() == 1 else vectors
    tok = vlm.tokenizer
    enc = tok([prompt] * len(vectors), return_tensors="pt")
    ids = enc["input_ids"]
    (pid,) = tok.convert_tokens_to_ids([placeholder])
    where = (ids[0] == pid).nonzero().flatten() if pid is not None else torch.zeros(0)
    if len(where) == 0:
        raise InputError(f"placeholder {placeholder!r} is not a token of the prompt {prompt!r}")
    inputs = {"input_ids": ids, "attention_mask": enc.get("attention_mask", torch.ones_like(ids))}
    return patchscope_inputs(vlm, vectors, f"lm.blocks.{layer}.resid_post", inputs, int(where[-1]), k, labels,
                             prompt, f"token {placeholder!r}")
