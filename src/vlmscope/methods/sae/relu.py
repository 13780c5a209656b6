"""ReLU SAE with an L1 penalty, exactly as the survey states it (Bricken et al. 2023; Cunningham
et al. 2024):

    h = ReLU((z − b_dec) W_enc + b_enc)    ẑ = h W_dec + b_dec    L = ‖z − ẑ‖² + α ‖h‖₁

‖z − ẑ‖² sums over the d_in axis; the loss is averaged over the batch. Decoder rows are held at
unit norm during training (see base.py), so α‖h‖₁ equals Σ_i α h_i ‖W_dec,i‖ and cannot be
lowered by rescaling. Dead latents are resampled during training (Bricken et al. 2023), see
`resample_dead`.
"""

from __future__ import annotations

import torch

from vlmscope.methods.sae.base import SAE, LossContext, StepOut


class ReLUSAE(SAE):
    architecture = "relu"
    resamples_dead = True

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        return torch.relu(pre)

    def train_step(self, x: torch.Tensor, ctx: LossContext) -> StepOut:
        h = torch.relu(self.pre_acts(x))  # (batch, d_sae)
        recon = self.decode(h)  # (batch, d_in)
        mse = self.recon_loss(x, recon)
        l1 = h.sum(-1).mean()  # h >= 0, so this is ‖h‖₁
        return StepOut(mse + ctx.sparsity * l1, recon, h, {"mse": mse, "l1": l1})


@torch.no_grad()
def resample_dead(sae: SAE, x: torch.Tensor, dead: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Re-initialise dead latents on inputs the SAE reconstructs badly (Bricken et al. 2023):
    sample rows with probability ∝ squared error; the decoder row becomes the unit-norm row
    (centred by b_dec), the encoder column that direction × 0.2 × the mean live encoder norm,
    the encoder bias 0. Returns the resampled latent ids (the trainer resets their Adam state)."""
    idx = dead.nonzero().flatten()
    if idx.numel() == 0:
        return idx
    err = (sae(x) - x).pow(2).sum(-1)  # (batch,)
    if err.sum() <= 0:
        return idx[:0]
    rows = torch.multinomial(err.cpu(), idx.numel(), replacement=True, generator=generator)  # CPU generator
    v = x[rows] - sae.b_dec  # (n_dead, d_in)
    v = v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    alive = ~dead
    enc_norm = sae.W_enc[:, alive].norm(dim=0).mean() if alive.any() else torch.tensor(1.0)
    sae.W_dec[idx] = v
    sae.W_enc[:, idx] = v.T * 0.2 * enc_norm
    sae.b_enc[idx] = 0.0
    return idx
