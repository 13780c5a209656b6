"""Exact layer x position denoising sweeps: vlmscope against the same sweep written idiomatically
with nnsight and pyvene (and vlmscope's own one-forward-per-patch loop), plus attribution patching.

Every tool must give the same effects (max |difference| is printed; 1e-5 is the bar). One torch
thread; each tool runs the whole sweep once after a warm-up patch. pyvene 0.1.8 on transformers
5.24 runs a LLaVA only on its first call in a process (later calls fail inside LLaVA's vision
feature selection), so its cost is measured on first calls in fresh subprocesses and scaled to the
sweep — the table says so. TransformerLens cannot host a LLaVA built from a local config.

    python benchmarks/patching_sweep.py [--model mid|small|shapes-llava] [--stride 4]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import torch

import vlmscope as vs
from vlmscope import testing as T
from vlmscope.methods.attribution import attribution_patching
from vlmscope.methods.corruptions import replace_tokens
from vlmscope.methods.metrics import logit_diff
from vlmscope.methods.patching import patch_sweep

GOOD, BAD = 5, 9


def build(name: str):
    if name == "small":
        model = T.tiny_llava(image_size=28, patch_size=14, text_hidden=128, text_layers=4)
    elif name == "mid":
        model = T.tiny_llava(image_size=224, patch_size=14, text_hidden=384, text_layers=6)
    else:
        from vlmscope import zoo

        return zoo.load(name)
    return vs.load(model)


def inputs(m, name, corruption="str"):
    """STR: one question token replaced (every earlier position, the image included, is the same in
    both runs). image: another image, same question (SIP on the zoo model; random pixels otherwise)."""
    if name in ("small", "mid"):
        clean = T.llava_inputs(m.model, batch=1, text_len=10)
        if corruption == "image":
            other = T.llava_inputs(m.model, batch=1, text_len=10, seed=1)
            return clean, {**clean, "pixel_values": other["pixel_values"]}, GOOD, BAD
        return clean, replace_tokens(clean, -3, 7), GOOD, BAD
    from vlmscope.zoo import truth

    pair = truth.counterfactual_pairs(0, 1, "sip" if corruption == "image" else "str")[0]
    clean, corrupt = truth.inputs_for(m, [pair.clean]), truth.inputs_for(m, [pair.corrupt])
    good, bad = truth.answer_ids(m, [pair.clean]), truth.answer_ids(m, [pair.corrupt])
    return clean, corrupt, int(good[0]), int(bad[0])


def layers_path(m) -> str:
    return m.site("lm.blocks.0.resid_post").module.rsplit(".", 1)[0]


def naive(m, clean, corrupt, metric, jobs):
    _, cache = m.run_with_cache(clean, "lm.blocks.*.resid_post")
    out = []
    for layer, p in jobs:
        site = f"lm.blocks.{layer}.resid_post"
        logits = m.run(corrupt, [vs.patch(site, cache, positions=[p])]).logits[:, -1]
        out.append(float(metric(logits)))
    return out


def nnsight_sweep(m, clean, corrupt, metric, jobs):
    from nnsight import NNsight

    nm = NNsight(m.model)
    path = layers_path(m).split(".")
    n = m.n_layers("lm")

    def layer(i):
        mod = nm
        for part in path:
            mod = getattr(mod, part)
        return mod[i]

    acts = []
    with torch.no_grad():
        for i in range(n):
            with nm.trace(clean["input_ids"], attention_mask=clean["attention_mask"],
                          pixel_values=clean["pixel_values"]):
                h = layer(i).output.save()
            acts.append(h)
        out = []
        for li, p in jobs:
            with nm.trace(corrupt["input_ids"], attention_mask=corrupt["attention_mask"],
                          pixel_values=corrupt["pixel_values"]):
                layer(li).output[:, p] = acts[li][:, p]
                logits = nm.output.logits.save()
            out.append(float(metric(logits[:, -1])))
    return out


PYVENE_ONE = r"""
import sys, time, torch, pyvene as pv
sys.path.insert(0, "benchmarks")
from patching_sweep import build, inputs, layers_path
torch.set_num_threads(1)
name, layer, p, corruption = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
m = build(name); clean, corrupt, good, bad = inputs(m, name, corruption)
pm = pv.IntervenableModel({"component": f"{layers_path(m)}[{layer}].output",
                           "intervention_type": pv.VanillaIntervention}, model=m.model)
