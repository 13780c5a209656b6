"""SAE training throughput: images in, trained SAE out, vlmscope vs SAELens and overcomplete.

Every side trains the same TopK SAE (d_sae, k, batch, steps, lr, Adam betas, linear warm-up and
linear decay to 0, no activation normalisation — overcomplete has none) on image-token rows of
one site of the zoo model shapes-llava, one torch thread, each side in a fresh process.

- End to end: pre-rendered images in memory -> processor -> model forward -> rows of the site at
  image tokens -> shuffled in chunks of `--chunk-images` images -> batches -> trained SAE.
  vlmscope: `ModelSource` (stop_early on and off) + `train_saes`. SAELens (`SAETrainer`) and
  overcomplete (`train_sae`): fed by a hand-written provider — a forward hook on the transformers
  module, a full `model(**inputs)` — the code a user of either writes for a VLM, since SAELens's
  own ActivationsStore hosts only TransformerLens models. The provider uses vlmscope only to run
  the processor (`vlm.prepare`) and to pick image positions, the same calls vlmscope makes.
- Several SAEs from one pass: three sites (vision.blocks.0/1/2.resid_post), vlmscope vs SAELens's
  `MultiSAETrainer` on a multi-hook provider (full forward).
- Store reuse: vlmscope `cache_dataset` once, then `train_saes(StoreSource(...))`; a rerun only
  pays the second part.
- Step only: the rows already in memory (collected outside the timing); plus a minimal torch loop;
  and vlmscope against SAELens as interleaved pairs in one process (median of `--pairs`).

SAELens cannot share the main venv (it pins transformer-lens < 4): its side runs with
PYTHONPATH=/tmp/sl_pkgs (`pip install --target /tmp/sl_pkgs sae-lens==6.54.12
transformer-lens==3.9.0`). overcomplete 0.3.0 would upgrade torch: it sits in /tmp/oc_pkgs
(`pip install --no-deps --target /tmp/oc_pkgs overcomplete`) and its package `__init__` (which
imports torchvision and timm) is skipped — only `overcomplete.sae` is imported.

    python benchmarks/sae_throughput.py                        # ~5 min on a busy 2-core machine
    python benchmarks/sae_throughput.py --steps 45 --quick     # smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

import torch

SL_PATH, OC_PATH = "/tmp/sl_pkgs", "/tmp/oc_pkgs"
MULTI_SITES = ["vision.blocks.0.resid_post", "vision.blocks.1.resid_post", "vision.blocks.2.resid_post"]


def lr_lambda(a):
    """vlmscope's schedule (train.lr_factor): linear warm-up, linear decay to 0 over the last part."""
    start = int(a.steps * (1 - a.decay_fraction))
    return lambda s: min(1.0, (s + 1) / a.warmup) * ((a.steps - s) / (a.steps - start) if s >= start else 1.0)


def setup(a):
    torch.set_num_threads(1)
    import vlmscope
    from vlmscope.data import render
    from vlmscope.zoo import truth
    m = vlmscope.zoo.load("shapes-llava")
    rows_per_image = int(m.positions(m.prepare([render(truth.examples(0, 1)[0].scene)], ["x"]))["vision"]
                         .select("image").sum())
    per_chunk = a.chunk_images * rows_per_image // a.batch  # batches per chunk, as every side forms them
    n = math.ceil(a.steps / per_chunk) * a.chunk_images
    exs = truth.examples(a.seed, n)
    return m, [(render(e.scene), e.question.text) for e in exs]


class _Stop(Exception):
    pass


def hf_rows(m, items, sites, stop_early=False):
    """A plain forward hook per site on the transformers modules; image-token rows of each."""
    got, hooks = {}, []
    for s in sites:
        def grab(mod, args, out, s=s):
            got[s] = (out[0] if isinstance(out, tuple) else out).detach()
            if stop_early and len(got) == len(sites):
                raise _Stop
        hooks.append(m.model.get_submodule(m.site(s).module).register_forward_hook(grab))
    inputs = m.prepare([i[0] for i in items], [i[1] for i in items])
    try:
        with torch.no_grad():
            m.model(**inputs)
    except _Stop:
        pass
    finally:
        for h in hooks:
            h.remove()
    pos = m.positions(inputs)
    return {s: got[s][pos[m.site(s).stream].select("image")] for s in sites}  # (rows, d)


def provider(m, data, sites, a, stop_early=False):
    """Yields {site: (batch, d)}: chunks of `chunk_images` images, shuffled, cut into full batches."""
    g = torch.Generator().manual_seed(a.seed)
    for c in range(0, len(data), a.chunk_images):
        parts = [hf_rows(m, data[b:b + a.model_batch], sites, stop_early)
                 for b in range(c, min(c + a.chunk_images, len(data)), a.model_batch)]
        rows = {s: torch.cat([p[s] for p in parts]) for s in sites}
        perm = torch.randperm(len(rows[sites[0]]), generator=g)
        for b in range(0, len(perm) - a.batch + 1, a.batch):
            yield {s: r[perm[b:b + a.batch]] for s, r in rows.items()}


