"""The activation store: a SIGKILLed run resumes to exactly the shards of an uninterrupted one."""

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
from vlmscope.model.store import ActivationStore

JOB = Path(__file__).with_name("_store_job.py")


def _run(out, delay):
    return subprocess.Popen([sys.executable, str(JOB), str(out), str(delay)])


def _shards(path):
    manifest = json.loads((path / "manifest.json").read_text())
    return manifest, [load_file(str(path / s["file"])) for s in manifest["shards"]]


def test_killed_store_resumes_to_the_uninterrupted_result(tmp_path):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert _run(whole, 0.0).wait(timeout=120) == 0
    proc = _run(cut, 0.15)
    deadline = time.time() + 120
    while time.time() < deadline:
        m = cut / "manifest.json"
        if m.exists() and 1 <= len(json.loads(m.read_text())["shards"]) < 6:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(json.loads((cut / "manifest.json").read_text())["shards"])
    assert 1 <= done < 6, "the job should have been killed mid-way"
    assert _run(cut, 0.0).wait(timeout=120) == 0
    m1, s1 = _shards(whole)
    m2, s2 = _shards(cut)
    assert m1 == m2 and len(s1) == 6
    for a, b in zip(s1, s2):
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k
    assert not list(cut.glob("*.tmp"))


def test_store_rows_equal_run_with_cache(tmp_path):
    model = T.tiny_llava()
    m = vs.load(model)
    x = T.llava_inputs(model, batch=5, seed=2)
    x["attention_mask"][3, -1] = 0
    store = m.cache_dataset(list(range(5)), ["lm.blocks.1.resid_post", "vision.blocks.0.resid_post"], tmp_path,
                            batch_size=2, collate=lambda idx: {k: v[idx] for k, v in x.items()}, progress=False)
    assert store.complete
    _, c = m.run_with_cache(x, ["lm.blocks.1.resid_post", "vision.blocks.0.resid_post"])
    acts, idx = store.load("lm.blocks.1.resid_post")
    valid = x["attention_mask"].bool()
    assert torch.equal(acts, c["lm.blocks.1.resid_post"][valid])  # every real token, pads dropped
    assert torch.equal(idx, valid.nonzero())
    vacts, vidx = store.load("vision.blocks.0.resid_post")
    assert torch.equal(vacts, c["vision.blocks.0.resid_post"].flatten(0, 1))
    rows = torch.cat(list(store.batches("lm.blocks.1.resid_post", batch_size=7, seed=1)))
    assert rows.shape == acts.shape
    assert torch.equal(rows.sort(0).values, acts.sort(0).values)  # a permutation of the same rows
    with pytest.raises(vs.InputError, match="other settings"):
        m.cache_dataset(list(range(5)), ["lm.blocks.0.resid_post"], tmp_path, batch_size=2,
                        collate=lambda idx: {k: v[idx] for k, v in x.items()}, progress=False)
    with pytest.raises(vs.SiteError, match="not in this store"):
        ActivationStore(tmp_path).load("lm.blocks.0.resid_post")
