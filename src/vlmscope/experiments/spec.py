"""Experiments as files: a TOML description of which methods to run on which model.

    model = "shapes-llava"        # a zoo name or a local checkpoint folder
    seed = 0
    [[method]]
    kind = "probe"                # probe | lens | patch | knockout
    attribute = "colour"
    [[method]]
    kind = "patch"
    sites = "lm.blocks.*.resid_post"

Unknown keys are errors that name the valid ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import tomllib

from vlmscope.errors import InputError

METHOD_KEYS: dict[str, dict[str, Any]] = {
    "probe": {"attribute": "colour", "n": 300},
    "lens": {"n": 60},
    "patch": {"n": 8, "sites": "lm.blocks.*.resid_post"},
    "knockout": {"n": 120, "window": 1},
}


@dataclass(frozen=True)
class MethodSpec:
    kind: str
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        extra = self.options.get("attribute")
        return f"{self.kind}-{extra}" if extra else self.kind


@dataclass(frozen=True)
class Experiment:
    model: str = "shapes-llava"
    seed: int = 0
    methods: tuple[MethodSpec, ...] = ()


def method(kind: str, **options) -> MethodSpec:
    if kind not in METHOD_KEYS:
        raise InputError(f"unknown method kind {kind!r}; valid: {', '.join(METHOD_KEYS)}")
    bad = set(options) - set(METHOD_KEYS[kind])
    if bad:
        raise InputError(f"unknown option(s) {sorted(bad)} for {kind!r}; valid: {sorted(METHOD_KEYS[kind])}")
    return MethodSpec(kind, {**METHOD_KEYS[kind], **options})


def parse(doc: dict[str, Any]) -> Experiment:
    valid = {f.name for f in fields(Experiment)} - {"methods"} | {"method"}
    bad = set(doc) - valid
    if bad:
        raise InputError(f"unknown experiment key(s) {sorted(bad)}; valid: {sorted(valid)}")
    methods = []
    for m in doc.get("method", []):
        m = dict(m)
        if "kind" not in m:
            raise InputError(f"a [[method]] needs kind = one of {', '.join(METHOD_KEYS)}")
        methods.append(method(m.pop("kind"), **m))
    if not methods:
        methods = [method(k) for k in METHOD_KEYS]
    return Experiment(model=doc.get("model", "shapes-llava"), seed=int(doc.get("seed", 0)), methods=tuple(methods))


def load_experiment(path: str | Path) -> Experiment:
    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise InputError(f"{path} is not valid TOML: {e}") from None
    return parse(doc)
