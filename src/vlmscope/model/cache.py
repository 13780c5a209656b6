"""The activation cache: a thin, saveable mapping from site name to tensor.

It holds no reference to the model. Analyses (lens, attributions, decompositions) are free
functions that take a cache.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from vlmscope.errors import SiteError, nearest
from vlmscope.model.sites import filter_names, is_pattern

FORMAT = 1


class Cache(Mapping[str, torch.Tensor]):
    """site -> tensor (batch, pos, ...), plus optional gradients and each site's axis names.

    `kept[stream]` is a (batch, k) index tensor when only some positions were stored: then the
    cached tensors of that stream hold those k positions, in that order.
    """

    def __init__(
        self,
        acts: dict[str, torch.Tensor],
        grads: dict[str, torch.Tensor] | None = None,
        layouts: dict[str, str] | None = None,
        streams: dict[str, str] | None = None,
        kept: dict[str, torch.Tensor] | None = None,
    ):
        self._acts = dict(acts)
        self.grads: dict[str, torch.Tensor] = dict(grads or {})
        self.layouts = dict(layouts or {})
        self.streams = dict(streams or {})
        self.kept = dict(kept or {})

    def __getitem__(self, site: str) -> torch.Tensor:
        try:
            return self._acts[site]
        except KeyError:
            hint = " (use cache.stack(pattern) for globs)" if is_pattern(site) else ""
            raise SiteError(
                f"site {site!r} is not in this cache{hint}; cached sites nearest to it: "
                f"{', '.join(nearest(site, self._acts)) or '(cache is empty)'}"
            ) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._acts)

    def __len__(self) -> int:
        return len(self._acts)

    def __repr__(self) -> str:
        nbytes = sum(t.numel() * t.element_size() for t in self._acts.values())
        return f"Cache({len(self)} sites, {nbytes / 2**20:.1f} MiB{', with grads' if self.grads else ''})"

    def sites(self, pattern: str | None = None) -> list[str]:
        return filter_names(self._acts, pattern)

    def stack(self, pattern: str) -> torch.Tensor:
        """The cached sites matching `pattern`, stacked on a new leading axis (in model order)."""
        names = self.sites(pattern)
        if not names:
            raise SiteError(f"no cached site matches {pattern!r}; cached: {', '.join(list(self)[:8])}...")
        return torch.stack([self._acts[n] for n in names])

    def to(self, device=None, dtype=None) -> Cache:
        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=dtype if t.is_floating_point() else None)

        return Cache({k: move(v) for k, v in self._acts.items()}, {k: move(v) for k, v in self.grads.items()},
                     self.layouts, self.streams, self.kept)

    def save(self, path: str | Path) -> Path:
        """Write `cache.safetensors` and `cache.json` into the folder `path`."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {f"act/{k}": v.contiguous() for k, v in self._acts.items()}
        tensors.update({f"grad/{k}": v.contiguous() for k, v in self.grads.items()})
        tensors.update({f"kept/{k}": v.contiguous() for k, v in self.kept.items()})
        save_file(tensors, str(path / "cache.safetensors"))
        meta = {"kind": "cache", "format": FORMAT, "layouts": self.layouts, "streams": self.streams}
        (path / "cache.json").write_text(json.dumps(meta, indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path) -> Cache:
        path = Path(path)
        meta = json.loads((path / "cache.json").read_text())
        if meta.get("kind") != "cache" or meta.get("format") != FORMAT:
            raise ValueError(f"{path} is not a vlmscope cache of format {FORMAT} (found {meta.get('kind')!r}, "
                             f"format {meta.get('format')!r})")
        raw = load_file(str(path / "cache.safetensors"))
        parts: dict[str, dict[str, torch.Tensor]] = {"act": {}, "grad": {}, "kept": {}}
        for key, t in raw.items():
            kind, name = key.split("/", 1)
            parts[kind][name] = t
        order = list(meta["layouts"])
        acts = {k: parts["act"][k] for k in order}
        return cls(acts, parts["grad"], meta["layouts"], meta["streams"], parts["kept"])
