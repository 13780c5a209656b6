"""SAE training checkpoints: the mutable state of a run, written to and read from one folder.

`checkpoint-<step>.safetensors` holds parameters, Adam moments and step counts, dead counters,
scales, whitening (mean, matrix) and the resampling RNG; `checkpoint.json` (step, data cursor,
config, logs) commits it by an atomic rewrite, so a run killed at any moment resumes from its last
committed step. Under torchrun rank 0 alone writes and tidies; every rank reads. Never pickle:
safetensors + JSON only.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file

from vlmscope.errors import InputError
from vlmscope.methods.sae.base import SAE, build_sae
from vlmscope.model.store import _atomic_write_bytes
from vlmscope.scale.distributed import Dist

if TYPE_CHECKING:
    from vlmscope.methods.sae.train import SAESpec, TrainConfig

CHECKPOINT = "checkpoint.json"


@dataclass
class TrainState:
    """Mutable training state: what a checkpoint holds."""

    saes: list[SAE]
    opts: list[torch.optim.Adam]
    silent: list[torch.Tensor]  # (d_sae,) rows since each latent last fired
    scales: dict[str, float]
    rng: torch.Generator  # resampling
    step: int = 0
    cursor: tuple[int, int, int] = (0, 0, 0)  # epoch, chunk position, batch within the chunk
    logs: list[list[dict]] | None = None
    whitening: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # site: mean, matrix


def adam(sae: SAE, cfg: TrainConfig) -> torch.optim.Adam:
    """Adam over the SAE's trained parameters, with the run's lr and betas."""
    return torch.optim.Adam([p for p in sae.parameters() if p.requires_grad], lr=cfg.lr, betas=cfg.betas)


def save_checkpoint(out: Path, run: TrainState, fingerprint: dict) -> None:
    """Write `run` under `out` and commit it (rank 0 only under torchrun)."""
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {"rng/resample": run.rng.get_state()}
    for i, (sae, opt) in enumerate(zip(run.saes, run.opts, strict=True)):
        for k, v in sae.state_dict().items():
            tensors[f"sae{i}/{k}"] = v.detach().cpu().clone()
        for j, p in enumerate(opt.param_groups[0]["params"]):
            for k, v in opt.state.get(p, {}).items():
                tensors[f"adam{i}/{j}/{k}"] = v.detach().cpu().clone().reshape(v.shape)
        tensors[f"silent{i}"] = run.silent[i].cpu().clone()
    for site, s in run.scales.items():
        tensors[f"scale/{site}"] = torch.tensor(s, dtype=torch.float64)
    for site, (mean, matrix) in run.whitening.items():
        tensors[f"whiten_mean/{site}"], tensors[f"whiten_matrix/{site}"] = mean.clone(), matrix.clone()
    fname = f"checkpoint-{run.step:08d}.safetensors"
    _atomic_write_bytes(out / fname, lambda p: save_file(tensors, p))
    doc = {"kind": "sae_checkpoint", "format": 1, "step": run.step, "cursor": list(run.cursor), "file": fname,
           "config": fingerprint, "logs": run.logs}
    _atomic_write_bytes(out / CHECKPOINT, lambda p: Path(p).write_text(json.dumps(doc)))
    for old in out.glob("checkpoint-*.safetensors"):
        if old.name != fname:
            old.unlink()


def resume(out: Path, fingerprint: dict, specs: Sequence[SAESpec], cfg: TrainConfig, dev: torch.device,
           d: Dist) -> TrainState | None:
    """The run saved under `out`, or None. Every rank reads it; rank 0 alone tidies the folder."""
    if d.main:
        for stale in out.glob("*.tmp"):
            stale.unlink()
    if not (out / CHECKPOINT).exists():
        return None
    doc = json.loads((out / CHECKPOINT).read_text())
    if doc.get("config") != fingerprint:
        raise InputError(f"{out} holds a training run with other settings; use another folder or the same "
                         f"settings to resume.\n  theirs: {doc.get('config')}\n  yours:  {fingerprint}")
    t = load_file(str(out / doc["file"]))
    for extra in out.glob("checkpoint-*.safetensors") if d.main else ():
        if extra.name != doc["file"]:
            extra.unlink()
    run = _restore(t, specs, cfg, dev)
    run.step, run.cursor, run.logs = doc["step"], tuple(doc["cursor"]), doc["logs"]
    return run


def _restore(t: dict[str, torch.Tensor], specs: Sequence[SAESpec], cfg: TrainConfig, dev: torch.device
             ) -> TrainState:
    """SAEs, Adam states, dead counters, scales and RNG from a checkpoint's tensors."""
    saes, opts, silent = [], [], []
    for i, spec in enumerate(specs):
        d_sae, d_in = t[f"sae{i}/W_dec"].shape
        sae = build_sae(spec.config(d_in, d_sae))
        sae.load_state_dict({k.split("/", 1)[1]: v for k, v in t.items() if k.startswith(f"sae{i}/")})
        sae.to(dev)
        opt = adam(sae, cfg)
        state = {}
        for j, _ in enumerate(opt.param_groups[0]["params"]):
            keys = {k.rsplit("/", 1)[1]: v for k, v in t.items() if k.startswith(f"adam{i}/{j}/")}
            if keys:
                state[j] = keys
        opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})
        saes.append(sae.train())
        opts.append(opt)
        silent.append(t[f"silent{i}"].to(dev))
    scales = {k.split("/", 1)[1]: float(v) for k, v in t.items() if k.startswith("scale/")}
    whitening = {site: (t[f"whiten_mean/{site}"], t[f"whiten_matrix/{site}"])
                 for site in (k.split("/", 1)[1] for k in t if k.startswith("whiten_mean/"))}
    rng = torch.Generator()
    rng.set_state(t["rng/resample"])
    return TrainState(saes, opts, silent, scales, rng, whitening=whitening)
