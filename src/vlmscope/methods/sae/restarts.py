"""Random restarts: train one SAE from several initialisations in one pass, keep the best on held-out rows.

SAE training is not convex, and which solution it reaches can depend on the initialisation. On the
zoo, whether neighbouring concepts (shapes-llava's yellow and orange at `connector.out`) get a
latent each or share one differs from seed to seed. The solution that gives each its own latent
reconstructs better, so the training objective measured on held-out rows, with no labels, picks it
(docs/sae.md, "Colour concept F1"). This is k-means' `n_init` for SAEs.

    sae, restarts = train_restarts(TensorSource({site: rows}), spec, config, held_out, restarts=4)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import torch

from vlmscope.errors import InputError
from vlmscope.methods.sae.base import SAE
from vlmscope.methods.sae.sources import Source
from vlmscope.methods.sae.train import SAESpec, TrainConfig, train_saes, zca
from vlmscope.results import Result, long_frame


@dataclass(frozen=True)
class Restarts(Result):
    """Each restart's held-out error and the one kept (the lowest)."""

    kind = "sae_restarts"
    names: tuple[str, ...]
    fvu: torch.Tensor  # (restart,) fraction of held-out variance unexplained, in the space the SAEs trained in
    chosen: int

    def __repr__(self) -> str:
        return (f"Restarts({len(self.names)} restarts, kept {self.names[self.chosen]!r} at FVU "
                f"{float(self.fvu[self.chosen]):.4f}; worst {float(self.fvu.max()):.4f})")

    def to_dataframe(self):
        df = long_frame(self.fvu, ("restart",), {"restart": list(self.names)}, "fvu")
        df["chosen"] = [i == self.chosen for i in range(len(self.names))]
        return df


@torch.no_grad()
def held_out_fvu(sae: SAE, rows: torch.Tensor, whiten: float = 0.0, batch_size: int = 8192) -> float:
    """Fraction of the variance of raw rows (n, d_in) the SAE leaves unexplained. whiten > 0 measures
    it after ZCA-whitening the rows and the error with the rows' own whitening (regularised as in
    TrainConfig.whiten), i.e. in the geometry the SAE was trained to reconstruct."""
    rows = rows.float()
    matrix = zca(rows, whiten)[1] if whiten > 0 else torch.eye(rows.shape[1])
    centred = (rows - rows.mean(0)) @ matrix
    err = torch.cat([(sae(x) - x) @ matrix for x in rows.split(batch_size)])
    return float(err.pow(2).sum() / centred.pow(2).sum().clamp_min(1e-12))


def train_restarts(source: Source, spec: SAESpec, config: TrainConfig, held_out: torch.Tensor,
                   restarts: int = 4, **kwargs) -> tuple[SAE, Restarts]:
    """Train `restarts` copies of `spec`, differing only in their initialisation, on the same batches
    (one pass over `source`), and return the one with the lowest held-out FVU (`held_out_fvu` on
    raw rows of spec.site, in the trained geometry) with every restart's score. kwargs go to
    train_saes (out_dir, progress, device, dist)."""
    return train_restarts_many(source, [spec], config, {spec.site: held_out}, restarts, **kwargs)[spec.label()]


def train_restarts_many(source: Source, specs: Sequence[SAESpec], config: TrainConfig,
                        held_out: Mapping[str, torch.Tensor], restarts: int = 4,
                        **kwargs) -> dict[str, tuple[SAE, Restarts]]:
    """`train_restarts` for several specs at once (one pass feeds every restart of every spec):
    {spec label: (kept SAE, Restarts)}; held_out maps each site to its raw rows."""
    if restarts < 1:
        raise InputError(f"restarts must be >= 1, got {restarts}")
    for spec in specs:
        rows = held_out.get(spec.site)
        if rows is None or rows.ndim != 2 or len(rows) < 2:
            got = "nothing" if rows is None else f"shape {tuple(rows.shape)}"
            raise InputError(f"held_out must map {spec.site!r} to (rows >= 2, d_in) raw activations, got {got}")
    copies = {spec.label(): [replace(spec, name=f"{spec.label()}-r{r}") for r in range(restarts)] for spec in specs}
    saes = train_saes(source, [c for cs in copies.values() for c in cs], config, **kwargs)
    out = {}
    for spec in specs:
        names = tuple(c.label() for c in copies[spec.label()])
        fvu = torch.tensor([held_out_fvu(saes[n], held_out[spec.site], config.whiten) for n in names])
        chosen = int(fvu.argmin())
        out[spec.label()] = (saes[names[chosen]], Restarts(names=names, fvu=fvu, chosen=chosen))
    return out
