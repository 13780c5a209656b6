"""The memory planner against the measured peak of the same jobs run for real (CPU), on the zoo model,
a mid-size random LLaVA and every family's tiny model; full-size 7B configs planned in seconds."""

import importlib.util
import time
from pathlib import Path

import pytest
import torch

import vlmscope as vs
from vlmscope import testing as T
from vlmscope.cli import main
from vlmscope.scale.jobs import JOBS, Job
from vlmscope.scale.measure import peak_memory
from vlmscope.scale.plan import MemoryPlan, plan_memory

torch.set_num_threads(1)
METHODS = ["cache", "patch", "atp", "sae"]
TOLERANCE = 0.25


def _full_size():
    path = Path(__file__).parents[1] / "adapters" / "test_full_size.py"
    spec = importlib.util.spec_from_file_location("full_size_configs", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def job_for(method: str) -> Job:
    return Job(method, sweep_batch=8, sae_batch=256)


def measure(m, x, job: Job):
    with peak_memory(m.model, x) as got:
        kept = JOBS[job.method](m, x, job, got.tracker)
    del kept
    return got.result


@pytest.fixture(scope="module")
def models():
    from vlmscope.data import example_batch

    zoo = vs.zoo.load("shapes-llava")
    # LM hidden 384 x 6 layers; 224 px images in 14 px patches: 256 image tokens per example
    mid = vs.load(T.tiny_llava(image_size=224, patch_size=14, text_hidden=384, text_layers=6))
    return {"shapes-llava": (zoo, zoo.prepare(*example_batch(4))),
            "mid-llava": (mid, T.llava_inputs(mid.model, batch=4, text_len=16))}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", ["shapes-llava", "mid-llava"])
def test_plan_matches_measured_peak(models, name, method):
    m, x = models[name]
    job = job_for(method)
    got = measure(m, x, job)
    plan = plan_memory(m, inputs=x, job=job)
    weights = sum(t.nbytes for t in [*m.model.parameters(), *m.model.buffers()])
    assert plan.components["weights"] == got.held["weights"] == weights
    assert abs(plan.peak / got.peak - 1) < TOLERANCE, (plan.components, got)
    made = plan.peak - plan.components["weights"] - plan.components["inputs"]  # what the job itself adds
    assert abs(made / got.made - 1) < TOLERANCE, (plan.components, got)
    if method == "atp":
        assert plan.components["saved for backward"] > 0 and plan.components["gradients"] > 0
    if method == "sae":
        assert plan.components["sae training"] > 0


FAMILIES = {"llava_next": (T.tiny_llava_next, T.llava_next_inputs),
            "qwen2_5_vl": (lambda: T.tiny_qwen2_vl(version="2.5"), T.qwen_inputs),
            "idefics3": (T.tiny_idefics3, T.idefics3_inputs), "paligemma": (T.tiny_paligemma, T.paligemma_inputs),
            "instructblip": (lambda: T.tiny_blip2(instruct=True), T.blip2_inputs), "clip": (T.tiny_clip, T.clip_inputs)}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_plan_matches_measured_on_every_family(family):
    """The meta run follows each family's own code paths (packed images, windows, padding tiles, a
    Q-Former, a dual encoder), so the plan lands within 2% of the real peak of AtP (cache for CLIP)."""
    build, make_inputs = FAMILIES[family]
    m = vs.load(build())
    x = make_inputs(m.model)
    job = Job("cache" if m.adapter.dual_encoder else "atp", sites=("*.resid_post",) if m.adapter.dual_encoder else None)
    got = measure(m, x, job)
    plan = plan_memory(m, inputs=x, job=job)
    assert abs(plan.peak / got.peak - 1) < TOLERANCE and abs(plan.peak - got.peak) <= 0.02 * got.peak


@pytest.mark.parametrize("name", ["llava-1.5-7b", "qwen2.5-vl-7b"])
def test_full_size_plans_in_seconds(name):
    build, published, *_ = _full_size().CHECKPOINTS[name]
    with torch.device("meta"):
        model, _ = build()
    start = time.perf_counter()
    plan = plan_memory(model, "cache", batch_size=2, dtype=torch.bfloat16, image_size=336)
    assert time.perf_counter() - start < 10
    model.to(torch.bfloat16)  # on meta: free
    assert plan.components["weights"] == sum(t.nbytes for t in [*model.parameters(), *model.buffers()])
    # the job ends holding every resid_post (their shapes: site_shapes) and the logits, so its peak is at
    # least that; at the peak (the last block's MLP, or the logits) the cache is all but complete
    m = vs.load(model)
    shapes = m.site_shapes(plan_inputs(m))
    cache = sum(2 * torch.Size(shapes[s]).numel() for s in plan.sites)
    logits = 2 * torch.Size(shapes["lm.logits"]).numel()
    assert plan.peak >= plan.components["weights"] + cache + logits
    assert 0.95 * cache <= plan.components["cache & outputs"] <= 1.05 * (cache + logits)
    assert plan.sites == tuple(m.sites("lm.blocks.*.resid_post"))


def plan_inputs(m):
    from vlmscope.model.adapters.examples import example_inputs

    return example_inputs(m, 2, 336)


def test_suggested_batch_fits(models):
    m, _ = models["mid-llava"]
    plan = plan_memory(m, "atp", batch_size=2)
    assert plan.suggest_batch_size(plan.peak) == 2  # linear in the batch: exactly the one planned
    assert plan.suggest_batch_size(plan.components["weights"] // 2) == 0
    budget = 3 * plan.peak
    b = plan.suggest_batch_size(budget)
    assert b > 2
    assert plan_memory(m, "atp", batch_size=b).peak <= budget
    assert plan_memory(m, "atp", batch_size=b + 2).peak > budget


def test_plan_dtype_halves_the_weights(models):
    m, _ = models["mid-llava"]
    full, half = plan_memory(m, "cache", batch_size=2), plan_memory(m, "cache", batch_size=2, dtype=torch.bfloat16)
    assert abs(half.components["weights"] * 2 / full.components["weights"] - 1) < 1e-3  # int buffers stay
    assert half.dtype == "bfloat16" and half.peak < full.peak


def test_plan_round_trip_and_table(models, tmp_path):
    m, _ = models["shapes-llava"]
    plan = plan_memory(m, "atp", batch_size=2)
    back = MemoryPlan.load(plan.save(tmp_path / "plan"))
    assert back == plan
    df = plan.to_dataframe()
    assert df["bytes"].sum() == plan.peak and set(df["component"]) == set(plan.components)
    assert "peak" in str(plan) and "backward" in str(plan) and "MemoryPlan(" in repr(plan)


def test_peak_memory_counts_live_storages():
    with peak_memory() as got:
        a = torch.empty(1000)  # 4000 bytes
        b = a.view(10, 100).t()  # a view: no new memory
        a.add_(1)  # in place: none either
        c = torch.empty(2000)  # 8000: the peak, 12000
        del a, b
        d = torch.empty(500)
    assert got.result.made == 12000 and got.result.peak == 12000
    del c, d


def test_runs_return_no_key_value_cache(models):
    m, x = models["mid-llava"]
    out = m.run(x)
    assert getattr(out, "past_key_values", None) is None
    assert m.run(x, use_cache=True).past_key_values is not None  # still there when asked for


def test_cli_plan(capsys):
    rc = main(["plan", "zoo:shapes-llava", "--method", "cache", "--batch-size", "4", "--budget", "1"])
    out = capsys.readouterr().out
    assert rc == 0 and "peak" in out and "fits" in out
    assert main(["plan", "zoo:shapes-llava", "--method", "atp", "--budget", "0.001"]) == 1
    assert "does not fit" in capsys.readouterr().out
