"""Planning a job's memory before running it: the model built on the `meta` device, the job run on it.

`plan_memory("llava-hf/llava-1.5-7b-hf's folder", "atp", batch_size=8, dtype=torch.bfloat16)` builds
the model from its config with no weights, runs the very job the method would run (jobs.py) on meta
tensors — exact shapes, no memory, seconds for a 7B model — and counts every tensor it makes with
the same accounting that measures a real run (measure.py). So the plan holds the weights (exact),
the activations of each forward, the cache kept, attention matrices where the implementation makes
them (eager, or a pattern site read), what a backward saves and the gradients it makes, a sweep's
patched copies, an SAE with its Adam state: whatever the job really holds at its peak.

What meta cannot know: values computed from weights (they read as zeros, see shadow.py), allocator
overhead and fragmentation (add ~10-20% on an accelerator), and kernels' private workspaces
(sdpa is planned as a fused kernel: no T x T matrix).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlmscope.errors import InputError
from vlmscope.model.adapters.examples import example_inputs
from vlmscope.results import Result
from vlmscope.scale import jobs
from vlmscope.scale.measure import CATEGORIES, peak_memory
from vlmscope.scale.shadow import ShadowMeta, meta_inputs

FIXED = ("weights", "sae training")  # components that do not grow with the batch
GiB = 2**30


@dataclass(frozen=True, repr=False)
class MemoryPlan(Result):
    """Bytes a job holds at its peak, by component (weights, inputs, activations, cache & outputs,
    attention, saved for backward, gradients, sae rows, sae training); `phases` holds each phase's
    own peak likewise (forward, backward, sae), which `suggest_batch_size` scales."""

    kind = "memory_plan"
    model: str
    method: str
    batch_size: int
    dtype: str
    sites: tuple[str, ...]
    components: dict[str, int]
    phases: dict[str, dict[str, int]]

    @property
    def peak(self) -> int:
        return sum(self.components.values())

    def suggest_batch_size(self, budget_bytes: int) -> int:
        """The largest batch whose every phase fits in `budget_bytes`, taking the components not in
        FIXED to grow in proportion to the batch (activations do); 0 when the fixed part alone does
        not fit."""
        best = None
        for parts in self.phases.values():
            fixed = sum(v for k, v in parts.items() if k in FIXED)
            per_row = sum(v for k, v in parts.items() if k not in FIXED) / self.batch_size
            if fixed > budget_bytes:
                return 0
            fits = int((budget_bytes - fixed) // per_row) if per_row > 0 else 2**31
            best = fits if best is None else min(best, fits)
        return best if best is not None else 0

    def binding_phase(self) -> str:
        return max(self.phases, key=lambda p: sum(self.phases[p].values()))

    def to_dataframe(self):
        import pandas as pd

        rows = [{"component": k, "bytes": v, "GiB": v / GiB, "share": v / max(self.peak, 1),
                 "scales_with_batch": k not in FIXED} for k, v in self.components.items()]
        return pd.DataFrame(rows)

    def __repr__(self) -> str:
        return (f"MemoryPlan({self.model}, {self.method}, batch {self.batch_size}, {self.dtype}: "
                f"{size(self.peak)})")

    def __str__(self) -> str:
        lines = [f"{self.method} on {self.model}, batch {self.batch_size}, {self.dtype}, "
                 f"{len(self.sites)} site(s)"]
        for k, v in self.components.items():
            lines.append(f"  {k:20s} {size(v):>11s}  {100 * v / max(self.peak, 1):5.1f}%"
                         f"{'  (fixed)' if k in FIXED else ''}")
        lines.append(f"  {'peak':20s} {size(self.peak):>11s}  (during the {self.binding_phase()})")
        return "\n".join(lines)


def size(n: float) -> str:
    """Bytes in the largest binary unit that keeps the number at least 1 ("3.21 GiB")."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def meta_model(model: Any, dtype: torch.dtype | None = None) -> nn.Module:
    """The model with no weights, on the meta device: from a loaded model (its config), a VLM, a
    checkpoint folder or config.json, a transformers config, or "zoo:NAME"."""
    import transformers

    from vlmscope.model.vlm import VLM

    if isinstance(model, VLM):
        model = model.model
    if isinstance(model, nn.Module):
        cls, config = type(model), copy.deepcopy(model.config)
    else:
        config = model if isinstance(model, transformers.PretrainedConfig) else _config(model)
        archs = getattr(config, "architectures", None) or []
        cls = next((getattr(transformers, a) for a in archs if hasattr(transformers, a)), None)
        if cls is None:
            raise InputError(f"the config names architectures {archs}, none of which transformers provides")
    with torch.device("meta"):
        built = cls(config)
    if dtype is not None:
        built = built.to(dtype)
    return built.eval()