t = time.perf_counter()
with torch.no_grad():
    _, out = pm(base=dict(corrupt), sources=[dict(clean)], unit_locations={"sources->base": p})
dt = time.perf_counter() - t
l = out.logits[0, -1]
print(dt, float(l[good] - l[bad]))
"""


def pyvene_sample(name, jobs, corruption, k=3):
    times, values = [], {}
    for layer, p in jobs[:: max(1, len(jobs) // k)][:k]:
        r = subprocess.run([sys.executable, "-c", PYVENE_ONE, name, str(layer), str(p), corruption],
                           capture_output=True, text=True)
        if r.returncode != 0:
            return None, {}, r.stderr.strip().splitlines()[-1]
        dt, v = map(float, r.stdout.split())
        times.append(dt)
        values[(layer, p)] = v
    return sum(times) / len(times) * len(jobs), values, ""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="mid")
    ap.add_argument("--stride", type=int, default=1, help="patch every k-th position (all tools alike)")
    ap.add_argument("--corruption", choices=["str", "image"], default="str",
                    help="str: one question token replaced; image: another image (no patch is the identity)")
    ap.add_argument("--skip-nnsight", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(1)
    m = build(a.model)
    clean, corrupt, good, bad = inputs(m, a.model, a.corruption)
    metric = logit_diff(good, bad)
    t_len = clean["input_ids"].shape[1]
    positions = list(range(0, t_len, a.stride))
    jobs = [(li, p) for li in range(m.n_layers("lm")) for p in positions]
    groups = {str(p): [p] for p in positions}
    m.run(corrupt)  # warm-up

    t0 = time.perf_counter()
    ours = patch_sweep(m, clean, corrupt, metric, positions=groups, batch_size=32)
    t_ours = time.perf_counter() - t0
    ours_vals = [float(ours.raw[0, li, positions.index(p)]) for li, p in jobs]
    t0 = time.perf_counter()
    attribution_patching(m, clean, corrupt, metric, positions=groups)
    t_atp = time.perf_counter() - t0
    t0 = time.perf_counter()
    base = naive(m, clean, corrupt, metric, jobs)
    t_naive = time.perf_counter() - t0
    rows = [("vlmscope batched sweep", t_ours, ours_vals, ""), ("vlmscope attribution patching (approx.)", t_atp,
                                                                 None, "")]
    rows.append(("one forward per patch (vlmscope hooks)", t_naive, base, ""))
    if not a.skip_nnsight:
        t0 = time.perf_counter()
        nn_vals = nnsight_sweep(m, clean, corrupt, metric, jobs)
        rows.append(("nnsight, one trace per patch", time.perf_counter() - t0, nn_vals, ""))
    t_pv, pv_vals, err = pyvene_sample(a.model, jobs, a.corruption)
    if t_pv is not None:
        idx = {j: i for i, j in enumerate(jobs)}
        diffs = max(abs(v - ours_vals[idx[j]]) for j, v in pv_vals.items())
        rows.append(("pyvene (scaled from first calls in fresh processes)", t_pv, None, f"max |diff| {diffs:.1e}"))
    else:
        rows.append(("pyvene", float("nan"), None, f"failed: {err}"))
    print(f"\nmodel {a.model}, {a.corruption} corruption: {m.n_layers('lm')} layers x {len(positions)} positions = "
          f"{len(jobs)} patches\n")
    print("| tool | seconds | vlmscope sweep is faster by | max abs diff to vlmscope |")
    print("|---|---|---|---|")
    for name, t, vals, note in rows:
        diff = f"{max(abs(x - y) for x, y in zip(vals, ours_vals)):.1e}" if vals is not None else note or "-"
        print(f"| {name} | {t:.2f} | {t / t_ours:.1f}x | {diff} |")


if __name__ == "__main__":
    main()
