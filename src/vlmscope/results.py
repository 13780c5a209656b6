"""Typed results: frozen dataclasses of tensors and metadata that save, load and tabulate.

A result folder holds `result.json` (kind, format version, metadata) and `result.safetensors`
(its tensors). Loading is strict: an unknown kind or a missing/extra field is an error.
Plots live in `vlmscope.report` and are imported lazily by `.plot()`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import load_file, save_file

FORMAT = 1
_KINDS: dict[str, type[Result]] = {}


def _encode(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_encode(x) for x in v]
    if isinstance(v, dict):
        return {k: _encode(x) for k, x in v.items()}
    return v


# modules that define result kinds, imported when a folder holds a kind not yet registered (results
# register themselves on import; a fresh process that only loads must not need to know where)
RESULT_MODULES = (
    "vlmscope.methods.probing", "vlmscope.methods.lens", "vlmscope.methods.patching", "vlmscope.methods.knockout",
    "vlmscope.methods.path_patching", "vlmscope.methods.ablation", "vlmscope.methods.similarity",
    "vlmscope.methods.sae.evaluate", "vlmscope.methods.sae.features", "vlmscope.methods.sae.restarts",
    "vlmscope.methods.explain",
    "vlmscope.experiments.accuracy", "vlmscope.experiments.across", "vlmscope.experiments.micro_macro",
    "vlmscope.experiments.spec", "vlmscope.scale.plan",
)


def _import_result_modules() -> None:
    import importlib

    for name in RESULT_MODULES:
        importlib.import_module(name)


@dataclasses.dataclass(frozen=True)
class Result:
    """Base of every result. Subclasses set `kind` and declare their fields."""

    kind: ClassVar[str] = "result"

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if "kind" in cls.__dict__:
            _KINDS[cls.kind] = cls

    def _split(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors, meta = {}, {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                tensors[f.name] = v.detach().cpu().contiguous()
            elif isinstance(v, dict) and v and all(isinstance(x, torch.Tensor) for x in v.values()):
                tensors.update({f"{f.name}/{k}": x.detach().cpu().contiguous() for k, x in v.items()})
                meta[f.name] = {"__tensor_dict__": list(v)}
            else:
                meta[f.name] = _encode(v)
        return tensors, meta

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors, meta = self._split()
        save_file(tensors, str(path / "result.safetensors"))
        doc = {"kind": self.kind, "format": FORMAT, "fields": meta}
        (path / "result.json").write_text(json.dumps(doc, indent=1, default=str))
        return path

    @classmethod
    def load(cls, path: str | Path) -> Result:
        path = Path(path)
        doc = json.loads((path / "result.json").read_text())
        kind = doc.get("kind")
        if kind not in _KINDS:
            _import_result_modules()
        if doc.get("format") != FORMAT or kind not in _KINDS:
            raise ValueError(f"{path}: unknown result kind {kind!r} or format {doc.get('format')!r}; "
                             f"known kinds: {', '.join(sorted(_KINDS))} (format {FORMAT})")
        target = _KINDS[kind]
        if cls is not Result and not issubclass(target, cls):
            raise ValueError(f"{path} holds a {kind!r} result, not {cls.kind!r}")
        raw = load_file(str(path / "result.safetensors"))
        names = {f.name: f for f in dataclasses.fields(target)}
        values: dict[str, Any] = {}
        for name, v in doc["fields"].items():
            if isinstance(v, dict) and "__tensor_dict__" in v:
                values[name] = {k: raw[f"{name}/{k}"] for k in v["__tensor_dict__"]}
            else:
                values[name] = v
        values.update({k: t for k, t in raw.items() if "/" not in k})
        unknown, missing = set(values) - set(names), set(names) - set(values)
        if unknown or missing:
            raise ValueError(f"{path}: fields {sorted(unknown)} are unknown and {sorted(missing)} missing for {kind!r}")
        for name, f in names.items():
            if isinstance(values[name], list) and "tuple" in str(f.type):
                values[name] = tuple(values[name])
        return target(**values)

    def __repr__(self) -> str:
        shapes = ", ".join(f"{f.name}={tuple(getattr(self, f.name).shape)}" for f in dataclasses.fields(self)
                           if isinstance(getattr(self, f.name), torch.Tensor))
        return f"{type(self).__name__}({shapes})"

    def plot(self, **kwargs):
        """A matplotlib figure of this result (never shown; save it or display it yourself)."""
        from vlmscope.report import plots

        return plots.plot(self, **kwargs)


def long_frame(values: torch.Tensor, axes: tuple[str, ...], coords: dict[str, list] | None = None,
               name: str = "value"):
    """A tidy DataFrame with one row per element of `values` and a column per axis."""
    import itertools

    import pandas as pd

    coords = coords or {}
    labels = [coords.get(a, list(range(n))) for a, n in zip(axes, values.shape)]
    rows = list(itertools.product(*labels))
    df = pd.DataFrame(rows, columns=list(axes))
    df[name] = values.detach().cpu().flatten().tolist()
    return df
