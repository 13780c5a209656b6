"""JumpReLU SAE (Rajamanoharan et al. 2024) trained with straight-through threshold estimators.

    h = JumpReLU_θ(pre) = pre · H(pre − θ)        L = ‖z − ẑ‖² + λ Σ_i H(pre_i − θ_i)

H is the Heaviside step, so the sparsity term is L0 and has no gradient. The paper's
straight-through estimators give θ one, through a rectangle kernel K of bandwidth ε:
    ∂JumpReLU/∂θ := −(θ/ε) K((pre − θ)/ε)        ∂H/∂θ := −(1/ε) K((pre − θ)/ε)
and the L0 term passes no gradient to pre (DeepMind's form). As in SAELens, θ itself is the
trained parameter (not log θ: Adam moves a parameter by about lr per step, which barely moves a
small log-threshold) and is projected to θ ≥ 0 after each step.
"""

from __future__ import annotations

import torch

from vlmscope.methods.sae.base import SAE, LossContext, SAEConfig, StepOut


def _rectangle(u: torch.Tensor) -> torch.Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre, theta, bandwidth: float):
        ctx.save_for_backward(pre, theta)
        ctx.bandwidth = bandwidth
        return pre * (pre > theta)

    @staticmethod
    def backward(ctx, grad):
        pre, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_pre = (pre > theta) * grad
        grad_theta = (-(theta / eps) * _rectangle((pre - theta) / eps) * grad).sum(0)
        return grad_pre, grad_theta, None


class _Step(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre, theta, bandwidth: float):
        ctx.save_for_backward(pre, theta)
        ctx.bandwidth = bandwidth
        return (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):
        pre, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_theta = (-(1.0 / eps) * _rectangle((pre - theta) / eps) * grad).sum(0)
        return None, grad_theta, None


class JumpReLUSAE(SAE):
    architecture = "jumprelu"

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        self.threshold = torch.nn.Parameter(torch.zeros(cfg.d_sae))

    @torch.no_grad()
    def prepare_training(self, config) -> None:
        self.threshold.fill_(config.jumprelu_init_threshold)

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        return pre.relu() * (pre > self.threshold)  # SAELens's form; equal to pre·H(pre − θ) for θ ≥ 0

    def train_step(self, x: torch.Tensor, ctx: LossContext) -> StepOut:
        pre = self.pre_acts(x)  # (batch, d_sae)
        h = _JumpReLU.apply(pre, self.threshold, ctx.bandwidth)
        recon = self.decode(h)
        mse = self.recon_loss(x, recon)
        l0 = _Step.apply(pre, self.threshold, ctx.bandwidth).sum(-1).mean()
        return StepOut(mse + ctx.sparsity * l0, recon, h, {"mse": mse, "l0": l0})

    @torch.no_grad()
    def after_step(self, out: StepOut) -> None:
        self.threshold.clamp_(min=0.0)
