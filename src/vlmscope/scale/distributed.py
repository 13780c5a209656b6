"""Many processes through torch.distributed: one process per device, started by torchrun.

`init()` joins the process group torchrun (or `srun torchrun` under SLURM) describes in the
environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT): gloo carries CPU tensors and, where
CUDA is available, NCCL carries CUDA ones (one backend per device type). Without torchrun it
starts nothing and returns the one-process `Dist()`. Every collective here is the identity for
one process, so code that calls them reads the same either way and a single process does exactly
what it did before. Used by the activation store (each rank writes its own shards) and the SAE
trainer (DistributedDataParallel plus the statistics that are not gradients).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

MAX_DIMS = 4  # gather_rows: trailing dimensions a gathered tensor may have


@dataclass(frozen=True)
class Dist:
    """Where this process sits: its rank among `world_size` processes, and the device it computes on
    (cuda:<local_rank> when CUDA is available under torchrun, else cpu)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes shared files and prints."""
        return self.rank == 0

    @property
    def many(self) -> bool:
        return self.world_size > 1


def launched() -> bool:
    """Whether torchrun started this process as one of several (WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def init(timeout_s: float = 1800.0) -> Dist:
    """Join torchrun's process group (once) and return this process's `Dist`; one process: `Dist()`."""
    if dist.is_available() and dist.is_initialized():
        return current()
    if not launched():
        return Dist()
    cuda = torch.cuda.is_available()
    if cuda:
        local, gpus = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
        if local >= gpus:
            raise RuntimeError(f"local rank {local} has no GPU of its own ({gpus} visible): start at most {gpus} "
                               "processes per node, or hide the GPUs (CUDA_VISIBLE_DEVICES=) to run on the CPU")
        torch.cuda.set_device(local)
    dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    return current()


def current() -> Dist:
    """This process's `Dist` from the initialised process group, or `Dist()` when there is none."""
    if not (dist.is_available() and dist.is_initialized()):
        return Dist()
    rank = dist.get_rank()
    local = int(os.environ.get("LOCAL_RANK", rank))
    cuda = torch.cuda.is_available() and "nccl" in str(dist.get_backend()).lower()
    return Dist(rank, dist.get_world_size(), local, f"cuda:{local}" if cuda else "cpu")


@contextmanager
def session(timeout_s: float = 1800.0) -> Iterator[Dist]:
    """`init()` for a `with` block (a command's run): leaves the group at the end if it joined it."""
    joined = launched() and not (dist.is_available() and dist.is_initialized())
    d = init(timeout_s)
    try:
        yield d
    finally:
        if joined:
            shutdown()


def shutdown() -> None:
    """Leave the process group, if one was joined."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(d: Dist) -> None:
    """Wait for every rank (an all-reduce of one CPU number: gloo, whatever the GPU backend)."""
    if d.many:
        dist.all_reduce(torch.zeros(1))


def all_reduce(t: torch.Tensor, d: Dist, op: str = "sum") -> torch.Tensor:
    """`t` reduced over ranks ("sum", "max" or "min"); a new tensor, `t` itself for one process."""
    if not d.many:
        return t
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
    if op not in ops:
        raise ValueError(f"unknown reduction {op!r}; valid: {', '.join(ops)}")
    out = t.detach().clone()
    dist.all_reduce(out, ops[op])
    return out


def mean(t: torch.Tensor, d: Dist) -> torch.Tensor:
    """The mean of `t` over ranks (every rank holding the same number of rows)."""
    return all_reduce(t, d) / d.world_size if d.many else t


def gather_rows(t: torch.Tensor, d: Dist) -> torch.Tensor:
    """Every rank's rows concatenated in rank order (ranks may hold different numbers of rows, none
    at all included: a rank's empty tensor takes the others' trailing shape)."""
    if not d.many:
        return t
    meta = torch.full((MAX_DIMS + 1,), -1, dtype=torch.long, device=t.device)
    if t.numel() or t.dim() > 1:
        if t.dim() - 1 > MAX_DIMS:
            raise ValueError(f"gather_rows takes at most {MAX_DIMS} trailing dimensions, got shape {tuple(t.shape)}")
        meta[0] = t.shape[0]
        meta[1:t.dim()] = torch.tensor(t.shape[1:], dtype=torch.long)
    metas = [torch.empty_like(meta) for _ in range(d.world_size)]
    dist.all_gather(metas, meta)
    shapes = [m for m in metas if m[0] >= 0]
    if not shapes:
        return t
    trail = [int(s) for s in shapes[0][1:] if s >= 0]
    counts = [max(int(m[0]), 0) for m in metas]
    local = t.reshape(0, *trail) if counts[d.rank] == 0 else t
    padded = local.new_zeros(max(counts), *trail)
    padded[:counts[d.rank]] = local
    parts = [torch.empty_like(padded) for _ in range(d.world_size)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:n] for p, n in zip(parts, counts, strict=True)])


def part(n: int, rank: int, world_size: int) -> range:
    """Rank `rank`'s contiguous share of range(n): concatenated in rank order, the shares are range(n)."""
    return range(n * rank // world_size, n * (rank + 1) // world_size)


def ddp(module: nn.Module, d: Dist) -> nn.Module:
    """`module` wrapped in DistributedDataParallel (rank 0's weights copied to every rank, gradients
    averaged over ranks in backward, buffers copied from rank 0 before each forward); the module
    itself for one process. The module already sits on the rank's device and so must its inputs
    (no device_ids: DDP moves nothing)."""
    if not d.many:
        return module
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(module)
