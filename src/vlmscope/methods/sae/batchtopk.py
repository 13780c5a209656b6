"""BatchTopK SAE (Bussmann et al. 2024): TopK over the whole batch instead of per row.

Training keeps the k · batch largest ReLU'd pre-activations of the batch, so rows may use more or
fewer than k latents (mean k). Inference cannot see a batch, so it uses a threshold θ instead —
h = pre · 1[pre > θ] — estimated during training as a running mean of the smallest activation
the batch top-k kept (first batch: that value; then an exponential moving average, rate 0.01).
θ is stored per latent (all equal), which is exactly a SAELens JumpReLU file; AuxK as in topk.py.
"""

from __future__ import annotations

import torch

from vlmscope.methods.sae.base import SAEConfig, StepOut
from vlmscope.methods.sae.topk import TopKSAE

THRESHOLD_RATE = 0.01


def batch_topk_relu(pre: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k · rows largest ReLU'd entries of the whole (rows, d_sae) batch."""
    acts = pre.relu()
    flat = acts.flatten()
    vals, idx = flat.topk(min(k * pre.shape[0], flat.numel()), sorted=False)
    return torch.zeros_like(flat).scatter(0, idx, vals).view_as(pre)


class BatchTopKSAE(TopKSAE):
    """TopK's loss and AuxK; a batch-wide top-k in training, a threshold at inference."""

    architecture = "batchtopk"

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        self.register_buffer("threshold", torch.zeros(cfg.d_sae))  # (d_sae,), all equal

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        return pre.relu() * (pre > self.threshold)

    def train_activate(self, pre: torch.Tensor) -> torch.Tensor:
        return batch_topk_relu(pre, self.cfg.k)

    @torch.no_grad()
    def after_step(self, out: StepOut) -> None:
        kept = out.acts[out.acts > 0]
        if kept.numel() == 0:
            return
        low = kept.min()
        first = bool((self.threshold == 0).all())
        self.threshold.copy_(low.expand_as(self.threshold) if first
                             else (1 - THRESHOLD_RATE) * self.threshold + THRESHOLD_RATE * low)
