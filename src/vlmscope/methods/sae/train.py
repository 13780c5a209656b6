"""Training SAEs: several at once (sites x architectures x sizes) from one pass over the data.

`train_saes(source, specs, config, out_dir)` feeds every SAE the same batches of its site's rows
from one source (sources.py: in-memory rows, an activation store, or the model itself — one forward
serves all of them). Per SAE: activations optionally ZCA-whitened (`whiten`), then scaled so E‖z‖ =
√d_in (both folded into the saved weights), b_dec started at the data mean, Adam with linear lr
warm-up and a linear decay over the last `decay_fraction` of steps, the sparsity coefficient
(ReLU's L1, JumpReLU's L0) warmed up linearly, decoder rows kept at unit norm, dead latents
resampled for ReLU (TopK and BatchTopK use AuxK instead). A progress bar shows loss, L0 and the
dead fraction.

Checkpoints (checkpoints.py): `checkpoint-<step>.safetensors` (parameters, Adam moments and step
counts, dead counters, scales, RNG state) committed by an atomic rewrite of `checkpoint.json` (step,
data cursor, config, logs). All randomness is drawn from generators seeded by (seed, what, epoch, chunk), so a
run killed at any moment and restarted with the same arguments ends with the same weights, bit for
bit (on CPU), as one never interrupted. Never pickle: everything is safetensors + JSON.

Many processes (torchrun, see scale/distributed.py): every rank holds each chunk (sources that can
split one — a store, a model — compute a share per rank and all-gather it) and trains on its own
slice of each global batch of `batch_size` rows, the SAE wrapped in DistributedDataParallel, so W
ranks follow the one-process run's steps up to float rounding. What is not a gradient is
synchronised: dead-latent counters (all-reduced firing), AuxK's dead set (from those counters),
ReLU resampling (on the gathered batch, with the same generator everywhere), BatchTopK's batch-wide
top-k and threshold, the logs; decoder renormalisation then acts on equal weights on every rank.
Rank 0 alone writes checkpoints and the saved SAEs; a rerun under torchrun resumes like one process.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from vlmscope.errors import InputError
from vlmscope.methods.sae.base import SAE, LossContext, SAEConfig, StepOut, build_sae
from vlmscope.methods.sae.checkpoints import TrainState, adam, resume, save_checkpoint
from vlmscope.methods.sae.io import save_sae
from vlmscope.methods.sae.matryoshka import nested_loss
from vlmscope.methods.sae.relu import resample_dead
from vlmscope.methods.sae.sources import Source, generator
from vlmscope.model.store import _atomic_write_bytes
from vlmscope.scale import distributed
from vlmscope.scale.distributed import Dist

DEFAULT_SPARSITY = {"relu": 3.0, "jumprelu": 2.0}  # on activations scaled to E‖z‖ = √d_in


@dataclass(frozen=True)
class SAESpec:
    """One SAE to train: its site, architecture and size; `sparsity` is ReLU's L1 coefficient α
    or JumpReLU's L0 coefficient λ (None: DEFAULT_SPARSITY); TopK/BatchTopK use `k`."""

    site: str
    architecture: str = "topk"
    d_sae: int | None = None  # None: expansion * d_in
    expansion: int = 8
    k: int = 32
    sparsity: float | None = None
    name: str | None = None
    matryoshka: tuple[int, ...] = ()  # nested prefix widths (matryoshka.py); () for a plain SAE

    def label(self) -> str:
        if self.name:
            return self.name
        size = self.d_sae or f"x{self.expansion}"
        knob = f"k{self.k}" if self.architecture in ("topk", "batchtopk") else f"s{self.coefficient():g}"
        nest = "-m" + ".".join(map(str, self.matryoshka)) if self.matryoshka else ""
        return f"{self.site}-{self.architecture}-{size}-{knob}{nest}"

    def coefficient(self) -> float:
        return self.sparsity if self.sparsity is not None else DEFAULT_SPARSITY.get(self.architecture, 0.0)

    def config(self, d_in: int, d_sae: int | None = None) -> SAEConfig:
        """The SAEConfig this spec trains on `d_in`-wide rows (d_sae: a restored SAE's own width)."""
        return SAEConfig(self.architecture, d_in, d_sae or self.d_sae or self.expansion * d_in, k=self.k,
                         site=self.site, matryoshka=tuple(self.matryoshka))


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 2000
    batch_size: int = 1024
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 100  # linear lr warm-up
    decay_fraction: float = 0.2  # linear lr decay to 0 over this last fraction of the steps
    sparsity_warmup_steps: int = 200  # linear warm-up of the L1 / L0 coefficient
    normalise: bool = True  # scale each site's rows so that E‖z‖ = √d_in
    whiten: float = 0.0  # > 0: ZCA-whiten each site's rows first, regularised by whiten x mean eigenvalue
    init_b_dec: str = "mean"  # "mean" of the first chunk, or "zeros"
    dead_after_tokens: int = 100_000  # a latent silent for this many rows counts as dead
    resample_every: int = 500  # ReLU: resample dead latents every this many steps (0: never; not in decay)
    aux_k: int = 0  # TopK/BatchTopK AuxK latents (0: d_in // 2)
    aux_coefficient: float = 1 / 32
    jumprelu_bandwidth: float = 0.05
    jumprelu_init_threshold: float = 0.5
    seed: int = 0
    checkpoint_every: int = 200
    log_every: int = 50


