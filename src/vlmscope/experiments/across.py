"""The survey's future directions as first-class runs: one experiment across many models, and
across a model's training checkpoints with phase changes found and aligned.

Results from different architectures share axes by part (vision / connector / lm) and relative
depth (index within the part / number of sites in it).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from vlmscope.errors import InputError
from vlmscope.experiments.run import run_method
from vlmscope.experiments.spec import Experiment
from vlmscope.results import Result

JUMP = 0.2  # a phase change: a metric rises or falls by at least this much between two checkpoints


@dataclass(frozen=True, repr=False)
class Comparison(Result):
    """Tidy records (one per model x method x site/score) and the differences worth stating."""

    kind = "comparison"
    models: tuple[str, ...]
    records: tuple[dict, ...]
    statements: tuple[str, ...]

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame(list(self.records))


def _trace_records(model: str, method: str, trace) -> list[dict]:
    out = []
    parts = list(trace.parts)
    for i, (site, part) in enumerate(zip(trace.sites, parts)):
        idx = [j for j, p in enumerate(parts) if p == part]
        depth = idx.index(i) / max(1, len(idx) - 1) if len(idx) > 1 else 1.0
        out.append({"model": model, "method": method, "site": site, "part": part, "depth": depth,
                    "metric": f"{trace.target} decodability", "value": float(trace.score[i])})
    return out


def compare(models: Sequence, experiment: Experiment, threshold: float = 0.1) -> Comparison:
    """Run `experiment` on each model (zoo names, folders or VLMs) and align the results."""
    from vlmscope.cli import _load

    records: list[dict] = []
    names = []
    for model in models:
        vlm = model if hasattr(model, "run_with_cache") else _load(str(model))[0]
        name = model if isinstance(model, str) else type(vlm.model).__name__
        names.append(name)
        for spec in experiment.methods:
            result, scores = run_method(vlm, spec, experiment.seed)
            if spec.traces:
                records += _trace_records(name, spec.name, result)
            records += [{"model": name, "method": spec.name, "site": None, "part": None, "depth": None,
                         "metric": k, "value": float(v)} for k, v in scores.items() if isinstance(v, (int, float))]
    return Comparison(tuple(names), tuple(records), tuple(_statements(records, names, threshold)))


def _statements(records: list[dict], models: list[str], threshold: float) -> list[str]:
    """Differences between models in decodability per part (mean over the part's sites)."""
    out = []
    metrics = sorted({r["metric"] for r in records if r["part"]})
    for metric in metrics:
        for part in ("vision", "connector", "lm"):
            vals = {}
            for m in models:
                xs = [r["value"] for r in records if r["model"] == m and r["metric"] == metric and r["part"] == part]
                if xs:
                    vals[m] = sum(xs) / len(xs)
            if len(vals) >= 2 and max(vals.values()) - min(vals.values()) >= threshold:
                hi, lo = max(vals, key=vals.get), min(vals, key=vals.get)
                out.append(f"{metric} at the {part}: {hi} {vals[hi]:.2f} vs {lo} {vals[lo]:.2f}")
    # behaviour: task accuracy per family and accuracy under knockout (scores without a part)
    scores = sorted({r["metric"] for r in records if not r["part"] and r["metric"].startswith("accuracy")})
    for metric in scores:
        vals = {r["model"]: r["value"] for r in records if r["metric"] == metric and not r["part"]}
        if len(vals) >= 2 and max(vals.values()) - min(vals.values()) >= threshold:
            hi, lo = max(vals, key=vals.get), min(vals, key=vals.get)
            out.append(f"{metric}: {hi} {vals[hi]:.2f} vs {lo} {vals[lo]:.2f}")
    return out


@dataclass(frozen=True, repr=False)
class TrainingCurves(Result):
    """Metrics against training step, and the phase changes found in them."""

    kind = "over_training"
    model: str
    steps: tuple[int, ...]
    metrics: tuple[str, ...]
    values: torch.Tensor  # (metric, step)
    changes: tuple[dict, ...]  # {"metric", "step", "before", "after"}: jumps of at least JUMP
    threshold: float

    def to_dataframe(self):
        from vlmscope.results import long_frame

        return long_frame(self.values, ("metric", "step"), {"metric": list(self.metrics), "step": list(self.steps)})

    def timeline(self) -> list[str]:
        """The phase changes in order of step, one line each."""
        return [f"step {c['step']}: {c['metric']} {c['before']:.2f} -> {c['after']:.2f}"
                for c in sorted(self.changes, key=lambda c: c["step"])]

    def alignments(self) -> list[str]:
        """Each change in task accuracy lined up with the latest change in an internal metric (probe,
        patching, ...) at or before its step: "what moved inside before the behaviour did"."""
        inner = [c for c in self.changes if not c["metric"].startswith("accuracy ")]
        out = []
        for c in sorted(self.changes, key=lambda c: c["step"]):
            if not c["metric"].startswith("accuracy "):
                continue
            before = [i for i in inner if i["step"] <= c["step"]]
            if before:
                i = max(before, key=lambda i: i["step"])
                out.append(f"{c['metric']} {c['before']:.2f} -> {c['after']:.2f} at step {c['step']}, after "
                           f"{i['metric']} {i['before']:.2f} -> {i['after']:.2f} at step {i['step']}")
        return out


def phase_changes(steps: Sequence[int], values: torch.Tensor, names: Sequence[str], threshold: float = JUMP
                  ) -> list[dict]:
    """Abrupt changes: consecutive checkpoints whose metric differs by >= threshold (absolute).
    The change is placed at the later step. Runs of jumps in one direction are merged."""
    out = []
    for i, name in enumerate(names):
        v = values[i]
        k = 1
        while k < len(steps):
            d = float(v[k] - v[k - 1])
            if abs(d) >= threshold:
                j = k
                while j + 1 < len(steps):
                    step = float(v[j + 1] - v[j])
                    if step * d <= 0 or abs(step) < threshold:
                        break
                    j += 1
                out.append({"metric": name, "step": int(steps[k]), "before": float(v[k - 1]), "after": float(v[j])})
                k = j + 1
            else:
                k += 1
    return out


def checkpoint_step(path: str | Path) -> int:
    """The training step in a checkpoint folder's name (`checkpoint-500`, `step_01200`, `run/800`)."""
    found = re.findall(r"\d+", Path(path).name)
    if not found:
        raise InputError(f"cannot read a training step from the folder name {Path(path).name!r}; name checkpoint "
                         "folders with their step (e.g. checkpoint-500), as transformers' Trainer does")
    return int(found[-1])


def over_training(name: str | Sequence[str | Path], experiment: Experiment, steps: Sequence[int] | None = None,
                  n_eval: int = 300, threshold: float = JUMP) -> TrainingCurves:
    """Task accuracy per question family and the experiment's scores at each checkpoint: a zoo
    model's (`name`, optionally only `steps`), or a list of the user's local checkpoint folders
    (transformers `save_pretrained` folders named with their step, e.g. checkpoint-500)."""
    from vlmscope import zoo
    from vlmscope.model.load import load

    if isinstance(name, str) and name in zoo.names():
        steps = list(steps or zoo.checkpoint_steps(name))
        loaders = {s: (lambda s=s: zoo.load(name, step=s)) for s in steps}
        label = name
    else:
        folders = [name] if isinstance(name, (str, Path)) else list(name)
        by_step = {checkpoint_step(f): f for f in folders}
        steps = sorted(by_step)
        loaders = {s: (lambda f=by_step[s]: load(f)) for s in steps}
        label = str(Path(folders[0]).parent)
    table: dict[str, list[float]] = {}
    for s in steps:
        vlm = loaders[s]()
        row = {f"accuracy {k}": v for k, v in zoo.evaluate(vlm.model, seed=experiment.seed, n=n_eval).items()}
        for spec in experiment.methods:
            result, scores = run_method(vlm, spec, experiment.seed)
            if spec.traces:
                label = ("scene " if spec.kind == "scene" else "") + spec.options["attribute"]
                last_vision = result.sites[result.last_of("vision")]
                for site, score in zip(result.sites, result.score.tolist()):
                    if site == last_vision:
                        row[f"{label} decodable, last vision block"] = score
                    if site == "connector.out":
                        row[f"{label} decodable, connector"] = score
            row.update({f"{spec.name}: {k}": float(v) for k, v in scores.items() if isinstance(v, (int, float))})
        for k in row:
            table.setdefault(k, [float("nan")] * steps.index(s))
        for k in table:
            table[k].append(row.get(k, float("nan")))
    names = list(table)
    values = torch.tensor([table[k] for k in names])
    return TrainingCurves(model=label, steps=tuple(steps), metrics=tuple(names), values=values,
                          changes=tuple(phase_changes(steps, values, names, threshold)), threshold=threshold)
