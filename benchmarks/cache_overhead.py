"""Cache overhead: a plain forward vs caching every `lm.blocks.*.resid_post`, in vlmscope and peers.

Two random `LlavaForConditionalGeneration` models are built here (real transformers configs, random
init, `.eval()`, like `vlmscope.testing.tiny_llava`):

  small  LM hidden 128 x 4 layers, CLIP 64 x 2 layers, 56 px / 14 px patches (16 image tokens), batch 2
  mid    LM hidden 384 x 6 layers, CLIP 192 x 4 layers, 224 px / 14 px patches (256 image tokens), batch 2

For each model it times a plain forward (`with torch.no_grad(): model(**inputs)`) against two
controls (the plain forward of another copy, and of a copy switched to eager attention) and:

  vlmscope         m.run_with_cache(inputs, sites="lm.blocks.*.resid_post")
  nnsight          NNsight(model).trace(**inputs), `.output.save()` on each model.language_model.layers[i]
  pyvene           IntervenableModel with a CollectIntervention on each layer's output
  TransformerLens  TransformerBridge.boot_transformers(..., hf_model=model),
                   run_with_cache(names_filter=[blocks.{i}.hook_out ...]), and the bridge's forward alone

`--everything` adds vlmscope caching every site and TransformerLens caching every hook.

Every tool runs under `torch.no_grad()` on its own deep copy of the model (nnsight wraps the modules
of the model it hosts for good, pyvene strips every forward hook from it, TransformerLens switches it
to eager attention; vlmscope changes nothing but gets a copy too), and is paired with the plain
forward of another pristine copy, so that in every pair both models are equally cold in the CPU
cache. Before timing, each tool's cached tensors are checked against vlmscope's (`torch.equal`,
else `torch.allclose`).

Method: one torch thread; warm-up; then interleaved pairs (plain, tool), the order alternating from
pair to pair, tools rotating within a round; the heap frozen after warm-up (`gc.freeze`) and garbage
collected only between pairs. Reported per tool: the median of the per-pair wall-clock ratios
tool / plain (with the 25th-75th percentile), the median of the per-pair process-CPU-time ratios
(less sensitive to a busy neighbour), the mean of the tool's fastest quarter of calls over plain's
fastest quarter in the same pairs (the calls a neighbour disturbed least), the median milliseconds, and
the bytes the tool's result keeps alive (unique tensor storages) against the bytes of the requested
activations.

    python benchmarks/cache_overhead.py            # full run (about 5 minutes on a busy 2-core box)
    python benchmarks/cache_overhead.py --quick    # a fast smoke run
    python benchmarks/cache_overhead.py --models small --pairs 100 --everything

Run it by file name: nnsight compiles its `with` blocks from the source file, so it cannot trace
code piped through stdin. Never turn these timings into test assertions.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is built locally; never reach the hub
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore")

import torch  # noqa: E402

import vlmscope as vs  # noqa: E402

IMAGE_TOKEN = 100
SITES = "lm.blocks.*.resid_post"


# --- models ------------------------------------------------------------------------------------------

SIZES = {
    #        LM hidden, layers, heads, kv heads | CLIP hidden, layers, heads | image px | text tokens
    "small": dict(lm=(128, 4, 4, 2), vision=(64, 2, 4), image=56, text_len=8, vocab=128),
    "mid": dict(lm=(384, 6, 6, 2), vision=(192, 4, 3), image=224, text_len=16, vocab=1024),
}


def build_llava(size: str, seed: int = 0):
    """A random LlavaForConditionalGeneration of the given size, in eval mode."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    s = SIZES[size]
    d, n, h, kv = s["lm"]
    vd, vn, vh = s["vision"]
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=vd, intermediate_size=4 * vd, num_hidden_layers=vn,
                                       num_attention_heads=vh, image_size=s["image"], patch_size=14),
        text_config=LlamaConfig(hidden_size=d, intermediate_size=int(8 / 3 * d), num_hidden_layers=n,
                                num_attention_heads=h, num_key_value_heads=kv, vocab_size=s["vocab"],
                                bos_token_id=1, eos_token_id=2, pad_token_id=0),
        image_token_index=IMAGE_TOKEN, vision_feature_layer=-2, vision_feature_select_strategy="default",
    )
    cfg.architectures = ["LlavaForConditionalGeneration"]  # what a saved checkpoint carries
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(cfg).eval()


