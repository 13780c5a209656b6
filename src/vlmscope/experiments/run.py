"""Run an `Experiment` on a model: each method's result, figure and scores in its own folder."""

from __future__ import annotations

import json
import time
from pathlib import Path

from vlmscope.experiments import grounded
from vlmscope.experiments.spec import Experiment, MethodSpec


def run_method(vlm, spec: MethodSpec, seed: int, out: Path | None = None) -> tuple[object, dict]:
    """One method on zoo data: (result, scores); saved under out/<name> when out is given."""
    o = spec.options
    if spec.kind == "probe":
        result, _, scores = grounded.where_is_it_lost(vlm, o["attribute"], n=o["n"], seed=seed)
    elif spec.kind == "lens":
        result, curves = grounded.lens_word_accuracy(vlm, n=o["n"], seed=seed)
        scores = {k: max(v) for k, v in curves.items()}
    elif spec.kind == "patch":
        result, scores = grounded.sip_localisation(vlm, n_pairs=o["n"], seed=seed, sites=o["sites"])
    else:
        result, _, scores = grounded.image_flow_knockout(vlm, n=o["n"], seed=seed, window=o["window"])
    if out is not None:
        folder = out / spec.name
        result.save(folder)
        result.plot().savefig(folder / "figure.png", dpi=110)
        (folder / "scores.json").write_text(json.dumps(scores, indent=1, default=float))
    return result, scores


def run_experiment(exp: Experiment, out: str | Path, vlm=None, progress: bool = True) -> Path:
    """Run every method of `exp`, save results under `out`, write the manifest and the report."""
    from vlmscope.cli import _load
    from vlmscope.report.html import build_report

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vlm = vlm or _load(exp.model)[0]
    manifest = {"model": exp.model, "seed": exp.seed, "stages": []}
    t_all = time.perf_counter()
    for i, spec in enumerate(exp.methods, 1):
        if progress:
            print(f"[{i}/{len(exp.methods)}] {spec.name} ...", flush=True)
        t0 = time.perf_counter()
        _, scores = run_method(vlm, spec, exp.seed, out)
        manifest["stages"].append({"key": spec.name, "title": spec.name, "seconds": round(time.perf_counter() - t0, 1),
                                   "scores": scores})
    manifest["seconds"] = round(time.perf_counter() - t_all, 1)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, default=float))
    build_report(out)
    return out
