"""The activation store: activations of a dataset streamed to safetensors shards on disk.

Each batch becomes one shard holding, per site, the kept rows flattened (rows, ...) and their
(example, position) index. A manifest lists finished shards; shards and manifest are written
atomically (temporary file + rename), so a killed run resumes at the first missing shard and
the store ends identical to an uninterrupted one.

Under torchrun the W ranks share the batches (rank r runs batches r, r + W, ...): each writes its
own shards (`shard_<batch>.rank<r>.safetensors`) and its own manifest (`manifest.rank<r>.json`), so
no two processes write one file and a rank killed and rerun skips the shards it finished. When
every rank is done, rank 0 merges the manifests into `manifest.json` in example order: the store
reads exactly as a one-process store (the same rows, each example once, the same order).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from vlmscope.errors import InputError, SiteError
from vlmscope.model.positions import PositionSpec
from vlmscope.model.sites import resolve
from vlmscope.scale import distributed
from vlmscope.scale.distributed import Dist

FORMAT = 1
MANIFEST = "manifest.json"
RANK_MANIFESTS = "manifest.rank*.json"  # one per rank while a torchrun job caches


def _atomic_write_bytes(path: Path, write: Callable[[str], None]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(str(tmp))
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _write_manifest(path: Path, manifest: dict, name: str = MANIFEST) -> None:
    _atomic_write_bytes(path / name, lambda p: Path(p).write_text(json.dumps(manifest, indent=1)))


def _default_collate(vlm, examples: Sequence[Any]) -> dict[str, Any]:
    images, texts = [], []
    for ex in examples:
        if isinstance(ex, dict) and "text" in ex:
            images.append(ex.get("image"))
            texts.append(ex["text"])
        elif isinstance(ex, (tuple, list)) and len(ex) == 2:
            images.append(ex[0])
            texts.append(ex[1])
        else:
            raise InputError("dataset items must be (image, text) pairs or {'image', 'text'} dicts; "
                             "pass collate= to build model inputs from other items")
    return vlm.prepare(images if any(i is not None for i in images) else None, texts)


def cache_dataset(vlm, dataset: Sequence[Any], sites, out_dir: str | Path, batch_size: int = 8,
                  positions: PositionSpec = None, dtype: torch.dtype | None = None,
                  collate: Callable[[Sequence[Any]], dict[str, Any]] | None = None,
                  progress: bool = True, dist: Dist | None = None) -> ActivationStore:
    """Run `vlm` over `dataset` in batches and store the activations at `sites` under `out_dir`.

    positions: which positions to keep (default every non-pad position). Re-running with the same
    arguments resumes after the last finished shard; different arguments are an error. Under
    torchrun (`dist`, default: the initialised process group) every rank must call this: rank r
    runs batches r, r + W, ... and the store ends as a one-process run would write it.
    """
    d = dist or distributed.current()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = resolve(sites, vlm.site_table)
    n = len(dataset)
    config = {"sites": names, "batch_size": batch_size, "n_examples": n, "positions": repr(positions),
              "dtype": str(dtype) if dtype else None}
    if d.main:  # before any rank writes: a killed run's half-written files
        for stale in out.glob("*.tmp"):
            stale.unlink()
    distributed.barrier(d)
    done = _finished(out, config)
    own = _own_shards(out, d, done)
    starts = list(range(0, n, batch_size))
    mine = [k for k in range(d.rank, len(starts), d.world_size) if k not in done]
    collate = collate or (lambda exs: _default_collate(vlm, exs))
    total = len(range(d.rank, len(starts), d.world_size))
    bar = tqdm(total=total, initial=total - len(mine), desc="caching activations", unit="batch",
               disable=not (progress and d.main))
    for k in mine:
        start, stop = starts[k], min(starts[k] + batch_size, n)
        inputs = collate([dataset[i] for i in range(start, stop)])
        tensors = _batch_tensors(vlm, inputs, names, positions, dtype, start)
        fname = f"shard_{k:06d}.safetensors" if not d.many else f"shard_{k:06d}.rank{d.rank}.safetensors"
        _atomic_write_bytes(out / fname, lambda p, t=tensors: save_file(t, p))
        own.append({"file": fname, "start": start, "stop": stop} | ({"rank": d.rank} if d.many else {}))
        _write_manifest(out, _manifest(config, own), _manifest_name(d))
        bar.update(1)
    bar.close()
    distributed.barrier(d)
    if d.main and (d.many or any(out.glob(RANK_MANIFESTS))):
        _merge(out, config)
    distributed.barrier(d)
    return ActivationStore(out)


def _batch_tensors(vlm, inputs: dict[str, Any], names: list[str], positions: PositionSpec,
                   dtype: torch.dtype | None, start: int) -> dict[str, torch.Tensor]:
    """One batch's shard: per site the kept rows (rows, ...) and their (example, position) index."""
    _, cache = vlm.run_with_cache(inputs, names)
    pos = vlm.positions(inputs)
    tensors: dict[str, torch.Tensor] = {}
    for site in names:
        spec = vlm.site_table[site]
        t = cache[site]
        if spec.pooled or spec.hook == "model_output":
            rows = torch.arange(t.shape[0])
            p_idx = torch.full_like(rows, -1)
            ex = pos[spec.stream].example[rows] if spec.stream in pos else rows
            flat = t
        else:
            seq = t.transpose(1, 2) if spec.hook == "pattern" else t  # (batch, pos, ...)
            p = pos[spec.stream]
            rows, p_idx = p.select(positions).nonzero(as_tuple=True)
            ex = p.example_of(rows, p_idx)
            flat = seq[rows, p_idx]
        if dtype is not None and flat.is_floating_point():
            flat = flat.to(dtype)
        tensors[site] = flat.contiguous().cpu()
        tensors[f"__index__/{site}"] = torch.stack([ex + start, p_idx], dim=1).cpu()
    return tensors