def llava_inputs(model, batch: int = 2, text_len: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    """[bos] + image tokens + random text ids, one image per row (as vlmscope.testing.llava_inputs)."""
    from vlmscope.testing import llava_inputs as build

    return build(model, batch=batch, text_len=text_len, seed=seed)


# --- what a result keeps alive -----------------------------------------------------------------------


def _tensors(obj: Any, seen: dict[int, Any] | None = None):
    """Every tensor reachable from obj through mappings, sequences and the usual cache classes."""
    seen = {} if seen is None else seen
    if id(obj) in seen:
        return
    seen[id(obj)] = obj  # kept alive, so that no later object reuses its id
    if isinstance(obj, torch.Tensor):
        yield obj
        return
    if isinstance(obj, vs.Cache):
        yield from _tensors(dict(obj), seen)
        yield from _tensors(obj.grads, seen)
        yield from _tensors(obj.kept, seen)
        return
    inner = getattr(obj, "cache_dict", None)  # TransformerLens ActivationCache
    if isinstance(inner, Mapping):
        yield from _tensors(inner, seen)
        return
    if isinstance(obj, Mapping):
        for v in obj.values():
            yield from _tensors(v, seen)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v, seen)


def held_bytes(obj: Any) -> int:
    """Bytes of the unique tensor storages `obj` keeps alive (a view of a big buffer holds it all)."""
    storages: dict[tuple[str, int], int] = {}
    for t in _tensors(obj):
        s = t.untyped_storage()
        storages[(str(t.device), s.data_ptr())] = s.nbytes()
    return sum(storages.values())


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


# --- the tools -----------------------------------------------------------------------------------------


@dataclass
class Tool:
    name: str
    run: Callable[[], Any]  # timed: one forward that caches; returns what the user keeps
    acts: Callable[[Any], list[torch.Tensor]] | None  # the cached resid_post tensors, in layer order
    prep: Callable[[], None] | None = None  # untimed, before each timed call
    plain: Callable[[], Any] | None = None  # the plain forward it is paired with (its own copy)
    note: str = ""
    ratios: list[float] = field(default_factory=list)  # wall-clock tool / plain, one per pair
    cpu_ratios: list[float] = field(default_factory=list)  # process CPU time tool / plain
    ms: list[float] = field(default_factory=list)
    plain_ms: list[float] = field(default_factory=list)  # the plain halves of this tool's pairs
    match: str = ""
    held: int = 0
    cached: int = 0  # bytes of the tensors it returns, each counted by its own size
    every: bool = False  # caches everything: held is compared with its own tensors' bytes


@dataclass
class Skipped:
    name: str
    why: str


def setup_control(model, inputs, n_layers, eager: bool = False):
    """The plain forward of another copy (the noise floor), or of a copy running eager attention."""
    host = copy.deepcopy(model)
    if eager:
        host.set_attn_implementation("eager")

    def run():
        with torch.no_grad():
            host(**inputs)

    if eager:
        return Tool("plain, eager attention (control)", run=run, acts=None,
                    note="no caching; the attention TransformerLens runs the model with")
    return Tool("plain, another copy (control)", run=run, acts=None, note="no caching: the noise floor")


def setup_vlmscope(model, inputs, n_layers):
    m = vs.load(copy.deepcopy(model))  # a copy like every tool's, so all are equally cold in the cache
    return Tool("vlmscope", run=lambda: m.run_with_cache(inputs, sites=SITES)[1],
                acts=lambda cache: [cache[f"lm.blocks.{i}.resid_post"] for i in range(n_layers)])


def setup_vlmscope_everything(model, inputs, n_layers):
    m = vs.load(copy.deepcopy(model))
    return Tool("vlmscope, every site", run=lambda: m.run_with_cache(inputs)[1],
                acts=lambda cache: [cache[f"lm.blocks.{i}.resid_post"] for i in range(n_layers)],
                note=f"all {len(m.sites())} sites (vision, connector, lm, incl. attn.pattern)", every=True)


def setup_nnsight(model, inputs, n_layers):
    from nnsight import NNsight

    host = NNsight(copy.deepcopy(model))  # nnsight wraps the modules of the model it hosts

    def run():
        saved = []
        with torch.no_grad():
            with host.trace(**inputs):
                for i in range(n_layers):
                    saved.append(host.model.language_model.layers[i].output.save())
        return saved

    return Tool("nnsight", run=run, acts=lambda saved: [s[0] if isinstance(s, tuple) else s for s in saved])


