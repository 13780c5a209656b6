"""Measuring a job's memory: every tensor it makes, when it is made and when it is freed.

`peak_memory(model, inputs)` is a context manager around any job (a cached run, a patching sweep,
AtP, SAE training). Inside it a TorchDispatchMode sees the output of every operation; a storage that
no input of the operation shares is new memory, counted from that moment until its storage is
freed (a `weakref.finalize` on the storage). The peak of those live bytes, plus the bytes the job
holds from the start (weights, inputs), is what a device with no fragmentation must hold: the
true peak of live tensor bytes, on CPU as on an accelerator (where allocator overhead comes on top),
and on the `meta` device too, where the same accounting plans a job without running it (plan.py).

At the peak the live bytes are split by what they are (`CATEGORIES`), from when they were made:
inside a backward (gradients), as an attention matrix (T x T), or in a model forward they then
outlived (kept for a later backward, or a cache or output).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

CATEGORIES = ("weights", "inputs", "cache & outputs", "activations", "attention", "saved for backward",
              "gradients")
MAX_HEADS = 256  # a 4-d (batch, heads, T, T) tensor with at most this many heads is an attention matrix


def tensors_in(obj, out: list | None = None) -> list[torch.Tensor]:
    """The tensors in nested tuples, lists and dicts (an operation's arguments or outputs); faster
    than pytree, which matters when it runs for every operation."""
    out = [] if out is None else out
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            tensors_in(x, out)
    elif isinstance(obj, dict):
        for x in obj.values():
            tensors_in(x, out)
    return out


def _key(t: torch.Tensor):
    try:
        return t.untyped_storage()._cdata
    except (RuntimeError, NotImplementedError):  # a tensor without storage (sparse, nested)
        return None


def held_bytes(*objects) -> int:
    """Bytes of the distinct storages behind modules' parameters and buffers and any tensors given
    (in mappings, sequences or alone); storages shared (tied weights, views) count once."""
    seen: dict[int, int] = {}
    for obj in objects:
        if isinstance(obj, nn.Module):
            tensors = [*obj.parameters(), *obj.buffers()]
        else:
            tensors = tensors_in(obj)
        for t in tensors:
            k = _key(t)
            if k is not None:
                seen[k] = t.untyped_storage().nbytes()
    return sum(seen.values())


@dataclass
class _Alloc:
    nbytes: int
    made: int  # event index
    tag: str | None  # a category the job named, else None (categorised from the fields below)
    forward: int  # the model forward it was made in, -1 outside any
    backward: bool  # made inside a backward
    attention: bool  # shaped (batch, heads, T, T)
    freed: int | None = None
    freed_in_backward: bool = False


def _is_attention(t: torch.Tensor) -> bool:
    return t.dim() == 4 and t.shape[-1] == t.shape[-2] > 1 and t.shape[1] <= MAX_HEADS


class LiveBytes(TorchDispatchMode):
    """Records the lifetime of every storage made inside it (see the module docstring)."""

    def __init__(self):
        super().__init__()
        self.allocs: list[_Alloc] = []
        self.live = 0
        self.now = 0
        self.peak, self.peak_at = 0, 0
        self.phase = "forward"  # a job may name its phases; a backward always counts as "backward"
        self.phase_peaks: dict[str, tuple[int, int]] = {}  # phase -> (live bytes, event) at its peak
        self.tag: str | None = None
        self.forwards, self.in_forward = 0, False
        self.forward_ends: dict[int, int] = {}
        self._tracked: dict[int, tuple[_Alloc, weakref.finalize]] = {}

    # --- what the job tells the tracker ---------------------------------------------------------
    @contextmanager
    def phase_of(self, phase: str, tag: str | None = None) -> Iterator[None]:
        """Allocations inside are part of `phase` (and, with `tag`, of that category)."""
        old = self.phase, self.tag
        self.phase, self.tag = phase, tag
        try:
            yield
        finally:
            self.phase, self.tag = old

    def watch(self, model: nn.Module) -> list:
        """Hooks marking where the model's forwards start and end; remove them when done."""
        def start(module, args):
            self.forwards += 1
            self.in_forward = True

        def end(module, args, out):
            self.forward_ends[self.forwards] = self.now
            self.in_forward = False

        return [model.register_forward_pre_hook(start), model.register_forward_hook(end, always_call=True)]

    # --- the accounting ---------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        seen = {_key(t) for t in tensors_in((args, kwargs))}
        for t in tensors_in(out):
            self._record(t, seen)
        return out

    def _record(self, t: torch.Tensor, seen: set) -> None:
        k = _key(t)
        if k is None or k in seen or k in self._tracked:
            return
        storage = t.untyped_storage()
        n = storage.nbytes()
        if n == 0:
            return
        self.now += 1
        backward = torch._C._current_graph_task_id() != -1
        a = _Alloc(n, self.now, self.tag, self.forwards if self.in_forward else -1, backward, _is_attention(t))
        self.allocs.append(a)
        self._tracked[k] = (a, weakref.finalize(storage, self._free, k))
        self.live += n
        phase = "backward" if backward and self.tag is None else self.phase
        if self.live > self.phase_peaks.get(phase, (-1, 0))[0]:
            self.phase_peaks[phase] = (self.live, self.now)
        if self.live > self.peak:
            self.peak, self.peak_at = self.live, self.now

    def _free(self, key: int) -> None:
        a, _ = self._tracked.pop(key, (None, None))
        if a is None:
            return
        self.now += 1
        a.freed = self.now
        a.freed_in_backward = torch._C._current_graph_task_id() != -1
        self.live -= a.nbytes

    def close(self) -> None:
        """Stop following the storages still alive (what the job kept): their records stay unfreed."""
        for _, fin in self._tracked.values():
            fin.detach()
        self._tracked.clear()

    def category(self, a: _Alloc) -> str:
        if a.tag is not None:
            return a.tag
        if a.backward:
            return "gradients"
        if a.attention:
            return "attention"
        end = self.forward_ends.get(a.forward)
        if a.forward >= 0 and (a.freed is None or end is None or a.freed > end):
            return "saved for backward" if a.freed_in_backward else "cache & outputs"
        return "activations"

    def breakdown(self, at: int) -> dict[str, int]:
        """Live bytes at event `at`, by category."""
        out: dict[str, int] = {}
        for a in self.allocs:
            if a.made <= at and (a.freed is None or a.freed > at):
                c = self.category(a)
                out[c] = out.get(c, 0) + a.nbytes
        return out


@dataclass(frozen=True)
class Measured:
    """A job's memory: what it held from the start, and the most it made alive at once."""

    held: dict[str, int]  # bytes alive before the job that it uses: {"weights": ..., "inputs": ...}
    at_peak: dict[str, int]  # bytes the job made that were alive at its peak, by category
    phases: dict[str, dict[str, int]] = field(default_factory=dict)  # each phase's own peak, likewise

    @property
    def made(self) -> int:
        return sum(self.at_peak.values())

    @property
    def peak(self) -> int:
        """held + made: the live tensor bytes at the job's peak."""
        return sum(self.held.values()) + self.made

    def __repr__(self) -> str:
        return f"Measured(peak={self.peak / 2**20:.1f} MiB, held={sum(self.held.values()) / 2**20:.1f} MiB)"


class Measurement:
    """What `peak_memory` yields: the tracker while the job runs, `result` once it has ended."""

    def __init__(self, tracker: LiveBytes, held: dict[str, int]):
        self.tracker, self.held = tracker, held
        self.result: Measured | None = None


@contextmanager
def peak_memory(model: nn.Module | None = None, inputs=None) -> Iterator[Measurement]:
    """Track the tensors made inside the block; `m.result` (a `Measured`) holds the peak after it.
    `model` and `inputs` are what the job holds from the start (counted once, shared storages once);
    the model's forwards are watched so memory kept past a forward is told from transient memory."""
    held = {"weights": held_bytes(model) if model is not None else 0,
            "inputs": held_bytes(inputs) if inputs is not None else 0}
    tracker = LiveBytes()
    m = Measurement(tracker, held)
    handles = tracker.watch(model) if model is not None else []
    try:
        with tracker:
            yield m
    finally:
        tracker.close()
        for h in handles:
            h.remove()
    phases = {p: tracker.breakdown(at) for p, (_, at) in tracker.phase_peaks.items()}
    m.result = Measured(held, tracker.breakdown(tracker.peak_at), phases)
