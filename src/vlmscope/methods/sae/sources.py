"""Where an SAE trainer's activations come from: chunks of rows, one tensor (rows, d) per site.

Every chunk is a pure function of (seed, epoch, chunk index) — which rows, in which order — so a
resumed run reads exactly what an uninterrupted one did, without replaying the data before it.

- `TensorSource`: rows already in memory (synthetic data, a loaded store), reshuffled each epoch.
- `StoreSource`: an `ActivationStore`'s shards, `buffer_shards` of them per chunk (the shuffled
  buffer), the shard order reshuffled each epoch.
- `ModelSource`: streamed from the model: each chunk is `chunk_examples` examples run in batches
  of `batch_size`; one forward feeds every site (so several SAEs share it) and stops as soon as the
  last site needed has been read. `positions` (a role: "image", "text", "all", or any position
  spec) picks the tokens.

Under torchrun a store or model source splits a chunk (`chunk_part`): each rank reads a contiguous
share of its shards or runs a contiguous share of its forwards, and the trainer all-gathers the
shares in rank order, which is the whole chunk, row for row.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load_file

from vlmscope.errors import InputError, SiteError
from vlmscope.model.interventions import hook
from vlmscope.model.positions import PositionSpec
from vlmscope.model.store import ActivationStore, _default_collate
from vlmscope.scale.distributed import part as share


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any printable parts, the same in every process (unlike hash())."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def generator(*parts: Any) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(*parts))


class Source(Protocol):
    sites: tuple[str, ...]

    def n_chunks(self) -> int: ...
    def chunk(self, epoch: int, index: int, seed: int) -> dict[str, torch.Tensor]: ...
    def describe(self) -> dict: ...


@dataclass(frozen=True)
class TensorSource:
    """Rows in memory, {site: (rows, d)}; chunk i of an epoch is a slice of that epoch's permutation."""

    tensors: Mapping[str, torch.Tensor]
    chunk_rows: int = 65536

    @property
    def sites(self) -> tuple[str, ...]:
        return tuple(self.tensors)

    def n_chunks(self) -> int:
        return max(math.ceil(len(t) / self.chunk_rows) for t in self.tensors.values())

    def chunk(self, epoch: int, index: int, seed: int) -> dict[str, torch.Tensor]:
        out = {}
        for site, t in self.tensors.items():
            perm = torch.randperm(len(t), generator=generator(seed, "rows", site, epoch))
            out[site] = t[perm[index * self.chunk_rows:(index + 1) * self.chunk_rows]].float()
        return out

    def describe(self) -> dict:
        return {"kind": "tensors", "chunk_rows": self.chunk_rows,
                "shapes": {s: list(t.shape) for s, t in self.tensors.items()},
                "checksum": {s: float(t.double().sum()) for s, t in self.tensors.items()}}


@dataclass(frozen=True)
class StoreSource:
    """An activation store's shards; each chunk concatenates `buffer_shards` of them."""

    store: ActivationStore
    sites: tuple[str, ...]
    buffer_shards: int = 8
    name: str = ""  # the model's name, recorded in the SAEs' configs

    def __post_init__(self):
        if not isinstance(self.store, ActivationStore):
            object.__setattr__(self, "store", ActivationStore(Path(self.store)))
        object.__setattr__(self, "sites", tuple(self.sites))
        for s in self.sites:
            self.store._check(s)
        if not self.store.shard_files():
            raise InputError(f"the activation store at {self.store.path} has no shards yet")

    def n_chunks(self) -> int:
        return math.ceil(len(self.store.shard_files()) / self.buffer_shards)

    def chunk(self, epoch: int, index: int, seed: int) -> dict[str, torch.Tensor]:
        return self.chunk_part(epoch, index, seed, 0, 1)

    def chunk_part(self, epoch: int, index: int, seed: int, part: int, parts: int) -> dict[str, torch.Tensor]:
        """Share `part` of `parts` of the chunk: a contiguous run of its shards (maybe none)."""
        files = self.store.shard_files()
        order = torch.randperm(len(files), generator=generator(seed, "shards", epoch)).tolist()
        n = self.buffer_shards
        mine = order[index * n:(index + 1) * n]
        picked = [load_file(str(files[mine[j]])) for j in share(len(mine), part, parts)]
        return {s: torch.cat([d[s] for d in picked]).float() if picked else torch.zeros(0) for s in self.sites}

    def describe(self) -> dict:
        m = self.store.manifest
        return {"kind": "store", "path": str(self.store.path), "config": m["config"],
                "positions": m["config"]["positions"], "shards": len(m["shards"]),
                "buffer_shards": self.buffer_shards} | ({"name": self.name} if self.name else {})