def _rearm_output_capture(model) -> None:
    """transformers 5 installs its output-capturing forward hooks once, lazily, and marks each
    sub-model `_output_capturing_hooks_installed`. pyvene removes *every* forward hook of the model
    at the start and end of each call, so from the second call on LLaVA's vision tower returns no
    hidden states (IndexError in get_image_features). Clearing the mark lets the next call reinstall
    them; the reinstall then happens inside the timed call."""
    for mod in model.modules():
        if getattr(mod, "_output_capturing_hooks_installed", False):
            mod._output_capturing_hooks_installed = False


def setup_pyvene(model, inputs, n_layers):
    import pyvene as pv

    host = copy.deepcopy(model)  # pyvene strips every forward hook from the model it hosts
    cfgs = [{"layer": i, "component": f"model.language_model.layers[{i}].output",
             "intervention_type": pv.CollectIntervention} for i in range(n_layers)]
    iv = pv.IntervenableModel(cfgs, model=host)
    iv.disable_model_gradients()

    def run():
        with torch.no_grad():
            (_, collected), _ = iv(base=inputs, unit_locations=None)
        return collected

    # Does it run twice as it comes? (It does not with transformers 5.x: see _rearm_output_capture.)
    as_is = "runs on every call"
    try:
        _rearm_output_capture(host)  # as on a fresh, never-run model: its first call works
        run()
        run()
    except Exception as e:  # noqa: BLE001
        as_is = f"a 2nd call fails ({type(e).__name__}: {e})"
    return Tool("pyvene", run=run, acts=lambda collected: list(collected),
                prep=lambda: _rearm_output_capture(host),
                note=f"as is, {as_is}; timed with transformers' capture hooks re-armed before each call, so "
                     f"each timed call reinstalls them ({_reinstall_ms(model, inputs):.2f} ms of it)")


def _reinstall_ms(model, inputs) -> float:
    """What transformers' lazy reinstall of its output-capturing hooks costs (best of 20)."""
    from transformers.utils.output_capturing import install_all_output_capturing_hooks

    scratch = copy.deepcopy(model)
    with torch.no_grad():
        scratch(**inputs)  # installs them, and marks the sub-models that have them
    subs = [m for m in scratch.modules() if getattr(m, "_output_capturing_hooks_installed", False)]
    best = float("inf")
    for _ in range(20):
        for mod in scratch.modules():  # what pyvene leaves: no forward hooks at all
            mod._forward_hooks.clear()
        t0 = time.perf_counter()
        for sub in subs:
            install_all_output_capturing_hooks(sub)
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def _tl_host(model, image_size):
    """A TransformerBridge over a deep copy of `model`, offline: the bridge reads the tokenizer and
    processor from `model_name`, so a local folder holding a word-level LlavaProcessor stands in."""
    import transformer_lens.model_bridge.sources.transformers.helpers as tl_helpers
    from transformer_lens.model_bridge import TransformerBridge

    from vlmscope.testing import word_processor

    # When AutoProcessor fails, TL 4.3 pip-installs torchvision on the fly; never let a benchmark do that.
    tl_helpers._ensure_torchvision = lambda: False
    folder = tempfile.mkdtemp(prefix="vlmscope-bench-tl-")
    word_processor(["a", "b", "c"], image_size=image_size, patch_size=14).save_pretrained(folder)
    host = copy.deepcopy(model)
    bridge = TransformerBridge.boot_transformers(folder, hf_model=host, device="cpu")
    return bridge, host


def setup_transformer_lens_forward(model, inputs, n_layers):
    bridge, host = _tl_host(model, model.config.vision_config.image_size)
    kw = {k: v for k, v in inputs.items() if k != "input_ids"}

    def run():
        with torch.no_grad():
            bridge(inputs["input_ids"], **kw)

    return Tool("TransformerLens, forward without cache", run=run, acts=None,
                note="what hosting the model in the bridge costs by itself")


def setup_transformer_lens(model, inputs, n_layers, everything: bool = False):
    bridge, host = _tl_host(model, model.config.vision_config.image_size)
    names = [f"blocks.{i}.hook_out" for i in range(n_layers)]
    kw = {k: v for k, v in inputs.items() if k != "input_ids"}

    def run():
        with torch.no_grad():
            _, cache = bridge.run_with_cache(inputs["input_ids"], names_filter=None if everything else names,
                                             **kw)
        return cache

    impl = host.config._attn_implementation
    name = "TransformerLens, every hook" if everything else "TransformerLens"
    note = f"TransformerBridge; the hosted model runs {impl} attention (plain runs sdpa)"
    if everything:
        note += f"; {len(bridge.hook_dict)} hooks"
    return Tool(name, run=run, acts=lambda cache: [cache[n] for n in names], note=note, every=everything)


# --- timing ----------------------------------------------------------------------------------------


