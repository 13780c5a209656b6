"""Sparse autoencoders: the base every architecture shares (Bricken et al. 2023; SAELens's names).

An SAE maps an activation z (d_in) to sparse latents h (d_sae) and back, as the survey states it:

    h = σ((z − b_dec) W_enc + b_enc)        ẑ = h W_dec + b_dec

σ is the architecture's activation: ReLU (relu.py), TopK (topk.py), BatchTopK (batchtopk.py) or
JumpReLU (jumprelu.py); any of them can be trained as a Matryoshka SAE (matryoshka.py).
Parameters carry SAELens's names and shapes — W_enc (d_in, d_sae), b_enc (d_sae,), W_dec
(d_sae, d_in), b_dec (d_in,) — so io.py writes files SAELens reads.

Decoder norms: during training every architecture keeps each decoder row at unit L2 norm (the
gradient's component along the row is removed before the optimiser step and the row is
renormalised after it, Bricken et al. 2023). Without it ReLU + L1 would shrink h and grow W_dec
to lower the penalty for free. Trained SAEs are saved with the activation normalisation folded in
(`fold_input_scale`), so saved decoder rows have norm 1 / scale.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from vlmscope.methods.sae.matryoshka import check_widths

ARCHITECTURES: dict[str, type[SAE]] = {}


@dataclass(frozen=True)
class SAEConfig:
    """What defines an SAE's function (training hyperparameters live in train.TrainConfig)."""

    architecture: str  # "relu" | "topk" | "batchtopk" | "jumprelu"
    d_in: int
    d_sae: int
    k: int = 32  # topk: active latents per row; batchtopk: mean active latents per row in a batch
    site: str = ""  # the vlmscope site it reads (or a SAELens hook name for files from SAELens)
    positions: str = "all"  # the token roles it was trained on ("image", "text", "all")
    model: str = ""
    apply_b_dec_to_input: bool = True  # SAELens: subtract b_dec before encoding (the survey's form)
    rescale_acts_by_decoder_norm: bool = False  # SAELens topk option, honoured when loading
    matryoshka: tuple[int, ...] = ()  # nested prefix widths that also reconstruct in training (matryoshka.py)

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"unknown SAE architecture {self.architecture!r}; "
                             f"valid: {', '.join(ARCHITECTURES)}")
        if self.d_in <= 0 or self.d_sae <= 0:
            raise ValueError(f"d_in and d_sae must be positive, got {self.d_in} and {self.d_sae}")
        object.__setattr__(self, "matryoshka", check_widths(self.matryoshka, self.d_sae))


@dataclass(frozen=True)
class LossContext:
    """What a training step needs besides the batch: warmed-up coefficients and dead latents."""

    sparsity: float = 0.0  # coefficient of the sparsity term (L1 for relu, L0 for jumprelu)
    dead: torch.Tensor | None = None  # (d_sae,) bool, latents that have not fired lately (AuxK)
    aux_k: int = 0  # AuxK: dead latents used to model the residual (0: d_in // 2)
    aux_coefficient: float = 1 / 32
    bandwidth: float = 0.05  # JumpReLU straight-through kernel width
    dist: Any = None  # a scale.distributed.Dist whose other ranks hold the rest of the batch (None: all here)


@dataclass
class StepOut:
    """One training forward: the loss to minimise, the reconstruction, the latents, loss parts."""

    loss: torch.Tensor
    recon: torch.Tensor  # (batch, d_in)
    acts: torch.Tensor  # (batch, d_sae)
    parts: dict[str, torch.Tensor] = field(default_factory=dict)


