"""TopK SAE (Makhzani & Frey 2013; Gao et al. 2024), with AuxK against dead latents.

    h = TopK_k((z − b_dec) W_enc + b_enc)    (the k largest pre-activations, ReLU'd; the rest 0)
    L = ‖z − ẑ‖² + α_aux ‖e − ê‖²

AuxK: e = z − ẑ is the residual (no gradient flows into it), ê = W_dec applied to the top-k_aux
pre-activations of the dead latents only; it gives dead latents a gradient towards what the live
ones miss. k_aux defaults to d_in / 2 and the term is scaled by min(n_dead / k_aux, 1), as in
SAELens; α_aux = 1/32 (Gao et al. 2024). Sparsity is set by k, so there is no sparsity penalty.
"""

from __future__ import annotations

import torch

from vlmscope.methods.sae.base import SAE, LossContext, StepOut


def topk_relu(pre: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest entries of each row (ReLU'd), zero the rest: (..., d_sae)."""
    vals, idx = pre.topk(min(k, pre.shape[-1]), dim=-1, sorted=False)
    return torch.zeros_like(pre).scatter(-1, idx, vals.relu())


def aux_k_loss(sae: SAE, x: torch.Tensor, pre: torch.Tensor, recon: torch.Tensor,
               ctx: LossContext) -> torch.Tensor:
    """α_aux · min(n_dead / k_aux, 1) · ‖e − ê‖², with ê built from dead latents only."""
    if ctx.dead is None or not bool(ctx.dead.any()):
        return pre.new_zeros(())
    n_dead = int(ctx.dead.sum())
    k_aux = ctx.aux_k or max(sae.cfg.d_in // 2, 1)
    scale = min(n_dead / k_aux, 1.0)
    masked = pre.masked_fill(~ctx.dead, float("-inf"))  # (batch, d_sae)
    h_aux = topk_relu(masked, min(k_aux, n_dead))
    e = (x - recon).detach()  # (batch, d_in)
    e_hat = h_aux @ sae.W_dec  # (batch, d_in), no bias: it models a residual
    return ctx.aux_coefficient * scale * (e_hat - e).pow(2).sum(-1).mean()


class TopKSAE(SAE):
    architecture = "topk"

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        return topk_relu(pre, self.cfg.k)

    def train_activate(self, pre: torch.Tensor, ctx: LossContext | None = None) -> torch.Tensor:
        """The activation during training (BatchTopK's differs from its inference one)."""
        return topk_relu(pre, self.cfg.k)

    def train_step(self, x: torch.Tensor, ctx: LossContext) -> StepOut:
        pre = self.pre_acts(x)  # (batch, d_sae)
        h = self.train_activate(pre, ctx)
        recon = self.decode(h)
        mse = self.recon_loss(x, recon)
        aux = aux_k_loss(self, x, pre, recon, ctx)
        return StepOut(mse + aux, recon, h, {"mse": mse, "aux": aux})
