"""The SAE trainer: killed at any moment and resumed, it ends with exactly the weights of an
uninterrupted run — from in-memory rows, from the activation store, and streaming from a model."""

import importlib.util
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import vlmscope as vs
from vlmscope import testing as T
from vlmscope.methods import sae as S
from vlmscope.methods.sae.sources import site_rows
from vlmscope.methods.sae.train import lr_factor

JOB = Path(__file__).with_name("_sae_train_job.py")


def _job():
    spec = importlib.util.spec_from_file_location("_sae_train_job", JOB)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _same_run(a: Path, b: Path, names) -> None:
    for name in names:
        x, y = (load_file(str(d / name / "sae_weights.safetensors")) for d in (a, b))
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), (name, k)
        assert (a / name / "cfg.json").read_text() == (b / name / "cfg.json").read_text()
    assert json.loads((a / "training.json").read_text()) == json.loads((b / "training.json").read_text())


def test_sigkilled_training_resumes_to_the_uninterrupted_weights(tmp_path):
    job = _job()
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    job.main(str(whole), 0.0)  # the reference, in this process (one torch thread, like the job)
    proc = subprocess.Popen([sys.executable, str(JOB), str(cut), "0.1"])
    deadline, step = time.time() + 120, 0
    while time.time() < deadline and proc.poll() is None:
        m = cut / "checkpoint.json"
        if m.exists():
            step = json.loads(m.read_text())["step"]
            if step >= 12:
                break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step = json.loads((cut / "checkpoint.json").read_text())["step"]
    assert 12 <= step < 60, "the job should have been killed mid-way"
    assert not (cut / "training.json").exists()
    job.main(str(cut), 0.0)  # resume
    _same_run(whole, cut, ["relu", "topk", "batchtopk", "jumprelu"])
    assert not list(cut.glob("*.tmp")) and len(list(cut.glob("checkpoint-*.safetensors"))) == 1


class _Crash(Exception):
    pass


class _Flaky:
    """A source that raises on its n-th chunk, like a run killed while reading data."""

    def __init__(self, source, n):
        self.source, self.n, self.sites = source, n, source.sites

    def n_chunks(self):
        return self.source.n_chunks()

    def chunk(self, *args):
        self.n -= 1
        if self.n == 0:
            raise _Crash
        return self.source.chunk(*args)

    def describe(self):
        return self.source.describe()


@pytest.fixture(scope="module")
def tiny():
    model = T.tiny_llava()
    m = vs.load(model)
    x = T.llava_inputs(model, batch=24, seed=6)
    return m, x, (lambda idx: {k: v[list(idx)] for k, v in x.items()})


@pytest.mark.parametrize("kind", ["model", "store"])
def test_interrupted_training_from_a_model_or_a_store_resumes_exactly(tiny, tmp_path, kind):
    m, _, collate = tiny
    sites = ["connector.out", "lm.blocks.0.resid_post"]
    if kind == "model":
        src = S.ModelSource(m, list(range(24)), sites, positions="image", collate=collate, batch_size=8,
                            chunk_examples=8)
    else:
        store = m.cache_dataset(list(range(24)), sites, tmp_path / "store", batch_size=4, positions="image",
                                collate=collate, progress=False)
        src = S.StoreSource(store, sites, buffer_shards=2)  # 2 shards = 8 examples = 32 rows per chunk
    specs = [S.SAESpec("connector.out", "topk", k=4, expansion=2, name="a"),
             S.SAESpec("lm.blocks.0.resid_post", "relu", expansion=2, name="b")]
    cfg = S.TrainConfig(steps=14, batch_size=16, lr=3e-3, checkpoint_every=3, warmup_steps=2,
                        resample_every=5, dead_after_tokens=32)
    whole = S.train_saes(src, specs, cfg, out_dir=tmp_path / "whole", progress=False)
    with pytest.raises(_Crash):
        S.train_saes(_Flaky(src, 4), specs, cfg, out_dir=tmp_path / "cut", progress=False)
    ckpt = json.loads((tmp_path / "cut" / "checkpoint.json").read_text())
    assert ckpt["step"] == 3 and ckpt["cursor"][2] == 1  # the crash left a checkpoint in mid-chunk
    resumed = S.train_saes(src, specs, cfg, out_dir=tmp_path / "cut", progress=False)
    for name in ("a", "b"):
        for p, q in zip(whole[name].state_dict().values(), resumed[name].state_dict().values(), strict=True):
            assert torch.equal(p, q)
    _same_run(tmp_path / "whole", tmp_path / "cut", ["a", "b"])
    assert whole["a"].cfg.positions == "image" and whole["a"].cfg.site == "connector.out"
    with pytest.raises(vs.InputError, match="other settings"):
        S.train_saes(src, specs, S.TrainConfig(steps=15), out_dir=tmp_path / "cut", progress=False)