def memory_batches(m, data, a):
    rows = torch.cat([hf_rows(m, data[b:b + a.model_batch], [a.site])[a.site]
                      for b in range(0, len(data), a.model_batch)])
    rows = rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(a.seed))]
    return rows, [rows[i * a.batch:(i + 1) * a.batch] for i in range(a.steps)]


def timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# --- the sides, each run in its own process ------------------------------------------------------


def run_vlmscope(a, m, data):
    from vlmscope.methods.sae import ModelSource, SAESpec, StoreSource, TensorSource, TrainConfig, train_saes
    from vlmscope.model.store import cache_dataset
    cfg = TrainConfig(steps=a.steps, batch_size=a.batch, lr=a.lr, warmup_steps=a.warmup,
                      decay_fraction=a.decay_fraction, normalise=False, checkpoint_every=10**9)
    spec = [SAESpec(a.site, "topk", d_sae=a.d_sae, k=a.k)]
    multi = [SAESpec(s, "topk", d_sae=a.d_sae, k=a.k) for s in MULTI_SITES]

    def model_run(specs, sites, early):
        src = ModelSource(m, data, sites, positions="image", batch_size=a.model_batch,
                          chunk_examples=a.chunk_images, stop_early=early)
        return timed(lambda: train_saes(src, specs, cfg, progress=False))

    out = {"vlmscope, stop_early": model_run(spec, [a.site], True),
           "vlmscope, full forward": model_run(spec, [a.site], False),
           "vlmscope, 3 SAEs one pass": model_run(multi, MULTI_SITES, True)}
    with tempfile.TemporaryDirectory() as tmp:
        t_store = timed(lambda: cache_dataset(m, data, [a.site], tmp, batch_size=a.model_batch,
                                              positions="image", progress=False))
        src = StoreSource(tmp, [a.site], buffer_shards=a.chunk_images // a.model_batch)
        t_train = timed(lambda: train_saes(src, spec, cfg, progress=False))
    out["vlmscope, store written + trained"] = t_store + t_train
    out["vlmscope, store reused"] = t_train
    rows, batches = memory_batches(m, data, a)
    src = TensorSource({a.site: rows}, chunk_rows=a.chunk_images * len(rows) // len(data))
    out["step: vlmscope"] = timed(lambda: train_saes(src, spec, cfg, progress=False))
    out["step: minimal torch loop"] = timed(lambda: minimal_loop(batches, a))
    return out


def minimal_loop(batches, a):
    d_in = batches[0].shape[1]
    w = torch.randn(a.d_sae, d_in)
    W_dec = torch.nn.Parameter(w / w.norm(dim=1, keepdim=True))
    W_enc = torch.nn.Parameter(W_dec.detach().T.clone())
    b_enc, b_dec = torch.nn.Parameter(torch.zeros(a.d_sae)), torch.nn.Parameter(torch.zeros(d_in))
    opt = torch.optim.Adam([W_enc, b_enc, W_dec, b_dec], lr=a.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(a))
    for x in batches:
        pre = (x - b_dec) @ W_enc + b_enc  # (batch, d_sae)
        vals, idx = pre.topk(a.k, dim=-1)
        h = torch.zeros_like(pre).scatter(-1, idx, vals.relu())
        loss = (h @ W_dec + b_dec - x).pow(2).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def run_saelens(a, m, data):
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.multi_sae_trainer import MultiSAETrainer
    from sae_lens.training.sae_trainer import SAETrainer

    start = int(a.steps * (1 - a.decay_fraction))
    tcfg = SAETrainerConfig(total_training_samples=a.steps * a.batch, train_batch_size_samples=a.batch, lr=a.lr,
                            lr_end=a.lr, lr_warm_up_steps=a.warmup, lr_decay_steps=a.steps - start)

    def sae(d_in):
        return TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d_in, d_sae=a.d_sae, k=a.k, normalize_activations="none"))

    def single(early):
        def go():
            rows = (b[a.site] for b in provider(m, data, [a.site], a, early))
            SAETrainer(tcfg, sae(a.width[a.site]), rows).fit()
        return timed(go)

    def multi():
        saes = {s: sae(a.width[s]) for s in MULTI_SITES}
        MultiSAETrainer(tcfg, saes, {s: s for s in MULTI_SITES}, provider(m, data, MULTI_SITES, a)).fit()

    out = {"SAELens, full forward": single(False), "SAELens, hand-written early stop": single(True),
           "SAELens MultiSAETrainer, 3 SAEs one pass": timed(multi)}
    rows, batches = memory_batches(m, data, a)
    out["step: SAELens"] = timed(lambda: SAETrainer(tcfg, sae(a.width[a.site]), iter(batches)).fit())
    # the same comparison as interleaved pairs in this one process (vlmscope imports here too), the
    # median of `--pairs` each: steadier than one run per process on a shared machine
    from vlmscope.methods.sae import SAESpec, TensorSource, TrainConfig, train_saes
    cfg = TrainConfig(steps=a.steps, batch_size=a.batch, lr=a.lr, warmup_steps=a.warmup,
                      decay_fraction=a.decay_fraction, normalise=False, checkpoint_every=10**9)
    src = TensorSource({a.site: rows}, chunk_rows=a.chunk_images * len(rows) // len(data))
    pairs = {"vlmscope": [], "SAELens": []}
    for _ in range(a.pairs):
        pairs["vlmscope"].append(timed(lambda: train_saes(src, [SAESpec(a.site, "topk", d_sae=a.d_sae, k=a.k)], cfg,
                                                          progress=False)))
        pairs["SAELens"].append(timed(lambda: SAETrainer(tcfg, sae(a.width[a.site]), iter(batches)).fit()))
    for name, ts in pairs.items():
        out[f"step, interleaved pairs (median): {name}"] = sorted(ts)[len(ts) // 2]
    return out


def run_overcomplete(a, m, data):
    import types
    pkg = types.ModuleType("overcomplete")  # skip the package __init__ (torchvision, timm)
    pkg.__path__ = [os.path.join(OC_PATH, "overcomplete")]
    sys.modules["overcomplete"] = pkg
    from overcomplete.sae import TopKSAE, train_sae
    from overcomplete.sae.losses import top_k_auxiliary_loss

    def fit(batches):
        sae = TopKSAE(a.width[a.site], nb_concepts=a.d_sae, top_k=a.k)
        opt = torch.optim.Adam(sae.parameters(), lr=a.lr)
        train_sae(sae, batches, top_k_auxiliary_loss, opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(a)),
                  nb_epochs=1, monitoring=0)

    out = {"overcomplete, full forward": timed(lambda: fit(
        b[a.site] for b in _take(provider(m, data, [a.site], a), a.steps)))}
    _, batches = memory_batches(m, data, a)
    out["step: overcomplete"] = timed(lambda: fit(batches))
    return out


def _take(it, n):
    for i, x in enumerate(it):
        if i >= n:
            return
        yield x


WORKERS = {"vlmscope": run_vlmscope, "saelens": run_saelens, "overcomplete": run_overcomplete}
PATHS = {"vlmscope": None, "saelens": SL_PATH, "overcomplete": OC_PATH}


def worker(a):
    m, data = setup(a)
    rows = hf_rows(m, data[:1], [a.site, *MULTI_SITES])
    a.width = {s: r.shape[-1] for s, r in rows.items()}
    print(json.dumps(WORKERS[a.worker](a, m, data)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--site", default="vision.blocks.2.resid_post")
    ap.add_argument("--d-sae", type=int, default=768)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--steps", type=int, default=180)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--decay-fraction", type=float, default=0.2)
    ap.add_argument("--chunk-images", type=int, default=512)
    ap.add_argument("--model-batch", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sides", default="vlmscope,saelens,overcomplete")
    ap.add_argument("--pairs", type=int, default=5, help="interleaved step-only pairs (vlmscope, SAELens)")
    ap.add_argument("--quick", action="store_true", help="smoke run: fewer steps, smaller chunks")
    ap.add_argument("--worker", choices=list(WORKERS), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.quick:
        a.steps, a.chunk_images = min(a.steps, 18), 128
    if a.worker:
        return worker(a)
    times = {}
    for side in a.sides.split(","):
        env = dict(os.environ, TQDM_DISABLE="1", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
        if PATHS[side]:
            if not os.path.isdir(PATHS[side]):
                print(f"{side}: {PATHS[side]} missing, skipped (see the module docstring)")
                continue
            env["PYTHONPATH"] = PATHS[side] + os.pathsep + env.get("PYTHONPATH", "")
        args = [*sys.argv[1:], "--worker", side]
        r = subprocess.run([sys.executable, __file__, *args], env=env, capture_output=True, text=True)
        if r.returncode:
            print(f"{side} failed:\n{r.stderr[-3000:]}")
            continue
        times.update(json.loads(r.stdout.strip().splitlines()[-1]))
    report(times, a)


def report(times, a):
    tokens = a.steps * a.batch
    print(f"TopK d_sae {a.d_sae}, k {a.k}, batch {a.batch}, {a.steps} steps ({tokens} tokens per SAE), "
          f"lr {a.lr}, site {a.site}, one torch thread")
    base = {"": times.get("SAELens, full forward"), "step: ": times.get("step: SAELens"),
            "step, ": times.get("step, interleaved pairs (median): SAELens")}
    print("| run | SAEs | seconds | SAE-tokens/s | vs SAELens (same kind of run) |")
    print("|---|---|---|---|---|")
    for name, t in times.items():
        n_sae = 3 if "3 SAEs" in name else 1
        ref = base["step: " if name.startswith("step:") else "step, " if name.startswith("step,") else ""]
        if "3 SAEs" in name:
            ref = times.get("SAELens MultiSAETrainer, 3 SAEs one pass")
        ratio = f"{ref / t:.2f}x" if ref else ""
        print(f"| {name} | {n_sae} | {t:.2f} | {n_sae * tokens / t:,.0f} | {ratio} |")


if __name__ == "__main__":
    main()
