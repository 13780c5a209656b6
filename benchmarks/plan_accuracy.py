"""Plan accuracy: the memory planner (`vlmscope plan`) against the measured peak of the same jobs.

For each model x method the job runs for real under `vlmscope.scale.peak_memory` (every tensor's
storage followed from allocation to free: the true peak of live tensor bytes) and is planned on the
meta device (`plan_memory`, the same job with no weights). On CUDA the job also runs once more on
its own, measured by the allocator (`torch.cuda.max_memory_allocated`, which adds the caching
allocator's rounding; its reserved memory, fragmentation included, is printed beside it).

  shapes-llava  the zoo model (LM hidden 128 x 4 layers), its processor's inputs
  mid           random LlavaForConditionalGeneration: Llama hidden 384 x 6 layers (6 heads, 2 KV),
                CLIP 192 x 4 layers, 224 px / 14 px patches (256 image tokens), as in cache_overhead.py

Methods (vlmscope.scale.jobs): cache (every LM resid_post), patch (a sweep, 8 rows per forward), atp
(attribution patching on the batch), sae (the batch's rows of the middle block, 2 TopK steps).
Full-size configs (llava-1.5-7b, qwen2.5-vl-7b, as in tests/adapters/test_full_size.py) are
planned too (`--full-size`), with the seconds each plan takes.

    python benchmarks/plan_accuracy.py                      # both models, every method, CPU
    python benchmarks/plan_accuracy.py --device cuda        # on a GPU, with the allocator's peak
    python benchmarks/plan_accuracy.py --full-size --batch 8
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path

import torch

import vlmscope as vs
from vlmscope.scale.jobs import JOBS, METHODS, Job
from vlmscope.scale.measure import peak_memory
from vlmscope.scale.plan import plan_memory, size


def mid_llava():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=192, intermediate_size=768, num_hidden_layers=4,
                                       num_attention_heads=4, image_size=224, patch_size=14),
        text_config=LlamaConfig(hidden_size=384, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=6,
                                num_key_value_heads=2, vocab_size=512, bos_token_id=1, eos_token_id=2, pad_token_id=0),
        image_token_index=100, vision_feature_layer=-2, vision_feature_select_strategy="default")
    torch.manual_seed(0)
    return vs.load(LlavaForConditionalGeneration(cfg).eval())


def models(batch: int):
    from vlmscope import testing as T
    from vlmscope.data import example_batch

    zoo = vs.zoo.load("shapes-llava")
    yield "shapes-llava", zoo, zoo.prepare(*example_batch(batch))
    mid = mid_llava()
    yield "mid", mid, T.llava_inputs(mid.model, batch=batch, text_len=16)


def to(inputs, device):
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def cuda_peak(m, x, job) -> tuple[int, int]:
    """(max allocated, max reserved) bytes of the job on CUDA, weights and inputs included."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    kept = JOBS[job.method](m, x, job)
    torch.cuda.synchronize()
    del kept
    return torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()


def accuracy(args) -> None:
    head = f"{'model':13s} {'method':6s} {'planned':>11s} {'measured':>11s} {'ratio':>6s} {'job only':>17s}"
    cuda = args.device == "cuda"
    print(head + ("  cuda allocated   ratio  (reserved)" if cuda else "") + "  plan s")
    for name, m, x in models(args.batch):
        if cuda:
            m.model.to("cuda")
            x = to(x, "cuda")
        for method in args.methods:
            job = Job(method, sweep_batch=8, sae_batch=256)
            with peak_memory(m.model, x) as got:
                kept = JOBS[method](m, x, job, got.tracker)
            del kept
            measured = got.result
            start = time.perf_counter()
            plan = plan_memory(m, inputs=x, job=job)
            seconds = time.perf_counter() - start
            made = plan.peak - plan.components["weights"] - plan.components.get("inputs", 0)
            row = (f"{name:13s} {method:6s} {size(plan.peak):>11s} {size(measured.peak):>11s} "
                   f"{plan.peak / measured.peak:6.3f} {size(made):>9s} {made / measured.made:6.3f}")
            if cuda:
                allocated, reserved = cuda_peak(m, x, job)
                row += f"  {size(allocated):>14s} {plan.peak / allocated:6.3f}  ({size(reserved)})"
            print(row + f"  {seconds:6.2f}")


def full_size(args) -> None:
    path = Path(__file__).parents[1] / "tests" / "adapters" / "test_full_size.py"
    spec = importlib.util.spec_from_file_location("full_size_configs", path)
    configs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(configs)
    print(f"\nfull-size configs on meta, bf16, batch {args.batch}, 336 px images")
    for name in ("llava-1.5-7b", "qwen2.5-vl-7b"):
        with torch.device("meta"):
            model, _ = configs.CHECKPOINTS[name][0]()
        for method in args.methods:
            start = time.perf_counter()
            plan = plan_memory(model, method, args.batch, dtype=torch.bfloat16, image_size=336)
            parts = ", ".join(f"{k} {size(v)}" for k, v in plan.components.items())
            print(f"{name:14s} {method:6s} {size(plan.peak):>11s} in {time.perf_counter() - start:5.2f} s  ({parts})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--full-size", action="store_true", help="also plan llava-1.5-7b and qwen2.5-vl-7b")
    args = p.parse_args()
    torch.set_num_threads(1)
    accuracy(args)
    if args.full_size:
        full_size(args)


if __name__ == "__main__":
    main()
