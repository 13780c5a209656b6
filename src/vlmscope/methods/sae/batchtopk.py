"""BatchTopK SAE (Bussmann et al. 2024): TopK over the whole batch instead of per row.

Training keeps the k · batch largest ReLU'd pre-activations of the batch, so rows may use more or
fewer than k latents (mean k). Inference cannot see a batch, so it uses a threshold θ instead —
h = pre · 1[pre > θ] — estimated during training as a running mean of the smallest activation
the batch top-k kept (first batch: that value; then an exponential moving average, rate 0.01).
θ is stored per latent (all equal), which is exactly a SAELens JumpReLU file; AuxK as in topk.py.
With the batch split over ranks (`LossContext.dist`), the top-k and θ's update are taken over the
whole batch: the ranks share their candidates for the k · rows largest and their smallest kept value.
"""

from __future__ import annotations

import torch

from vlmscope.methods.sae.base import LossContext, SAEConfig, StepOut
from vlmscope.methods.sae.topk import TopKSAE

THRESHOLD_RATE = 0.01


def batch_topk_relu(pre: torch.Tensor, k: int, dist=None) -> torch.Tensor:
    """Keep the k · rows largest ReLU'd entries of the whole (rows, d_sae) batch; with `dist`
    (a scale.distributed.Dist, every rank holding as many rows) of the batch over all ranks."""
    acts = pre.relu()
    flat = acts.flatten()
    if dist is None or not dist.many:
        vals, idx = flat.topk(min(k * pre.shape[0], flat.numel()), sorted=False)
        return torch.zeros_like(flat).scatter(0, idx, vals).view_as(pre)
    from vlmscope.scale.distributed import gather_rows

    n = k * pre.shape[0] * dist.world_size  # kept over the whole batch
    mine = flat.detach().topk(min(n, flat.numel())).values  # the global top n has at most n from here
    every = gather_rows(mine, dist)
    cut = every.topk(min(n, every.numel())).values[-1]  # the n-th largest of the whole batch
    above, tied = flat > cut, flat == cut  # ties (duplicate rows) are kept in rank order up to n in all
    counts = gather_rows(torch.stack([above.sum(), tied.sum()])[None], dist)  # (world, 2)
    spare = n - int(counts[:, 0].sum()) - int(counts[:dist.rank, 1].sum())
    keep = above | (tied & (tied.cumsum(0) <= spare))
    return (flat * keep).view_as(pre)


@torch.no_grad()
def _kept_min(acts: torch.Tensor) -> torch.Tensor:
    """The smallest positive activation (inf when none fired)."""
    kept = acts[acts > 0]
    return kept.min() if kept.numel() else acts.new_tensor(float("inf"))


class BatchTopKSAE(TopKSAE):
    """TopK's loss and AuxK; a batch-wide top-k in training, a threshold at inference."""

    architecture = "batchtopk"

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        self.register_buffer("threshold", torch.zeros(cfg.d_sae))  # (d_sae,), all equal

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        return pre.relu() * (pre > self.threshold)

    def train_activate(self, pre: torch.Tensor, ctx: LossContext | None = None) -> torch.Tensor:
        return batch_topk_relu(pre, self.cfg.k, ctx.dist if ctx is not None else None)

    def train_step(self, x: torch.Tensor, ctx: LossContext) -> StepOut:
        out = super().train_step(x, ctx)
        low = _kept_min(out.acts)
        if ctx.dist is not None:
            from vlmscope.scale.distributed import all_reduce

            low = all_reduce(low, ctx.dist, "min")
        out.parts["kept_min"] = low  # the smallest kept activation of the whole batch: θ's update
        return out

    @torch.no_grad()
    def after_step(self, out: StepOut) -> None:
        low = out.parts["kept_min"] if "kept_min" in out.parts else _kept_min(out.acts)
        if not bool(torch.isfinite(low)):
            return
        first = bool((self.threshold == 0).all())
        self.threshold.copy_(low.expand_as(self.threshold) if first
                             else (1 - THRESHOLD_RATE) * self.threshold + THRESHOLD_RATE * low)
