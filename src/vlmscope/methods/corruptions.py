"""The survey's three corruptions for causal methods.

- Gaussian noise (GN) on the image-token embeddings entering the LM, scaled in units of their
  standard deviation (3 sigma by default, as in Meng et al. 2022).
- Symmetric token replacement (STR): swap question tokens for others of the same kind, keeping
  the token layout (Zhang & Nanda 2024).
- Semantic image pairs (SIP): two images that differ in one concept, with equal token layouts
  (Golovanevsky et al. 2024). `check_same_layout` refuses pairs whose layouts differ.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from vlmscope.errors import InputError
from vlmscope.model.interventions import Patch, patch
from vlmscope.model.positions import PositionSpec


def gaussian_noise(vlm, inputs: Mapping[str, Any], scale: float = 3.0, positions: PositionSpec = "image",
                   seed: int = 0) -> Patch:
    """An intervention replacing `lm.embed` at `positions` with itself plus N(0, (scale*sigma)^2)
    noise, sigma being the standard deviation of those embeddings in this batch."""
    _, cache = vlm.run_with_cache(inputs, "lm.embed")
    emb = cache["lm.embed"]
    mask = vlm.positions(inputs)["lm"].select(positions).to(emb.device)
    if not mask.any():
        raise InputError(f"no positions selected by {positions!r} to add noise to")
    sigma = emb[mask].float().std()
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(emb.shape, generator=g).to(emb.device, emb.dtype) * (scale * sigma).to(emb.dtype)
    return patch("lm.embed", emb + noise, positions=positions)


def replace_tokens(inputs: Mapping[str, Any], positions: Sequence[int] | torch.Tensor,
                   new_ids: Sequence[int] | torch.Tensor) -> dict[str, Any]:
    """STR: a copy of `inputs` with input_ids at `positions` replaced (same length, same layout).
    positions/new_ids are one per example (or one shared)."""
    ids = inputs["input_ids"].clone()
    b = ids.shape[0]
    pos = torch.as_tensor(positions).expand(b) if torch.as_tensor(positions).dim() == 0 else torch.as_tensor(positions)
    new = torch.as_tensor(new_ids).expand(b) if torch.as_tensor(new_ids).dim() == 0 else torch.as_tensor(new_ids)
    ids[torch.arange(b), pos] = new.to(ids)
    return {**inputs, "input_ids": ids}


def check_same_layout(vlm, clean: Mapping[str, Any], corrupt: Mapping[str, Any]) -> None:
    """Refuse a clean/corrupt pair whose token layouts differ (roles, lengths or image grids)."""
    a, b = vlm.positions(clean), vlm.positions(corrupt)
    for stream in a.keys() | b.keys():
        if stream not in a or stream not in b:
            raise InputError(f"the clean and corrupt inputs differ: only one has a {stream!r} stream")
        pa, pb = a[stream], b[stream]
        if pa.shape != pb.shape:
            raise InputError(f"clean and corrupt {stream!r} streams have shapes {pa.shape} and {pb.shape}; "
                             "patching needs equal token layouts (same prompt length and image sizes)")
        for field in ("role", "image", "row", "col", "tile"):
            if not torch.equal(getattr(pa, field), getattr(pb, field)):
                diff = (getattr(pa, field) != getattr(pb, field)).nonzero()[0].tolist()
                raise InputError(f"clean and corrupt {stream!r} streams differ in token {field} at (row, pos) "
                                 f"{tuple(diff)}; patching needs equal token layouts")
