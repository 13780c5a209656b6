"""Experiments as files: a TOML description of which methods to run on which model.

    model = "shapes-llava"        # a zoo name or a local checkpoint folder
    seed = 0
    [[method]]
    kind = "probe"                # probe | lens | patch | knockout | scene | accuracy | textspan
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
    "patch": {"n": 8, "sites": "auto"},  # auto: the LM's residual stream, or the tower's if the LM has no patches
    "knockout": {"n": 120, "window": 1},
    "scene": {"attribute": "colour", "n": 600},  # the scene probe: what is at each cell, from all image tokens
    "accuracy": {"n": 600},  # task accuracy per question family
    "textspan": {"n": 300},  # TEXTSPAN heads of a dual encoder, checked by ablation (explain/zoo_textspan.py)
}


@dataclass(frozen=True)
class MethodSpec:
    kind: str
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        extra = self.options.get("attribute")
        return f"{self.kind}-{extra}" if extra else self.kind

    @property
    def traces(self) -> bool:
        """Whether the result is a ConceptTrace (a decodability curve through the parts)."""
        return self.kind in ("probe", "scene")


@dataclass(frozen=True)
class Experiment:
    model: str = "shapes-llava"
    seed: int = 0
    methods: tuple[MethodSpec, ...] = ()
    data: UserData | None = None  # the user's images and questions; None: shapes-world data


@dataclass(frozen=True)
class UserData:
    """Images (paths) and one question each; optional per-example labels for probes."""

    images: tuple[str, ...]
    questions: tuple[str, ...]
    labels: tuple[int, ...] = ()


def method(kind: str, **options) -> MethodSpec:
    if kind not in METHOD_KEYS:
        raise InputError(f"unknown method kind {kind!r}; valid: {', '.join(METHOD_KEYS)}")
    bad = set(options) - set(METHOD_KEYS[kind])
    if bad:
        raise InputError(f"unknown option(s) {sorted(bad)} for {kind!r}; valid: {sorted(METHOD_KEYS[kind])}")
    return MethodSpec(kind, {**METHOD_KEYS[kind], **options})


def _data(doc: dict[str, Any] | None, base: Path) -> UserData | None:
    if doc is None:
        return None
    bad = set(doc) - {"images", "questions", "labels"}
    if bad:
        raise InputError(f"unknown [data] key(s) {sorted(bad)}; valid: images, questions, labels")
    images = tuple(str((base / p).resolve()) for p in doc.get("images", []))
    questions = tuple(doc.get("questions", []))
    if not images or len(images) != len(questions):
        raise InputError(f"[data] needs one question per image; got {len(images)} images and {len(questions)} "
                         "questions")
    missing = [p for p in images if not Path(p).exists()]
    if missing:
        raise InputError(f"[data] images not found: {missing}")
    labels = tuple(int(x) for x in doc.get("labels", []))
    if labels and len(labels) != len(images):
        raise InputError(f"[data] labels: {len(labels)} for {len(images)} images")
    return UserData(images, questions, labels)


def parse(doc: dict[str, Any], base: Path = Path(".")) -> Experiment:
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
    return Experiment(model=doc.get("model", "shapes-llava"), seed=int(doc.get("seed", 0)), methods=tuple(methods),
                      data=_data(doc.get("data"), base))


def load_experiment(path: str | Path) -> Experiment:
    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise InputError(f"{path} is not valid TOML: {e}") from None
    return parse(doc, path.parent)