# --- manifests: one per rank while caching, merged into manifest.json at the end ------------------


def _manifest(config: dict, shards: list[dict]) -> dict:
    return {"kind": "activation_store", "format": FORMAT, "config": config,
            "shards": sorted(shards, key=lambda s: s["start"])}


def _manifest_name(d: Dist) -> str:
    return MANIFEST if not d.many else f"manifest.rank{d.rank}.json"


def _finished(out: Path, config: dict) -> dict[int, dict]:
    """Shards any rank of an earlier run finished, by batch number; other settings are an error."""
    done = {}
    for f in [out / MANIFEST, *sorted(out.glob(RANK_MANIFESTS))]:
        if not f.exists():
            continue
        old = json.loads(f.read_text())
        if old.get("config") != config:
            raise InputError(f"{out} holds a store made with other settings {old.get('config')}; "
                             f"asked for {config}. Use another folder or the same settings to resume.")
        done.update({s["start"] // config["batch_size"]: s for s in old["shards"]})
    return done


def _own_shards(out: Path, d: Dist, done: dict[int, dict]) -> list[dict]:
    """The shards this process's manifest starts from: every finished one for a single process
    (it writes manifest.json), the rank's own earlier ones under torchrun."""
    if not d.many:
        return list(done.values())
    f = out / _manifest_name(d)
    return json.loads(f.read_text())["shards"] if f.exists() else []


def _merge(out: Path, config: dict) -> None:
    """Rank 0, after every rank finished: manifest.json lists every shard in example order."""
    _write_manifest(out, _manifest(config, list(_finished(out, config).values())))
    for f in out.glob(RANK_MANIFESTS):
        f.unlink()


@dataclass(frozen=True)
class ActivationStore:
    """Read side of a store folder."""

    path: Path

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))
        if not (self.path / MANIFEST).exists():
            raise FileNotFoundError(f"{self.path} has no {MANIFEST}: not an activation store")

    @property
    def manifest(self) -> dict:
        return json.loads((self.path / MANIFEST).read_text())

    @property
    def sites(self) -> list[str]:
        return self.manifest["config"]["sites"]

    @property
    def complete(self) -> bool:
        m = self.manifest
        held = sum(s["stop"] - s["start"] for s in m["shards"])
        return bool(m["shards"]) and held == m["config"]["n_examples"]

    def shard_files(self) -> list[Path]:
        return [self.path / s["file"] for s in self.manifest["shards"]]

    def _check(self, site: str) -> None:
        if site not in self.sites:
            raise SiteError(f"site {site!r} is not in this store; it holds {', '.join(self.sites)}")

    def load(self, site: str) -> tuple[torch.Tensor, torch.Tensor]:
        """All rows of `site` and their (example, position) index, concatenated over shards."""
        self._check(site)
        acts, idx = [], []
        for f in self.shard_files():
            d = load_file(str(f))
            acts.append(d[site])
            idx.append(d[f"__index__/{site}"])
        return torch.cat(acts), torch.cat(idx)

    def batches(self, site: str, batch_size: int, shuffle: bool = True, seed: int = 0,
                buffer_shards: int = 8) -> Iterator[torch.Tensor]:
        """Rows of `site` in batches, shuffled within a buffer of shards (deterministic for a seed)."""
        self._check(site)
        g = torch.Generator().manual_seed(seed)
        files = self.shard_files()
        order = torch.randperm(len(files), generator=g).tolist() if shuffle else list(range(len(files)))
        for i in range(0, len(order), buffer_shards):
            rows = torch.cat([load_file(str(files[j]))[site] for j in order[i:i + buffer_shards]])
            perm = torch.randperm(len(rows), generator=g) if shuffle else torch.arange(len(rows))
            for s in range(0, len(rows), batch_size):
                yield rows[perm[s:s + batch_size]]
