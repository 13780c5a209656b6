"""Throughput with many processes: activations cached per second and SAE training tokens per second,
1 process against 2 (torchrun, gloo on CPU), and on the GPU when CUDA is there (2 processes only
with 2 GPUs: NCCL wants one device per rank).

- cache: `cache_dataset` on the zoo model shapes-llava over the shapes world's standard examples
  (`vlmscope cache`'s data), every non-pad position of `connector.out` and each LM block's
  `resid_post`; activations/s = stored rows (one d-vector each, all sites) / wall time. Ranks take
  batches r, r + W, ... and write their own shards.
- SAE: `train_saes` on random rows in memory (TensorSource), one TopK SAE; tokens/s = steps x
  global batch / wall time. Under 2 processes each rank trains half of every global batch
  (DistributedDataParallel plus the synchronised statistics), so both runs do the same steps.

Every run is a fresh `torchrun --standalone` (one torch thread per process); the time is taken
between barriers around the work only (model loading and process start excluded).

    python benchmarks/scale_throughput.py              # ~2 min on a busy 2-core machine
    python benchmarks/scale_throughput.py --quick      # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def worker(a) -> None:
    """One rank of a run (started by torchrun): time the task, rank 0 writes {seconds, count}."""
    import torch

    from vlmscope.scale import distributed

    torch.set_num_threads(1)
    with distributed.session() as d:
        device = f"cuda:{d.local_rank}" if a.device == "cuda" else "cpu"
        run = _cache if a.worker == "cache" else _sae
        prepare = run(a, d, device)
        distributed.barrier(d)
        t0 = time.perf_counter()
        count = prepare()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        distributed.barrier(d)
        seconds = time.perf_counter() - t0
    if d.main:
        Path(a.result).write_text(json.dumps({"seconds": seconds, "count": count}))


def _cache(a, d, device):
    from vlmscope.cli import _load
    from vlmscope.methods.sae.cli import _data

    m, builder = _load(a.model)
    m.model.to(device)
    dataset, collate, _ = _data(a.model, m, builder, a.examples, 0)
    sites = ["connector.out", "lm.blocks.*.resid_post"]

    def go() -> int:
        store = m.cache_dataset(dataset, sites, a.out, batch_size=a.model_batch, positions=None, collate=collate,
                                progress=False, dist=d)
        from safetensors import safe_open

        rows = 0
        for f in store.shard_files():
            with safe_open(str(f), "pt") as fh:
                rows += sum(fh.get_slice(s).get_shape()[0] for s in store.sites)
        return rows
    return go


def _sae(a, d, device):
    import torch

    from vlmscope.methods import sae as S

    rows = torch.randn(a.steps * a.batch, a.d_in, generator=torch.Generator().manual_seed(0))
    src = S.TensorSource({"x": rows}, chunk_rows=16 * a.batch)
    spec = [S.SAESpec("x", "topk", d_sae=a.d_sae, k=32)]
    cfg = S.TrainConfig(steps=a.steps, batch_size=a.batch, warmup_steps=5, log_every=10**9)

    def go() -> int:
        S.train_saes(src, spec, cfg, progress=False, device=device, dist=d)
        return a.steps * a.batch
    return go


def launch(task: str, nproc: int, device: str, a, tmp: Path) -> dict:
    result = tmp / f"{task}-{device}-{nproc}.json"
    args = [f"--model={a.model}", f"--examples={a.examples}", f"--model-batch={a.model_batch}", f"--steps={a.steps}",
            f"--batch={a.batch}", f"--d-in={a.d_in}", f"--d-sae={a.d_sae}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", __file__,
           "--worker", task, "--device", device, "--result", str(result), "--out", str(tmp / result.stem), *args]
    env = os.environ | {"OMP_NUM_THREADS": "1"} | ({"CUDA_VISIBLE_DEVICES": ""} if device == "cpu" else {})
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return json.loads(result.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--model", default="shapes-llava")
    p.add_argument("--examples", type=int, default=1024)
    p.add_argument("--model-batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch", type=int, default=2048, help="global SAE batch (rows per step over all ranks)")
    p.add_argument("--d-in", type=int, default=256)
    p.add_argument("--d-sae", type=int, default=4096)
    p.add_argument("--worker", choices=["cache", "sae"], help=argparse.SUPPRESS)
    p.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(a)
    if a.quick:
        a.examples, a.steps = 256, 15
    import torch

    runs = [("cpu", 1), ("cpu", 2)]
    if torch.cuda.is_available():
        runs += [("cuda", 1)] + ([("cuda", 2)] if torch.cuda.device_count() >= 2 else [])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for task, unit in (("cache", "activations/s"), ("sae", "tokens/s")):
            base = {}
            for device, n in runs:
                r = launch(task, n, device, a, Path(tmp))
                rate = r["count"] / r["seconds"]
                base.setdefault(device, rate)
                rows.append((task, unit, device, n, r["seconds"], rate, rate / base[device]))
                print(f"{task} {device} x{n}: {rate:,.0f} {unit}", file=sys.stderr, flush=True)
    print("\n| task | device | processes | seconds | throughput | vs 1 process |\n|---|---|---|---|---|---|")
    for task, unit, device, n, sec, rate, ratio in rows:
        print(f"| {task} | {device} | {n} | {sec:.2f} | {rate:,.0f} {unit} | {ratio:.2f}x |")
    print(f"\ncache: {a.model}, {a.examples} examples, {a.model_batch} per forward; SAE: TopK d_in {a.d_in}, "
          f"d_sae {a.d_sae}, k 32, global batch {a.batch}, {a.steps} steps. torch {torch.__version__}, "
          f"{os.cpu_count()} CPU cores.")


if __name__ == "__main__":
    main()
