"""Matryoshka SAEs (Bussmann et al. 2025; Nabeshima 2024): nested prefixes must reconstruct too.

With prefix widths m_1 < m_2 < ... < d_sae, training adds to the architecture's loss the
reconstruction error of each prefix on its own,

    L = L_arch + Σ_j ‖z − (h[:, :m_j] W_dec[:m_j] + b_dec)‖²,

with h the architecture's training latents (TopK, BatchTopK, ReLU or JumpReLU). The first latents
must then carry the most general features, and a general feature is not absorbed into more
specific ones (a "red" latent that stops firing on red circles once a "red circle" latent exists).
SAELens trains the BatchTopK form; here it is an option of every architecture (`SAEConfig.matryoshka`).
Inference is the base architecture's, so files are those of the base architecture.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def check_widths(widths: Sequence[int], d_sae: int) -> tuple[int, ...]:
    """The prefix widths as a tuple, strictly increasing, each in 1..d_sae - 1 (the whole dictionary
    is the architecture's own loss)."""
    w = tuple(int(x) for x in widths)
    if any(b <= a for a, b in zip(w, w[1:])) or (w and (w[0] < 1 or w[-1] >= d_sae)):
        raise ValueError(f"matryoshka widths must increase strictly within 1..{d_sae - 1} (d_sae {d_sae} is the "
                         f"whole dictionary), got {list(w)}")
    return w


def nested_loss(sae, x: torch.Tensor, acts: torch.Tensor, widths: Sequence[int]) -> torch.Tensor:
    """Σ over prefix widths of the squared reconstruction error of x (batch, d_in) from the first
    `width` latents of acts (batch, d_sae) alone, each summed over d_in and averaged over the batch."""
    if sae.cfg.rescale_acts_by_decoder_norm:
        acts = acts / sae.W_dec.norm(dim=-1)
    total = x.new_zeros(())
    recon, start = sae.b_dec.expand_as(x), 0  # (batch, d_in), grown one slice of latents at a time
    for w in widths:
        recon = recon + acts[:, start:w] @ sae.W_dec[start:w]
        total = total + sae.recon_loss(x, recon)
        start = w
    return total
