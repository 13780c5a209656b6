"""Two processes (gloo on CPU, as torchrun starts them) give what one gives: the SAE trainer's weights
(DDP + synchronised dead counters, resampling, BatchTopK) up to float rounding, and the activation
store's rows exactly; a rank killed mid-way resumes, alone, at its first missing shard."""

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

import vlmscope as vs
from vlmscope import cli
from vlmscope import testing as T
from vlmscope.methods import sae as S
from vlmscope.model.store import ActivationStore
from vlmscope.scale import distributed

JOB = Path(__file__).parents[1] / "methods" / "sae" / "_sae_train_job.py"
SITES = ["connector.out", "lm.blocks.1.resid_post"]
N, BATCH = 20, 3  # 7 batches: rank 0 runs 0, 2, 4, 6 and rank 1 runs 1, 3, 5


def _worker(rank: int, world: int, init: str, fn, args) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        fn(rank, *args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _launch(tmp_path: Path, fn, *args, world: int = 2) -> None:
    """Run fn(rank, *args) in `world` forked processes joined by gloo; a failing rank fails the call."""
    init = tmp_path / f"pg-{uuid.uuid4().hex}"
    mp.start_processes(_worker, args=(world, str(init), fn, args), nprocs=world, start_method="fork")


def _job():
    import importlib.util

    spec = importlib.util.spec_from_file_location("_sae_train_job", JOB)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Equal up to float rounding: every decoder row points the same way, every weight within 1e-5."""
    assert a.keys() == b.keys()
    cos = torch.nn.functional.cosine_similarity(a["W_dec"], b["W_dec"], dim=1)
    assert cos.min() > 0.9999, cos.min()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-5, msg=k)


def _weights(path: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(path / name / "sae_weights.safetensors"))


class _Dying:
    """A source whose rank-1 process kills itself (SIGKILL, like a lost node) at its n-th chunk read."""

    def __init__(self, source, n):
        self.source, self.n = source, n

    def __getattr__(self, name):  # sites, n_chunks, describe: the source's own
        return getattr(self.source, name)

    def chunk(self, *args):
        self.n -= 1
        if self.n == 0 and distributed.current().rank == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        return self.source.chunk(*args)


def _train(rank, out, die_at):
    job = _job()
    src = job.source() if die_at is None else _Dying(job.source(), die_at)
    S.train_saes(src, job.specs(), job.config(), out_dir=out, progress=False)


def test_two_processes_train_the_one_process_saes(tmp_path):
    job = _job()
    names = ["relu", "topk", "batchtopk", "jumprelu"]
    job.main(str(tmp_path / "one"), 0.0)  # global batch 32: resampling, AuxK and dead counters all run
    with pytest.raises(mp.ProcessExitedException):
        _launch(tmp_path, _train, str(tmp_path / "two"), 7)  # rank 1 killed reading its 7th chunk
    ckpt = json.loads((tmp_path / "two" / "checkpoint.json").read_text())
    assert 0 < ckpt["step"] < 60 and not (tmp_path / "two" / "training.json").exists()
    _launch(tmp_path, _train, str(tmp_path / "two"), None)  # resumed under two processes
    for name in names:
        _close(_weights(tmp_path / "one", name), _weights(tmp_path / "two", name))
    one, two = (json.loads((tmp_path / d / "training.json").read_text()) for d in ("one", "two"))
    for a, b in zip(one["logs"], two["logs"], strict=True):
        for ra, rb in zip(a, b, strict=True):
            assert ra.keys() == rb.keys() and ra["step"] == rb["step"]
            for k in ra:
                assert ra[k] == pytest.approx(rb[k], rel=1e-4, abs=1e-5), (k, ra, rb)
    assert len(list((tmp_path / "two").glob("checkpoint-*.safetensors"))) == 1


@pytest.fixture(scope="module")
def tiny():
    model = T.tiny_llava()
    x = T.llava_inputs(model, batch=N, seed=3)
    return vs.load(model), (lambda idx: {k: v[list(idx)] for k, v in x.items()})


class _Killed:
    """Collate that kills its own process (SIGKILL) at its `at`-th call on rank `rank`."""

    def __init__(self, collate, rank, at):
        self.collate, self.rank, self.at, self.calls = collate, rank, at, 0

    def __call__(self, idx):
        self.calls += 1
        if distributed.current().rank == self.rank and self.calls == self.at:
            os.kill(os.getpid(), signal.SIGKILL)
        return self.collate(idx)


def _cache(rank, m, collate, out, kill_at):
    fn = collate if kill_at is None else _Killed(collate, 1, kill_at)
    m.cache_dataset(list(range(N)), SITES, out, batch_size=BATCH, positions="image", collate=fn, progress=False)


def _same_store(a: Path, b: Path, n: int = N, batch: int = BATCH) -> None:
    """The stores hold the same rows, in the same order, each example once."""
    sa, sb = ActivationStore(a), ActivationStore(b)
    assert sa.complete and sb.complete and sa.manifest["config"] == sb.manifest["config"]
    for site in sa.sites:
        (xa, ia), (xb, ib) = sa.load(site), sb.load(site)
        assert torch.equal(xa, xb) and torch.equal(ia, ib)
        assert torch.equal(ia[:, 0].unique(), torch.arange(n)) and len(ia) == 4 * n  # 2x2 patches each
    spans = [(s["start"], s["stop"]) for s in sb.manifest["shards"]]
    assert spans == [(s, min(s + batch, n)) for s in range(0, n, batch)]


def test_two_ranks_write_the_one_process_store(tiny, tmp_path):
    m, collate = tiny
    m.cache_dataset(list(range(N)), SITES, tmp_path / "one", batch_size=BATCH, positions="image", collate=collate,
                    progress=False)
    _launch(tmp_path, _cache, m, collate, str(tmp_path / "two"), None)
    _same_store(tmp_path / "one", tmp_path / "two")
    files = sorted(p.name for p in (tmp_path / "two").iterdir())
    assert files == ["manifest.json"] + [f"shard_{k:06d}.rank{k % 2}.safetensors" for k in range(7)]


def test_a_killed_rank_resumes_at_its_first_missing_shard(tiny, tmp_path):
    m, collate = tiny
    out = tmp_path / "store"
    with pytest.raises(mp.ProcessExitedException):
        _launch(tmp_path, _cache, m, collate, str(out), 3)  # rank 1 dies running its third batch (5)
    assert not (out / "manifest.json").exists()
    kept = json.loads((out / "manifest.rank1.json").read_text())["shards"]
    assert [s["start"] for s in kept] == [3, 9]  # batches 1 and 3
    if (out / "manifest.rank0.json").exists():  # rank 0 was stopped when rank 1 died, wherever it was
        kept += json.loads((out / "manifest.rank0.json").read_text())["shards"]
    before = {s["file"]: (out / s["file"]).stat().st_ino for s in kept}
    (out / "shard_000005.rank1.safetensors.tmp").write_bytes(b"half a shard")
    _launch(tmp_path, _cache, m, collate, str(out), None)
    assert all((out / f).stat().st_ino == ino for f, ino in before.items())  # not written again
    m.cache_dataset(list(range(N)), SITES, tmp_path / "one", batch_size=BATCH, positions="image", collate=collate,
                    progress=False)
    _same_store(tmp_path / "one", out)
    assert not list(out.glob("*.tmp")) and not list(out.glob("manifest.rank*"))


def _train_from(rank, m, collate, store, out):
    specs = [S.SAESpec("connector.out", "topk", k=4, expansion=2, name="topk"),
             S.SAESpec("lm.blocks.1.resid_post", "batchtopk", k=4, expansion=2, name="batchtopk")]
    cfg = S.TrainConfig(steps=12, batch_size=16, lr=3e-3, warmup_steps=2, checkpoint_every=5, dead_after_tokens=32)
    model = S.ModelSource(m, list(range(N)), SITES, collate=collate, batch_size=3, chunk_examples=8)
    S.train_saes(model, specs, cfg, out_dir=Path(out) / "model", progress=False)
    shards = S.StoreSource(store, SITES, buffer_shards=3)  # shares of 1 and 2 shards; rank 0 reads none of the last
    S.train_saes(shards, specs, cfg, out_dir=Path(out) / "store", progress=False)


def test_two_ranks_train_from_their_own_shards_and_forwards(tiny, tmp_path):
    m, collate = tiny
    store = m.cache_dataset(list(range(N)), SITES, tmp_path / "cache", batch_size=BATCH, positions="image",
                            collate=collate, progress=False)
    _train_from(0, m, collate, store.path, tmp_path / "one")
    _launch(tmp_path, _train_from, m, collate, store.path, tmp_path / "two")
    for kind in ("model", "store"):
        for name in ("topk", "batchtopk"):
            _close(_weights(tmp_path / "one" / kind, name), _weights(tmp_path / "two" / kind, name))


def _cli(rank, argv):
    assert cli.main(argv) == 0


def test_torchrun_runs_the_cache_and_sae_commands(tmp_path):
    cache = ["cache", "--model", "tiny-llava", "--site", "connector.out", "--examples", "10", "--batch-size", "3",
             "--quiet"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                "-m", "vlmscope"]  # --standalone: a free port on localhost
    env = os.environ | {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}  # gloo on CPU, GPUs or not
    done = subprocess.run(torchrun + cache + ["--out", str(tmp_path / "two")], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("wrote 4 shards") == 1  # rank 0 alone prints
    assert cli.main(cache + ["--out", str(tmp_path / "one")]) == 0
    _same_store(tmp_path / "one", tmp_path / "two", n=10, batch=3)
    train = ["sae", "train", "--store", str(tmp_path / "two"), "--site", "connector.out", "--k", "4", "--expansion",
             "2", "--steps", "8", "--batch-size", "8", "--buffer-shards", "2", "--checkpoint-every", "3", "--quiet"]
    _launch(tmp_path, _cli, train + ["--out", str(tmp_path / "sae-two")])
    assert cli.main(train + ["--out", str(tmp_path / "sae-one")]) == 0
    name = "connector.out-topk-x2-k4"
    _close(_weights(tmp_path / "sae-one", name), _weights(tmp_path / "sae-two", name))