class SAE(nn.Module, metaclass=abc.ABCMeta):
    """Shared parameters, encoder/decoder and decoder-norm handling. Subclasses set `architecture`
    and implement `activate` (inference) and `train_step` (the loss of their paper)."""

    architecture: ClassVar[str] = ""
    resamples_dead: ClassVar[bool] = False  # the trainer resamples dead latents (relu only)

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if cls.architecture:
            ARCHITECTURES[cls.architecture] = cls

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        if cfg.architecture != self.architecture:
            raise ValueError(f"{type(self).__name__} is the {self.architecture!r} architecture, "
                             f"the config says {cfg.architecture!r}")
        self.cfg = cfg
        self.W_enc = nn.Parameter(torch.zeros(cfg.d_in, cfg.d_sae))
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae))
        self.W_dec = nn.Parameter(torch.zeros(cfg.d_sae, cfg.d_in))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in))

    def __repr__(self) -> str:
        c = self.cfg
        k = f", k={c.k}" if self.architecture in ("topk", "batchtopk") else ""
        return f"{type(self).__name__}(d_in={c.d_in}, d_sae={c.d_sae}{k}, site={c.site!r})"

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator) -> None:
        """Unit-norm random decoder rows, encoder tied to the decoder's transpose, zero biases
        (Conerly et al. 2024; Gao et al. 2024)."""
        w = torch.randn(self.cfg.d_sae, self.cfg.d_in, generator=generator)
        self.W_dec.copy_(w / w.norm(dim=-1, keepdim=True))
        self.W_enc.copy_(self.W_dec.T)
        self.b_enc.zero_()
        self.b_dec.zero_()

    def prepare_training(self, config) -> None:
        """Architecture-specific set-up from the train config (JumpReLU's initial threshold)."""

    # --- the function ----------------------------------------------------------------------------
    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """(..., d_in) -> (..., d_sae) pre-activations (z − b_dec) W_enc + b_enc."""
        z = x - self.b_dec if self.cfg.apply_b_dec_to_input else x
        pre = z @ self.W_enc + self.b_enc
        if self.cfg.rescale_acts_by_decoder_norm:
            pre = pre * self.W_dec.norm(dim=-1)
        return pre

    @abc.abstractmethod
    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        """(..., d_sae) pre-activations -> latents: the architecture's nonlinearity."""

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(..., d_in) -> (..., d_sae) latents, as at inference (BatchTopK uses its threshold)."""
        return self.activate(self.pre_acts(x))

    def decode(self, h: torch.Tensor) -> torch.Tensor:
        """(..., d_sae) -> (..., d_in) reconstruction h W_dec + b_dec."""
        if self.cfg.rescale_acts_by_decoder_norm:
            h = h / self.W_dec.norm(dim=-1)
        return h @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    # --- training --------------------------------------------------------------------------------
    @abc.abstractmethod
    def train_step(self, x: torch.Tensor, ctx: LossContext) -> StepOut:
        """One batch's loss terms and latents; the trainer does the optimiser step."""

    def recon_loss(self, x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        """‖z − ẑ‖²: squared error summed over the d_in axis, averaged over the batch."""
        return (recon - x).pow(2).sum(-1).mean()

    def after_step(self, out: StepOut) -> None:
        """Architecture-specific update after the optimiser step (thresholds, projections)."""

    @torch.no_grad()
    def remove_parallel_decoder_grad(self) -> None:
        """Drop the gradient component along each (unit) decoder row, so the step keeps its norm."""
        if self.W_dec.grad is not None:
            w = self.W_dec
            self.W_dec.grad -= (self.W_dec.grad * w).sum(-1, keepdim=True) * w

    @torch.no_grad()
    def normalise_decoder(self) -> None:
        self.W_dec /= self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    @torch.no_grad()
    def fold_input_scale(self, scale: float) -> None:
        """The SAE was trained on `scale` * z: rewrite it to take z itself with the same latents
        (W_enc · scale, W_dec / scale, b_dec / scale), as SAELens folds its norm scaling factor."""
        if self.cfg.rescale_acts_by_decoder_norm:
            raise ValueError("cannot fold an input scale into an SAE with rescale_acts_by_decoder_norm")
        self.W_enc *= scale
        self.W_dec /= scale
        self.b_dec /= scale

    @torch.no_grad()
    def fold_input_whitening(self, mean: torch.Tensor, matrix: torch.Tensor) -> None:
        """The SAE was trained on (z − mean) @ matrix (matrix invertible, d_in x d_in): rewrite it to take
        z itself with the same latents and the reconstruction mapped back (W_enc ← matrix W_enc,
        W_dec ← W_dec matrix⁻¹, b_dec ← mean + b_dec matrix⁻¹)."""
        if self.cfg.rescale_acts_by_decoder_norm or not self.cfg.apply_b_dec_to_input:
            raise ValueError("cannot fold whitening into an SAE with rescale_acts_by_decoder_norm or without "
                             "apply_b_dec_to_input")
        inv = torch.linalg.inv(matrix.double())  # (d_in, d_in)
        self.W_enc.copy_(matrix.double() @ self.W_enc.double())
        self.W_dec.copy_(self.W_dec.double() @ inv)
        self.b_dec.copy_(mean.double() + self.b_dec.double() @ inv)


def build_sae(cfg: SAEConfig) -> SAE:
    """An SAE of `cfg.architecture` with zero parameters (call `init_weights` or load a state).
    The architectures register themselves when `vlmscope.methods.sae` is imported."""
    return ARCHITECTURES[cfg.architecture](cfg)
