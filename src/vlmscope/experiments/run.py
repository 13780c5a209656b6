"""Run an `Experiment` on a model: each method's result, figure and scores in its own folder."""

from __future__ import annotations

import json
import time
from pathlib import Path

from vlmscope.errors import InputError
from vlmscope.experiments import grounded
from vlmscope.experiments.accuracy import task_accuracy
from vlmscope.experiments.scene_probe import scene_trace
from vlmscope.experiments.spec import Experiment, MethodSpec, UserData


def user_inputs(vlm, data: UserData) -> dict:
    """Model inputs for the user's images and questions, through the model's processor."""
    import numpy as np
    from PIL import Image

    images = [np.asarray(Image.open(p).convert("RGB")) for p in data.images]
    return vlm.prepare(images, list(data.questions))


def _own_answer(vlm, inputs):
    """Metric: the probability of the answer the model itself gives on the unchanged inputs."""
    from vlmscope.methods.metrics import AnswerProb, last_logits

    return AnswerProb(last_logits(vlm, vlm.run(inputs), inputs).argmax(-1).cpu(), name="p(own answer)")


def run_on_user_data(vlm, spec: MethodSpec, data: UserData, seed: int) -> tuple[object, dict]:
    """A method on the user's images and questions: no ground truth, so the scores describe the
    model (where the image matters, what layers predict) rather than check the method."""
    import torch

    from vlmscope.methods.corruptions import gaussian_noise
    from vlmscope.methods.knockout import knockout_sweep
    from vlmscope.methods.lens import logit_lens
    from vlmscope.methods.patching import patch_sweep
    from vlmscope.methods.probing import probe_sites

    if spec.kind in ("scene", "accuracy", "textspan"):
        raise InputError(f"method kind {spec.kind!r} needs the shapes world's ground truth; on your own data use "
                         "probe, lens, patch or knockout")
    x = user_inputs(vlm, data)
    if spec.kind == "lens":
        result = logit_lens(vlm, x)
        last = vlm.positions(x)["lm"].last()
        top = result.top_ids[:, torch.arange(len(last)), last, 0]  # (layer, example)
        return result, {f"layer {l}: last-token top word of example 0": result.token(int(top[i, 0]))
                        for i, l in enumerate(result.layers)}
    if spec.kind == "knockout":
        result = knockout_sweep(vlm, x, _own_answer(vlm, x), window=spec.options["window"])
        return result, {"strongest window start": result.strongest()}
    if spec.kind == "patch":
        noise = gaussian_noise(vlm, x, seed=seed)
        sites = "lm.blocks.*.resid_post" if spec.options["sites"] == "auto" else spec.options["sites"]
        result = patch_sweep(vlm, x, x, _own_answer(vlm, x), sites=sites, positions="roles",
                             corrupt_interventions=[noise])
        return result, {f"restores at {c}: {g}": float(result.effect[i, j]) for i, c in enumerate(result.components)
                        for j, g in enumerate(result.groups) if g == "image"}
    if not data.labels:
        raise InputError("a probe on your own data needs [data] labels (one class id per image)")
    result = probe_sites(vlm, x, torch.tensor(data.labels), vlm.sites("lm.blocks.*.resid_post"), target="label")
    return result, {f"probe at {n}": float(v) for n, v in zip(result.names, result.score)}


def run_method(vlm, spec: MethodSpec, seed: int, out: Path | None = None, data: UserData | None = None
               ) -> tuple[object, dict]:
    """One method on zoo data (or on the user's data): (result, scores); saved under out/<name>."""
    o = spec.options
    if data is not None:
        result, scores = run_on_user_data(vlm, spec, data, seed)
    elif spec.kind == "probe":
        result, _, scores = grounded.where_is_it_lost(vlm, o["attribute"], n=o["n"], seed=seed)
    elif spec.kind == "scene":
        result, scores = scene_trace(vlm, o["attribute"], n=o["n"], seed=seed)
    elif spec.kind == "accuracy":
        result, scores = task_accuracy(vlm, n=o["n"], seed=seed, name=getattr(vlm, "name", None))
    elif spec.kind == "lens":
        result, curves = grounded.lens_word_accuracy(vlm, n=o["n"], seed=seed)
        scores = {k: max(v) for k, v in curves.items()}
    elif spec.kind == "patch":
        sites = None if o["sites"] == "auto" else o["sites"]
        result, scores = grounded.sip_localisation(vlm, n_pairs=o["n"], seed=seed, sites=sites)
    elif spec.kind == "textspan":
        from vlmscope.methods.explain.zoo_textspan import zoo_textspan

        if not vlm.adapter.dual_encoder:
            raise InputError("method kind 'textspan' reads the heads of a dual encoder's image tower (e.g. "
                             f"shapes-clip); this model is {type(vlm.model).__name__}")
        result, _, scores = zoo_textspan(vlm, n=o["n"], seed=seed)
    else:
        result, _, scores = grounded.image_flow_knockout(vlm, n=o["n"], seed=seed, window=o["window"])
    if out is not None:
        folder = out / spec.name
        result.save(folder)
        result.plot().savefig(folder / "figure.png", dpi=110)
        (folder / "scores.json").write_text(json.dumps(scores, indent=1, default=str))
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
        _, scores = run_method(vlm, spec, exp.seed, out, data=exp.data)
        manifest["stages"].append({"key": spec.name, "title": spec.name, "seconds": round(time.perf_counter() - t0, 1),
                                   "scores": scores})
    manifest["seconds"] = round(time.perf_counter() - t_all, 1)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, default=float))
    build_report(out)
    return out
