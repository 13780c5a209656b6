"""The activation store: activations of a dataset streamed to safetensors shards on disk.

Each batch becomes one shard holding, per site, the kept rows flattened (rows, ...) and their
(example, position) index. A manifest lists finished shards; shards and manifest are written
atomically (temporary file + rename), so a killed run resumes at the first missing shard and
the store ends identical to an uninterrupted one.
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

FORMAT = 1
MANIFEST = "manifest.json"


def _atomic_write_bytes(path: Path, write: Callable[[str], None]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(str(tmp))
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _write_manifest(path: Path, manifest: dict) -> None:
    _atomic_write_bytes(path / MANIFEST, lambda p: Path(p).write_text(json.dumps(manifest, indent=1)))


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
                  progress: bool = True) -> ActivationStore:
    """Run `vlm` over `dataset` in batches and store the activations at `sites` under `out_dir`.

    positions: which positions to keep (default every non-pad position). Re-running with the same
    arguments resumes after the last finished shard; different arguments are an error.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = resolve(sites, vlm.site_table)
    n = len(dataset)
    config = {"sites": names, "batch_size": batch_size, "n_examples": n, "positions": repr(positions),
              "dtype": str(dtype) if dtype else None}
    manifest = {"kind": "activation_store", "format": FORMAT, "config": config, "shards": []}
    if (out / MANIFEST).exists():
        old = json.loads((out / MANIFEST).read_text())
        if old.get("config") != config:
            raise InputError(f"{out} holds a store made with other settings {old.get('config')}; "
                             f"asked for {config}. Use another folder or the same settings to resume.")
        manifest = old
    for stale in out.glob("*.tmp"):
        stale.unlink()
    done = len(manifest["shards"])
    starts = list(range(0, n, batch_size))
    collate = collate or (lambda exs: _default_collate(vlm, exs))
    bar = tqdm(total=len(starts), initial=done, desc="caching activations", unit="batch", disable=not progress)
    for k in range(done, len(starts)):
        start, stop = starts[k], min(starts[k] + batch_size, n)
        inputs = collate([dataset[i] for i in range(start, stop)])
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
        fname = f"shard_{k:06d}.safetensors"
        _atomic_write_bytes(out / fname, lambda p, t=tensors: save_file(t, p))
        manifest["shards"].append({"file": fname, "start": start, "stop": stop})
        _write_manifest(out, manifest)
        bar.update(1)
    bar.close()
    return ActivationStore(out)


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
        return bool(m["shards"]) and m["shards"][-1]["stop"] == m["config"]["n_examples"]

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