def _timed(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    """Wall-clock and process CPU seconds of one call, and its result (freed by the caller, untimed)."""
    c0, t0 = time.process_time(), time.perf_counter()
    r = fn()
    t1, c1 = time.perf_counter(), time.process_time()
    return t1 - t0, c1 - c0, r


def _compare(ref: list[torch.Tensor], got: list[torch.Tensor]) -> str:
    if len(ref) != len(got):
        return f"MISMATCH: {len(got)} tensors for {len(ref)} sites"
    pairs = list(zip(ref, got, strict=True))
    if all(a.shape == b.shape and torch.equal(a, b) for a, b in pairs):
        return "equal"
    if all(a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in pairs):
        worst = max(float((a - b).abs().max()) for a, b in pairs)
        return f"allclose (max |diff| {worst:.0e})"
    return "MISMATCH: " + ", ".join(f"{tuple(b.shape)}" for b in got)


def bench_model(size: str, pairs: int, warmup: int, everything: bool, only: set[str] | None) -> dict:
    model = build_llava(size)
    inputs = llava_inputs(model, batch=2, text_len=SIZES[size]["text_len"])
    n_layers = model.config.text_config.num_hidden_layers

    def plain_of(host):
        def plain():
            with torch.no_grad():
                return host(**inputs)
        return plain

    setups: list[tuple[str, Callable[[], Tool]]] = [
        ("control", lambda: setup_control(model, inputs, n_layers)),
        ("control", lambda: setup_control(model, inputs, n_layers, eager=True)),
        ("vlmscope", lambda: setup_vlmscope(model, inputs, n_layers)),
        ("nnsight", lambda: setup_nnsight(model, inputs, n_layers)),
        ("pyvene", lambda: setup_pyvene(model, inputs, n_layers)),
        ("TransformerLens", lambda: setup_transformer_lens(model, inputs, n_layers)),
        ("TransformerLens", lambda: setup_transformer_lens_forward(model, inputs, n_layers)),
    ]
    if everything:
        setups += [
            ("vlmscope, every site", lambda: setup_vlmscope_everything(model, inputs, n_layers)),
            ("TransformerLens, every hook", lambda: setup_transformer_lens(model, inputs, n_layers, True)),
        ]
    tools: list[Tool] = []
    skipped: list[Skipped] = []
    ref = setup_vlmscope(model, inputs, n_layers)
    ref_acts = ref.acts(ref.run())
    requested = nbytes(ref_acts)
    for name, setup in setups:
        if only and name.split(",")[0] not in only:
            continue
        try:
            tool = setup()
            if tool.prep:
                tool.prep()
            result = tool.run()
            if tool.acts is not None:
                tool.match = _compare(ref_acts, tool.acts(result))
                tool.held, tool.cached = held_bytes(result), nbytes(_tensors(result))
            del result
            # Each tool is paired with a plain forward of its own pristine copy: a model that runs in
            # every pair stays warm in the CPU cache while each tool's copy runs once a round, which
            # made any tool look 2-5% slower than it is (measured with the control row).
            tool.plain = plain_of(copy.deepcopy(model))
            tools.append(tool)
        except ImportError as e:
            skipped.append(Skipped(name, f"not installed ({e.name}); pip install -e '.[bench]'"))
        except Exception as e:  # noqa: BLE001 - a peer that cannot host the model is a result, not a crash
            last = traceback.extract_tb(e.__traceback__)[-1]
            skipped.append(Skipped(name, f"{type(e).__name__}: {str(e).splitlines()[0][:160]} "
                                         f"(at {os.path.basename(last.filename)}:{last.lineno})"))

    for _ in range(warmup):
        for tool in tools:
            tool.plain()
            if tool.prep:
                tool.prep()
            tool.run()
    plain_ms: list[float] = []
    # Collecting garbage walks the whole heap (transformers, nnsight and TransformerLens objects) and
    # leaves the CPU caches cold for the next call: measured, it slowed that call by 20-30%. Freeze
    # what exists now, so the collection after each pair walks only that pair's garbage.
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        for p in range(pairs):
            k = p % max(len(tools), 1)
            for j, tool in enumerate(tools[k:] + tools[:k]):
                if tool.prep:
                    tool.prep()
                if (p + j) % 2 == 0:
                    tp, cp, r0 = _timed(tool.plain)
                    tt, ct, r1 = _timed(tool.run)
                else:
                    tt, ct, r1 = _timed(tool.run)
                    tp, cp, r0 = _timed(tool.plain)
                del r0, r1
                tool.ratios.append(tt / tp)
                tool.cpu_ratios.append(ct / cp)
                tool.ms.append(tt * 1e3)
                tool.plain_ms.append(tp * 1e3)
                plain_ms.append(tp * 1e3)
                gc.collect()
    finally:
        gc.unfreeze()
        gc.enable()
    return dict(size=size, model=model, inputs=inputs, tools=tools, skipped=skipped, requested=requested,
                plain_ms=plain_ms, pairs=pairs)


# --- report ------------------------------------------------------------------------------------------


def _q(xs: list[float], q: float) -> float:
    return statistics.quantiles(xs, n=4)[int(q * 4) - 1] if len(xs) >= 4 else statistics.median(xs)


def _fastest(ms: list[float]) -> float:
    """Mean of the fastest quarter: the calls a busy neighbour disturbed least."""
    k = max(1, len(ms) // 4)
    return statistics.fmean(sorted(ms)[:k])


def describe(model, inputs) -> str:
    c = model.config
    t, v = c.text_config, c.vision_config
    seq = inputs["input_ids"].shape[1]
    n_img = int((inputs["input_ids"][0] == IMAGE_TOKEN).sum())
    return (f"LM {t.hidden_size} x {t.num_hidden_layers} layers, CLIP {v.hidden_size} x "
            f"{v.num_hidden_layers} layers, {v.image_size} px / {v.patch_size} px patches ({n_img} image "
            f"tokens), batch "
            f"{inputs['input_ids'].shape[0]} x {seq} tokens")


def table(res: dict) -> str:
    mib = 2**20
    lines = [
        f"**{res['size']}** — {describe(res['model'], res['inputs'])}; plain forward median "
        f"{statistics.median(res['plain_ms']):.2f} ms; {res['pairs']} pairs per tool; requested activations "
        f"{res['requested'] / mib:.3f} MiB",
        "",
        "| tool | wall / plain (median, IQR) | CPU / plain | fastest / fastest | median ms | held MiB "
        "| held / requested | cached = vlmscope? | notes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for t in res["tools"]:
        r = t.ratios
        wanted = t.cached if t.every else res["requested"]
        mem = (f"{t.held / mib:.3f} | {t.held / wanted:.2f}x{' of its own tensors' if t.every else ''} | "
               f"{t.match}" if t.acts is not None else "- | - | -")
        lines.append(
            f"| {t.name} | {statistics.median(r):.3f}x ({_q(r, .25):.3f}-{_q(r, .75):.3f}) | "
            f"{statistics.median(t.cpu_ratios):.3f}x | {_fastest(t.ms) / _fastest(t.plain_ms):.3f}x | "
            f"{statistics.median(t.ms):.2f} | {mem} | {t.note} |")
    for s in res["skipped"]:
        lines.append(f"| {s.name} | cannot host this model | - | - | - | - | - | - | {s.why} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="few pairs, for a smoke run")
    ap.add_argument("--models", default="small,mid", help="comma-separated: small, mid")
    ap.add_argument("--pairs", type=int, default=None, help="pairs per tool, small model (default 100)")
    ap.add_argument("--mid-pairs", type=int, default=None, help="pairs per tool, mid model (default 30)")
    ap.add_argument("--tools", default=None,
                    help="comma-separated subset: control,vlmscope,nnsight,pyvene,TransformerLens")
    ap.add_argument("--everything", action="store_true",
                    help="also time vlmscope caching every site and TransformerLens caching every hook")
    args = ap.parse_args(argv)

    torch.set_num_threads(1)
    small_pairs = args.pairs or (8 if args.quick else 100)
    mid_pairs = args.mid_pairs or (3 if args.quick else 30)
    only = set(args.tools.split(",")) if args.tools else None
    print(f"python {platform.python_version()}, torch {torch.__version__} ({torch.get_num_threads()} "
          f"thread), {_versions()}", file=sys.stderr)
    out = []
    for size in args.models.split(","):
        pairs = small_pairs if size == "small" else mid_pairs
        t0 = time.perf_counter()
        res = bench_model(size, pairs, warmup=2 if args.quick else 5, everything=args.everything, only=only)
        print(f"[{size}: {time.perf_counter() - t0:.0f} s]", file=sys.stderr)
        out.append(table(res))
        print(out[-1] + "\n", flush=True)
    return 0


def _versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    got = []
    for pkg in ("transformers", "nnsight", "pyvene", "transformer-lens"):
        try:
            got.append(f"{pkg} {version(pkg)}")
        except PackageNotFoundError:
            got.append(f"{pkg} -")
    return ", ".join(got)


if __name__ == "__main__":
    sys.exit(main())