def test_model_rows_are_the_cached_activations_at_the_selected_positions(tiny):
    m, x, _ = tiny
    sites = ["vision.blocks.0.resid_post", "connector.out", "lm.blocks.1.resid_post"]
    rows = site_rows(m, x, sites, positions="image")
    _, cache = m.run_with_cache(x, sites)
    pos = m.positions(x)
    for s in sites:
        mask = pos[m.site(s).stream].select("image")
        torch.testing.assert_close(rows[s], cache[s][mask], rtol=0, atol=0)
    assert rows["lm.blocks.1.resid_post"].shape == (24 * 4, 64)  # 2x2 patches per image
    text = site_rows(m, x, ["lm.blocks.0.resid_post"], positions="text")["lm.blocks.0.resid_post"]
    assert text.shape == (24 * 4, 64)  # 4 text tokens per row
    with pytest.raises(vs.SiteError, match="batch head query key"):
        site_rows(m, x, ["lm.blocks.0.attn.pattern"])


def test_learning_rate_warms_up_and_decays_linearly():
    cfg = S.TrainConfig(steps=100, warmup_steps=10, decay_fraction=0.2)
    assert lr_factor(0, cfg) == pytest.approx(0.1)
    assert lr_factor(9, cfg) == lr_factor(50, cfg) == lr_factor(79, cfg) == 1.0
    assert lr_factor(80, cfg) == pytest.approx(1.0) and lr_factor(90, cfg) == pytest.approx(0.5)
    assert lr_factor(99, cfg) == pytest.approx(0.05)


def test_whitened_training_resumes_exactly(tmp_path):
    """The whitening measured on the first chunk is checkpointed: a crashed run resumes to the same weights."""
    x, _ = S.planted_dictionary(n_rows=1024, d=8, n_features=16, mean_active=2, seed=3)
    x = x @ torch.diag(torch.logspace(-1, 1, 8)) + 1.0  # unequal variances, an offset
    src = S.TensorSource({"x": x}, chunk_rows=128)
    specs = [S.SAESpec("x", "topk", d_sae=16, k=2, name="a"), S.SAESpec("x", "jumprelu", d_sae=16, name="b")]
    cfg = S.TrainConfig(steps=12, batch_size=64, lr=3e-3, warmup_steps=2, checkpoint_every=3, whiten=0.1)
    whole = S.train_saes(src, specs, cfg, out_dir=tmp_path / "whole", progress=False)
    with pytest.raises(_Crash):
        S.train_saes(_Flaky(src, 4), specs, cfg, out_dir=tmp_path / "cut", progress=False)
    assert json.loads((tmp_path / "cut" / "checkpoint.json").read_text())["step"] >= 3
    resumed = S.train_saes(src, specs, cfg, out_dir=tmp_path / "cut", progress=False)
    for name in ("a", "b"):
        for p, q in zip(whole[name].state_dict().values(), resumed[name].state_dict().values(), strict=True):
            assert torch.equal(p, q)
    _same_run(tmp_path / "whole", tmp_path / "cut", ["a", "b"])
    assert not torch.allclose(whole["a"].W_dec.norm(dim=-1), whole["a"].W_dec.norm(dim=-1)[:1])  # whitened, folded