def _config(source: str | Path):
    import transformers

    name = str(source)
    if name.startswith("zoo:"):
        from vlmscope.zoo.registry import model_dir

        name = str(model_dir(name[4:]))
    path = Path(name)
    if path.is_file():  # a config.json
        doc = json.loads(path.read_text())
        return transformers.AutoConfig.for_model(doc.pop("model_type"), **doc)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} is neither a checkpoint folder with config.json, a config.json, nor "
                                "'zoo:NAME'")
    return transformers.AutoConfig.from_pretrained(path, local_files_only=True)


def plan_memory(model: Any, method: str = "cache", batch_size: int = 1, *, inputs: dict | None = None,
                image_size: int | None = None, text_len: int = 16, sites: str | list[str] | None = None,
                dtype: torch.dtype | None = None, job: jobs.Job | None = None) -> MemoryPlan:
    """The memory `method` ("cache", "patch", "atp", "sae") needs on `batch_size` examples (patch:
    patched copies of one pair per forward), planned on the meta device (see the module docstring).
    inputs: one batch as the processor makes it (then patch sweeps `job.sweep_batch` rows per
    forward), else example inputs of `image_size` px and `text_len` tokens. sites: names or globs
    (default: every LM block's resid_post). dtype: of the weights (default: the config's). job:
    every other option of the method (jobs.Job). `MemoryPlan.batch_size` is rows per forward."""
    from vlmscope.model.vlm import VLM

    job = job or jobs.Job(method, tuple([sites] if isinstance(sites, str) else sites) if sites else None)
    vlm = VLM(meta_model(model, dtype))
    if job.method == "patch" and inputs is None:  # one pair, `batch_size` patched copies per forward
        job = replace(job, sweep_batch=batch_size)
        batch_size = 1
    x = inputs if inputs is not None else example_inputs(vlm, batch_size, image_size, text_len)
    x = meta_inputs(x)
    batch = job.sweep_batch if job.method == "patch" else _rows(x, batch_size)
    run = jobs.sae_on_meta if job.method == "sae" else jobs.JOBS[job.method]
    with ShadowMeta(), peak_memory(vlm.model, x) as m:
        # a sweep's forwards repeat themselves: the two cached runs and two (the second holds the first's
        # output while it runs) show its peak
        stop = _stop_after(vlm.model, 4) if job.method == "patch" else None
        try:
            kept = run(vlm, x, job, m.tracker)  # noqa: F841  (alive to the end: what the job returns is kept)
        except _Enough:
            pass
        finally:
            if stop is not None:
                stop.remove()
    measured = m.result
    dtype_name = str(next(vlm.model.parameters()).dtype).removeprefix("torch.")
    return MemoryPlan(
        model=type(vlm.model).__name__, method=job.method, batch_size=batch, dtype=dtype_name,
        sites=tuple(job.site_names(vlm)), components=_ordered({**measured.held, **measured.at_peak}),
        phases={p: _ordered({**measured.held, **parts}) for p, parts in measured.phases.items()},
    )


def _rows(inputs: dict, default: int) -> int:
    for key in ("input_ids", "pixel_values"):
        if isinstance(inputs.get(key), torch.Tensor):
            return int(inputs[key].shape[0])
    return default


class _Enough(Exception):
    """Raised out of a job once what follows would only repeat the memory already seen."""


def _stop_after(model: nn.Module, n: int):
    count = [0]

    def hook(module, args, out):
        count[0] += 1
        if count[0] >= n:
            raise _Enough

    return model.register_forward_hook(hook)


def _ordered(parts: dict[str, int]) -> dict[str, int]:
    order = list(CATEGORIES) + sorted(set(parts) - set(CATEGORIES))
    return {k: int(parts[k]) for k in order if parts.get(k)}