def lr_factor(step: int, cfg: TrainConfig) -> float:
    warm = min(1.0, (step + 1) / max(cfg.warmup_steps, 1))
    start = int(cfg.steps * (1 - cfg.decay_fraction))
    decay = (cfg.steps - step) / max(cfg.steps - start, 1) if step >= start else 1.0
    return warm * decay


def train_saes(source: Source, specs: Sequence[SAESpec], config: TrainConfig | None = None,
               out_dir: str | Path | None = None, progress: bool = True, device: str | None = None,
               dist: Dist | None = None) -> dict[str, SAE]:
    """Train every spec's SAE on its site's rows of `source`; returns {name: SAE} taking raw
    activations (on the CPU). With `out_dir`, checkpoints go there (a rerun resumes) and each SAE is
    saved to `out_dir/<name>/` in SAELens's layout, beside `training.json` (config and logs).
    device: where the SAEs train (default: the rank's device under torchrun, else cpu). dist: the
    ranks sharing each batch (default: the initialised process group; every rank must call this)."""
    cfg = config or TrainConfig()
    d = dist or distributed.current()
    if cfg.whiten < 0:
        raise InputError(f"whiten must be >= 0 (0: off), got {cfg.whiten}")
    if cfg.batch_size % d.world_size:
        raise InputError(f"batch_size {cfg.batch_size} does not split over {d.world_size} processes; give a "
                         f"multiple of {d.world_size}")
    dev = torch.device(device or d.device)
    specs = list(specs)
    names = [s.label() for s in specs]
    if len(set(names)) != len(names):
        raise InputError(f"SAE names must differ, got {names}; give SAESpec(name=...)")
    for s in specs:
        if s.site not in source.sites:
            raise InputError(f"SAE {s.label()!r} reads {s.site!r}, which the source does not provide "
                             f"(it has: {', '.join(source.sites)})")
    if source.n_chunks() == 0:
        raise InputError("the source holds no data")
    out = Path(out_dir) if out_dir is not None else None
    fingerprint = json.loads(json.dumps({"train": asdict(cfg), "specs": [asdict(s) for s in specs],
                                         "source": source.describe()}))
    run = resume(out, fingerprint, specs, cfg, dev, d) if out is not None else None
    run = run or _start(source, specs, cfg, dev, d)
    distributed.barrier(d)
    losses = [distributed.ddp(_Objective(sae), d) for sae in run.saes]
    local = cfg.batch_size // d.world_size  # this rank's rows of each global batch
    bar = tqdm(total=cfg.steps, initial=run.step, desc="training SAEs", unit="step",
               disable=not (progress and d.main))
    n_chunks = source.n_chunks()
    barren = 0  # consecutive chunks that gave no batch: a whole epoch of them means too little data
    while run.step < cfg.steps:
        epoch, pos, first = run.cursor
        if pos >= n_chunks:
            run.cursor = (epoch + 1, 0, 0)
            continue
        order = torch.randperm(n_chunks, generator=generator(cfg.seed, "chunks", epoch)).tolist()
        rows = _chunk(source, epoch, order[pos], cfg.seed, d)
        perms = {s: torch.randperm(len(r), generator=generator(cfg.seed, "perm", s, epoch, order[pos]))
                 for s, r in rows.items()}
        n_batches = min(len(r) // cfg.batch_size for r in rows.values())
        barren = barren + 1 if n_batches == 0 else 0
        if barren > n_chunks:
            raise InputError(f"no chunk of the source has {cfg.batch_size} rows for every site; lower "
                             "batch_size or give more data")
        run.cursor = (epoch, pos + 1, 0)
        for b in range(first, n_batches):
            mine = slice(b * cfg.batch_size + d.rank * local, b * cfg.batch_size + (d.rank + 1) * local)
            batch: dict[str, torch.Tensor] = {}  # site -> (local, d_in), shared by that site's SAEs
            for i, spec in enumerate(specs):
                if spec.site not in batch:
                    batch[spec.site] = _inputs(run, spec.site, rows[spec.site][perms[spec.site][mine]]).to(dev)
                _step(run, i, spec, batch[spec.site], cfg, losses[i], d)
            run.step += 1
            run.cursor = (epoch, pos, b + 1) if b + 1 < n_batches else (epoch, pos + 1, 0)
            bar.update(1)
            if run.step % cfg.log_every == 0 or run.step == cfg.steps:
                bar.set_postfix_str(_postfix(run))
            if out is not None and d.main and (run.step % cfg.checkpoint_every == 0 or run.step == cfg.steps):
                save_checkpoint(out, run, fingerprint)
            if run.step >= cfg.steps:
                break
    bar.close()
    result = _finish(run, specs, names, out if d.main else None, fingerprint)
    distributed.barrier(d)  # rank 0's files are written when any rank returns
    return result


def _chunk(source: Source, epoch: int, index: int, seed: int, d: Dist) -> dict[str, torch.Tensor]:
    """The whole chunk on every rank: a source that can split it (`chunk_part`) computes one share
    per rank and the ranks all-gather them; any other source is read whole by every rank."""
    if not d.many or not hasattr(source, "chunk_part"):
        return source.chunk(epoch, index, seed)
    share = source.chunk_part(epoch, index, seed, d.rank, d.world_size)
    return {s: distributed.gather_rows(t, d) for s, t in share.items()}


class _Objective(nn.Module):
    """An SAE's training step as a module's forward, which DistributedDataParallel wraps."""

    def __init__(self, sae: SAE):
        super().__init__()
        self.sae = sae

    def forward(self, x: torch.Tensor, ctx: LossContext):
        out = self.sae.train_step(x, ctx)
        if self.sae.cfg.matryoshka:
            nested = nested_loss(self.sae, x, out.acts, self.sae.cfg.matryoshka)
            out.loss, out.parts["nested"] = out.loss + nested, nested.detach()
        return out.loss, out.recon, out.acts, out.parts


def _start(source: Source, specs: list[SAESpec], cfg: TrainConfig, dev: torch.device, d: Dist) -> TrainState:
    order = torch.randperm(source.n_chunks(), generator=generator(cfg.seed, "chunks", 0)).tolist()
    first = _chunk(source, 0, order[0], cfg.seed, d)  # the first chunk training reads: scales and b_dec
    scales, whitening = {}, {}
    for site, rows in first.items():
        if cfg.whiten > 0:
            whitening[site] = zca(rows, cfg.whiten)
            rows = first[site] = _whiten(rows, *whitening[site])  # (rows, d_in)
        scales[site] = float(math.sqrt(rows.shape[1]) / rows.norm(dim=1).mean()) if cfg.normalise else 1.0
    saes, opts, silent = [], [], []
    for i, spec in enumerate(specs):
        d_in = first[spec.site].shape[1]
        sc = spec.config(d_in)
        sae = build_sae(sc)
        sae.init_weights(generator(cfg.seed, "init", i, spec.label()))
        sae.prepare_training(cfg)
        if cfg.init_b_dec == "mean":
            with torch.no_grad():
                sae.b_dec.copy_((first[spec.site] * scales[spec.site]).mean(0))
        elif cfg.init_b_dec != "zeros":
            raise InputError(f"unknown init_b_dec {cfg.init_b_dec!r}; valid: 'mean', 'zeros'")
        saes.append(sae.to(dev).train())
        opts.append(adam(sae, cfg))
        silent.append(torch.zeros(sc.d_sae, dtype=torch.long, device=dev))
    return TrainState(saes, opts, silent, scales, generator(cfg.seed, "resample"), logs=[[] for _ in specs],
                      whitening=whitening)


def zca(rows: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """ZCA whitening of (rows, d) (Bell & Sejnowski 1997): the mean and the symmetric matrix
    (C + eps · mean eigenvalue · I)^(-1/2), C the rows' covariance; eps keeps it invertible."""
    mean = rows.double().mean(0)
    vals, vecs = torch.linalg.eigh(torch.cov((rows.double() - mean).T))  # (d,), (d, d)
    vals = vals.clamp_min(0)
    ridge = eps * vals.mean().clamp_min(1e-12)
    return mean.float().cpu(), ((vecs * (vals + ridge).rsqrt()) @ vecs.T).float().cpu()


def _whiten(rows: torch.Tensor, mean: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    return (rows - mean.to(rows.device)) @ matrix.to(rows.device)  # (rows, d_in)


def _inputs(run: TrainState, site: str, rows: torch.Tensor) -> torch.Tensor:
    """(rows, d_in) raw activations -> what the SAEs of `site` train on (whitened, scaled)."""
    if site in run.whitening:
        rows = _whiten(rows, *run.whitening[site])
    return rows * run.scales[site]


def _step(run: TrainState, i: int, spec: SAESpec, x: torch.Tensor, cfg: TrainConfig, objective: nn.Module,
          d: Dist) -> None:
    """One optimiser step of SAE i on this rank's rows `x` of the global batch."""
    sae, opt = run.saes[i], run.opts[i]
    warm = min(1.0, (run.step + 1) / max(cfg.sparsity_warmup_steps, 1))
    dead = run.silent[i] >= cfg.dead_after_tokens
    ctx = LossContext(sparsity=spec.coefficient() * warm, dead=dead, aux_k=cfg.aux_k,
                      aux_coefficient=cfg.aux_coefficient, bandwidth=cfg.jumprelu_bandwidth,
                      dist=d if d.many else None)
    for g in opt.param_groups:
        g["lr"] = cfg.lr * lr_factor(run.step, cfg)
    out = StepOut(*objective(x, ctx))
    opt.zero_grad(set_to_none=True)
    out.loss.backward()  # under DDP: gradients averaged over ranks = the global batch's gradient
    sae.remove_parallel_decoder_grad()
    opt.step()
    sae.normalise_decoder()
    sae.after_step(out)
    fired = distributed.all_reduce((out.acts > 0).any(0).int(), d) > 0  # fired anywhere in the batch
    rows = x.shape[0] * d.world_size
    run.silent[i] = torch.where(fired, 0, run.silent[i] + rows)
    step = run.step + 1
    decaying = step >= int(cfg.steps * (1 - cfg.decay_fraction))
    if sae.resamples_dead and cfg.resample_every and step % cfg.resample_every == 0 and not decaying:
        window = run.silent[i] >= cfg.resample_every * rows
        idx = resample_dead(sae, distributed.gather_rows(x, d), window, run.rng)  # the same on every rank
        _reset_adam_rows(opt, sae, idx)
        run.silent[i][idx] = 0
    if step % cfg.log_every == 0 or step == cfg.steps:
        run.logs[i].append(_log_row(step, x, out, run.silent[i] >= cfg.dead_after_tokens, d))


@torch.no_grad()
def _log_row(step: int, x: torch.Tensor, out: StepOut, dead: torch.Tensor, d: Dist) -> dict:
    """Loss, MSE, L0, explained variance and dead fraction of the whole batch (gathered from every rank)."""
    means = torch.stack([out.loss.detach(), out.parts["mse"].detach(), (out.acts > 0).float().sum(-1).mean()])
    loss, mse, l0 = distributed.mean(means, d).tolist()
    x, recon = distributed.gather_rows(x, d), distributed.gather_rows(out.recon.detach(), d)
    ev = 1 - (x - recon).pow(2).sum() / (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)
    return {"step": step, "loss": loss, "mse": mse, "l0": l0, "explained_variance": ev.item(),
            "dead_fraction": dead.float().mean().item()}


@torch.no_grad()
def _reset_adam_rows(opt: torch.optim.Adam, sae: SAE, idx: torch.Tensor) -> None:
    if idx.numel() == 0:
        return
    for name, p in sae.named_parameters():
        state = opt.state.get(p)
        if not state:
            continue
        for key in ("exp_avg", "exp_avg_sq"):
            if name == "W_enc":
                state[key][:, idx] = 0
            elif p.shape and p.shape[0] == sae.cfg.d_sae:
                state[key][idx] = 0


def _postfix(run: TrainState) -> str:
    last = [log[-1] for log in run.logs if log]
    if not last:
        return ""
    loss = "/".join(f"{r['loss']:.3g}" for r in last)
    l0 = "/".join(f"{r['l0']:.1f}" for r in last)
    dead = "/".join(f"{r['dead_fraction']:.2f}" for r in last)
    return f"loss {loss} L0 {l0} dead {dead}"


def _finish(run: TrainState, specs: list[SAESpec], names: list[str], out: Path | None,
            fingerprint: dict) -> dict[str, SAE]:
    """The trained SAEs with the input scale folded in (saved under `out` when given)."""
    result = {}
    for name, spec, sae in zip(names, specs, run.saes, strict=True):
        final = copy.deepcopy(sae).cpu().eval()
        if spec.site in run.whitening:
            mean, matrix = run.whitening[spec.site]
            final.fold_input_whitening(mean, matrix * run.scales[spec.site])
        else:
            final.fold_input_scale(run.scales[spec.site])
        src = fingerprint["source"]
        final.cfg = replace(final.cfg, positions=_positions(src), model=src.get("name", ""))
        result[name] = final.requires_grad_(False)
        if out is not None:
            save_sae(final, out / name)
    if out is not None:
        doc = {"kind": "sae_training", "format": 1, "names": names, "config": fingerprint, "logs": run.logs,
               "scales": run.scales}
        _atomic_write_bytes(out / "training.json", lambda p: Path(p).write_text(json.dumps(doc, indent=1)))
    return result


def _positions(source: dict) -> str:
    pos = source.get("positions", "'all'")
    return pos.strip("'\"") if isinstance(pos, str) else str(pos)