class _Stop(Exception):
    """Raised inside the forward once every site needed has been read."""


def site_rows(vlm, inputs: Mapping[str, Any], sites: Sequence[str], positions: PositionSpec = "image",
              stop_early: bool = True) -> dict[str, torch.Tensor]:
    """One forward of `vlm` on `inputs`: each site's rows (n, d) at the selected positions."""
    for s in sites:
        check_site(vlm, s)
    got: dict[str, torch.Tensor] = {}
    need = len(set(sites))

    def grab(t: torch.Tensor, *, site: str):
        got[site] = t.detach()
        if stop_early and len(got) == need:
            raise _Stop
        return None

    try:
        vlm.run(inputs, [hook(s, grab) for s in sites])
    except _Stop:
        pass
    pos = vlm.positions(inputs)
    out = {}
    for s in sites:
        t = got[s]
        mask = pos[vlm.site(s).stream].select(positions)
        if tuple(mask.shape) != tuple(t.shape[:2]):
            raise InputError(f"positions for {s!r} cover {tuple(mask.shape)} (batch, pos) but the activation "
                             f"has {tuple(t.shape[:2])}")
        out[s] = t[mask.to(t.device)].float().cpu()  # (rows, d)
    return out


def check_site(vlm, site: str) -> None:
    spec = vlm.site(site)
    if spec.layout != "batch pos d" or spec.hook == "model_output":
        valid = [s for s in vlm.sites() if vlm.site(s).layout == "batch pos d"][:6]
        raise SiteError(f"an SAE reads a (batch, pos, d) site; {site!r} has layout {spec.layout!r}. "
                        f"Valid sites include {', '.join(valid)}, ...")


@dataclass(frozen=True)
class ModelSource:
    """Activations streamed from `vlm` over `dataset` (items collated into model inputs)."""

    vlm: Any
    dataset: Sequence[Any]
    sites: tuple[str, ...]
    positions: PositionSpec = "image"
    collate: Callable[[Sequence[Any]], dict[str, Any]] | None = None
    batch_size: int = 8
    chunk_examples: int = 64
    stop_early: bool = True
    name: str = ""  # the model's name, recorded in the SAEs' configs

    def __post_init__(self):
        object.__setattr__(self, "sites", tuple(self.sites))
        for s in self.sites:
            check_site(self.vlm, s)

    def n_chunks(self) -> int:
        return math.ceil(len(self.dataset) / self.chunk_examples)

    def chunk(self, epoch: int, index: int, seed: int) -> dict[str, torch.Tensor]:
        return self.chunk_part(epoch, index, seed, 0, 1)

    def chunk_part(self, epoch: int, index: int, seed: int, part: int, parts: int) -> dict[str, torch.Tensor]:
        """Share `part` of `parts` of the chunk: a contiguous run of its forwards (maybe none)."""
        order = torch.randperm(len(self.dataset), generator=generator(seed, "examples", epoch))
        ids = order[index * self.chunk_examples:(index + 1) * self.chunk_examples].tolist()
        collate = self.collate or (lambda exs: _default_collate(self.vlm, exs))
        got: dict[str, list[torch.Tensor]] = {s: [] for s in self.sites}
        starts = range(0, len(ids), self.batch_size)
        for j in share(len(starts), part, parts):
            b = starts[j]
            inputs = collate([self.dataset[i] for i in ids[b:b + self.batch_size]])
            for s, rows in site_rows(self.vlm, inputs, self.sites, self.positions, self.stop_early).items():
                got[s].append(rows)
        return {s: torch.cat(v) if v else torch.zeros(0) for s, v in got.items()}

    def describe(self) -> dict:
        model = self.vlm.model
        name = self.name or getattr(model.config, "_name_or_path", "") or type(model).__name__
        return {"kind": "model", "name": name, "n_examples": len(self.dataset),
                "positions": repr(self.positions), "batch_size": self.batch_size,
                "chunk_examples": self.chunk_examples}
