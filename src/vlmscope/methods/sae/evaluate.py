"""Evaluating SAEs: reconstruction, and spliced back into the model (Bricken et al. 2023; Gao et
al. 2024; Rajamanoharan et al. 2024 compare architectures this way, at matched L0).

Reconstruction on a site's rows: L0 (mean active latents per row), explained variance
1 − Σ‖z − ẑ‖² / Σ‖z − mean z‖², MSE (per element), the fraction of dead latents (never active on
these rows) and of dense ones (active on more than `dense_above` of the rows).

Spliced: the site is replaced by the SAE's reconstruction at the selected positions (a
`vs.hook`), and the model's loss is compared with the clean run and with the site zeroed there:
loss recovered = (CE_zero − CE_sae) / (CE_zero − CE_clean); with answer token ids, CE and the
arg-max accuracy are read at each row's last real token (the zoo's answers), and accuracy
recovered = (acc_sae − acc_zero) / (acc_clean − acc_zero); without them, the next-token CE over
text positions. `SAEEval` holds one SAE's numbers; `compare_at_matched_l0` tabulates several
architectures trained on the same rows to the same L0.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from vlmscope.methods.metrics import last_logits
from vlmscope.methods.sae.base import SAE
from vlmscope.methods.sae.sources import Source, TensorSource
from vlmscope.methods.sae.train import SAESpec, TrainConfig, train_saes
from vlmscope.model.interventions import ablate, hook
from vlmscope.model.positions import TEXT, PositionSpec
from vlmscope.results import Result, long_frame

NAN = float("nan")


@dataclass(frozen=True, repr=False)
class SAEEval(Result):
    """One SAE's reconstruction and spliced-in metrics (NaN where no model run was asked for)."""

    kind = "sae_eval"
    site: str
    architecture: str
    positions: str
    n_rows: int
    l0: float
    explained_variance: float
    mse: float
    dead_fraction: float
    dense_fraction: float
    frequency: torch.Tensor  # (d_sae,) fraction of rows on which each latent is active
    ce_clean: float = NAN
    ce_sae: float = NAN
    ce_zero: float = NAN
    loss_recovered: float = NAN
    acc_clean: float = NAN
    acc_sae: float = NAN
    acc_zero: float = NAN
    accuracy_recovered: float = NAN

    SCALARS = ("l0", "explained_variance", "mse", "dead_fraction", "dense_fraction", "ce_clean", "ce_sae",
               "ce_zero", "loss_recovered", "acc_clean", "acc_sae", "acc_zero", "accuracy_recovered")

    def __repr__(self) -> str:
        return (f"SAEEval({self.architecture} at {self.site}: L0 {self.l0:.1f}, "
                f"EV {self.explained_variance:.3f}, loss recovered {self.loss_recovered:.3f}, "
                f"{self.n_rows} rows)")

    def to_dataframe(self):
        import pandas as pd

        row = {"site": self.site, "architecture": self.architecture, "positions": self.positions,
               "n_rows": self.n_rows, **{k: getattr(self, k) for k in self.SCALARS}}
        return pd.DataFrame([row])


class _Recon:
    """Running sums for reconstruction metrics over batches of rows (float64)."""

    def __init__(self, d_in: int, d_sae: int):
        self.n, self.sq, self.resid, self.active = 0, 0.0, 0.0, 0.0
        self.sum = torch.zeros(d_in, dtype=torch.float64)
        self.fired = torch.zeros(d_sae, dtype=torch.float64)

    @torch.no_grad()
    def add(self, sae: SAE, x: torch.Tensor) -> None:
        h = sae.encode(x.float())  # (rows, d_sae)
        r = sae.decode(h)
        x = x.double()
        self.n += x.shape[0]
        self.sum += x.sum(0)
        self.sq += float(x.pow(2).sum())
        self.resid += float((x - r.double()).pow(2).sum())
        on = h > 0
        self.active += float(on.sum())
        self.fired += on.sum(0).double()

    def metrics(self, dense_above: float) -> dict[str, Any]:
        n = max(self.n, 1)
        var = self.sq - float(self.sum.pow(2).sum()) / n
        freq = (self.fired / n).float()
        ev = 1 - self.resid / max(var, 1e-30)
        return {"n_rows": self.n, "l0": self.active / n, "explained_variance": ev,
                "mse": self.resid / (n * len(self.sum)),
                "dead_fraction": float((self.fired == 0).float().mean()),
                "dense_fraction": float((freq > dense_above).float().mean()), "frequency": freq}


def reconstruction(sae: SAE, rows: torch.Tensor | Iterable[torch.Tensor], dense_above: float = 0.1,
                   batch_size: int = 8192) -> SAEEval:
    """Reconstruction metrics of `sae` on activation rows (n, d_in), or an iterable of such batches."""
    acc = _Recon(sae.cfg.d_in, sae.cfg.d_sae)
    batches = rows.split(batch_size) if isinstance(rows, torch.Tensor) else rows
    for x in batches:
        acc.add(sae, x)
    return SAEEval(site=sae.cfg.site, architecture=sae.cfg.architecture, positions=sae.cfg.positions,
                   **acc.metrics(dense_above))


def splice(sae: SAE, site: str, mask: torch.Tensor):
    """An intervention replacing `site` by the SAE's reconstruction where `mask` (batch, pos) is true."""
    def fn(t: torch.Tensor, *, site: str) -> torch.Tensor:
        out = t.clone()
        m = mask.to(t.device)
        out[m] = sae(t[m].float()).to(t.dtype)
        return out

    return hook(site, fn)


def downstream(vlm, inputs: Mapping[str, Any], interventions: Sequence = (),
               answers: torch.Tensor | None = None) -> tuple[float, int, float, int]:
    """(summed CE, count, correct, count) of one run: answers at each row's last real token, or
    next-token prediction of text tokens when `answers` is None."""
    return _loss_terms(vlm, vlm.run(inputs, interventions), inputs, answers)


def _loss_terms(vlm, out, inputs: Mapping[str, Any], answers: torch.Tensor | None
                ) -> tuple[float, int, float, int]:
    if answers is not None:
        logits = last_logits(vlm, out, inputs).float()  # (batch, vocab)
        a = answers.to(logits.device)
        ce = torch.nn.functional.cross_entropy(logits, a, reduction="sum")
        return float(ce), len(a), float((logits.argmax(-1) == a).sum()), len(a)
    logits = out.logits[:, :-1].float()  # (batch, pos-1, vocab)
    target = inputs["input_ids"][:, 1:].to(logits.device)
    keep = (vlm.positions(inputs)["lm"].role[:, 1:] == TEXT).to(logits.device)
    ce = torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum")
    n = int(keep.sum())
    return float(ce), n, float((logits[keep].argmax(-1) == target[keep]).sum()), n


Batch = Mapping[str, Any] | tuple[Mapping[str, Any], torch.Tensor]


def evaluate_sae(sae: SAE, vlm, batches: Iterable[Batch], site: str | None = None,
                 positions: PositionSpec = None, dense_above: float = 0.1) -> SAEEval:
    """Reconstruction and spliced-in metrics of `sae` over model input batches (each an inputs
    dict, or (inputs, answer ids) for answer CE and accuracy). `site`/`positions` default to the
    SAE's own (its config's site and the positions it was trained on)."""
    site = site or sae.cfg.site
    positions = positions if positions is not None else sae.cfg.positions
    acc = _Recon(sae.cfg.d_in, sae.cfg.d_sae)
    sums = {k: [0.0, 0, 0.0, 0] for k in ("clean", "sae", "zero")}
    for batch in batches:
        inputs, answers = batch if isinstance(batch, tuple) else (batch, None)
        mask = vlm.positions(inputs)[vlm.site(site).stream].select(positions)
        out, cache = vlm.run_with_cache(inputs, site)
        acc.add(sae, cache[site][mask.to(cache[site].device)])
        terms = {"clean": _loss_terms(vlm, out, inputs, answers),
                 "sae": downstream(vlm, inputs, [splice(sae, site, mask)], answers),
                 "zero": downstream(vlm, inputs, [ablate(site, "zero", positions=mask)], answers)}
        for name, values in terms.items():
            for j, v in enumerate(values):
                sums[name][j] += v
    ce = {k: v[0] / max(v[1], 1) for k, v in sums.items()}
    hit = {k: v[2] / v[3] if v[3] else NAN for k, v in sums.items()}
    has_answers = any(v[3] for v in sums.values())
    return SAEEval(
        site=site, architecture=sae.cfg.architecture, **acc.metrics(dense_above),
        positions=positions if isinstance(positions, str) else type(positions).__name__,
        ce_clean=ce["clean"], ce_sae=ce["sae"], ce_zero=ce["zero"],
        loss_recovered=_recovered(ce["sae"], ce["clean"], ce["zero"]),
        acc_clean=hit["clean"], acc_sae=hit["sae"], acc_zero=hit["zero"],
        accuracy_recovered=_recovered(hit["sae"], hit["clean"], hit["zero"]) if has_answers else NAN)


def _recovered(value: float, clean: float, zero: float) -> float:
    """Where `value` lies between the zero-ablated run (0) and the clean run (1); NaN if they tie."""
    return (value - zero) / (clean - zero) if clean != zero else NAN


# --- architectures at matched L0 ------------------------------------------------------------------


COLUMNS = ("knob", "explained_variance", "mse", "dead_fraction", "loss_recovered", "accuracy_recovered")


@dataclass(frozen=True, repr=False)
class SAEComparison(Result):
    """Architectures trained on the same rows to (about) the same L0: one row each."""

    kind = "sae_comparison"
    architectures: tuple[str, ...]
    target_l0: float
    knob: torch.Tensor  # (arch,) k for topk/batchtopk, the sparsity coefficient for relu/jumprelu
    l0: torch.Tensor  # (arch,) achieved on the evaluation rows
    explained_variance: torch.Tensor  # (arch,)
    mse: torch.Tensor  # (arch,)
    dead_fraction: torch.Tensor  # (arch,)
    loss_recovered: torch.Tensor  # (arch,) NaN without a model
    accuracy_recovered: torch.Tensor  # (arch,) NaN without answers
    site: str = ""

    def __repr__(self) -> str:
        return f"SAEComparison({', '.join(self.architectures)} at L0 ≈ {self.target_l0:g})"

    def to_dataframe(self):
        df = long_frame(self.l0, ("architecture",), {"architecture": list(self.architectures)}, name="l0")
        for k in COLUMNS:
            df[k] = getattr(self, k).tolist()
        df["target_l0"] = self.target_l0
        return df


def compare_at_matched_l0(source: Source | torch.Tensor, site: str, target_l0: float, d_sae: int,
                          config: TrainConfig | None = None,
                          architectures: Sequence[str] = ("relu", "topk", "batchtopk", "jumprelu"),
                          eval_rows: torch.Tensor | None = None, vlm=None,
                          eval_batches: Sequence[Batch] | None = None, positions: PositionSpec = None,
                          factors: Sequence[float] = (0.25, 1.0, 4.0),
                          rounds: int = 2) -> SAEComparison:
    """Train each architecture on the same rows to L0 ≈ target_l0 and tabulate them.

    TopK and BatchTopK take k = round(target_l0). ReLU's and JumpReLU's sparsity coefficients are
    searched: round 1 trains the default times each of `factors` (all SAEs of a round share one
    pass over the data); each later round trains the coefficient interpolated (log L0 against log
    coefficient) between the two nearest candidates. The candidate nearest the target in log L0 is
    kept; the table reports the L0 it reached on `eval_rows` (default: the source's first chunk,
    i.e. in-sample) — so the match is as close as the search got, never assumed. With `vlm` and
    `eval_batches` (inputs or (inputs, answers)) it also reports loss and accuracy recovered.
    """
    cfg = config or TrainConfig()
    if isinstance(source, torch.Tensor):
        source = TensorSource({site: source})
    if eval_rows is None:
        eval_rows = source.chunk(0, 0, cfg.seed)[site]
    k = max(int(round(target_l0)), 1)
    fixed = [a for a in architectures if a in ("topk", "batchtopk")]
    specs = {a: [SAESpec(site, a, d_sae=d_sae, k=k, name=a)] for a in fixed}
    searched = [a for a in architectures if a not in specs]
    for a in searched:
        base = SAESpec(site, a, d_sae=d_sae).coefficient()
        specs[a] = [SAESpec(site, a, d_sae=d_sae, sparsity=base * f, name=f"{a}@{base * f:.6g}")
                    for f in factors]
    todo = [s for group in specs.values() for s in group]
    found: dict[str, list[tuple[SAESpec, SAE, float]]] = {a: [] for a in architectures}
    for r in range(max(rounds, 1)):
        if not todo:
            break
        trained = train_saes(source, todo, cfg, progress=False)
        for s in todo:
            sae = trained[s.label()]
            found[s.architecture].append((s, sae, reconstruction(sae, eval_rows).l0))
        todo = [_next_coefficient(found[a], target_l0) for a in searched] if r + 1 < rounds else []
        todo = [s for s in todo if s is not None]
    rows = []
    for a in architectures:
        spec, sae, _ = min(found[a], key=lambda t: abs(math.log(max(t[2], 1e-6) / target_l0)))
        rec = reconstruction(sae, eval_rows)
        if vlm is not None and eval_batches is not None:
            rec = evaluate_sae(sae, vlm, eval_batches, site=site, positions=positions)
        knob = float(spec.k) if a in ("topk", "batchtopk") else spec.coefficient()
        rows.append((knob, rec))
    col = lambda f: torch.tensor([getattr(r, f) for _, r in rows], dtype=torch.float64)  # noqa: E731
    return SAEComparison(architectures=tuple(architectures), target_l0=float(target_l0),
                         knob=torch.tensor([kn for kn, _ in rows], dtype=torch.float64), l0=col("l0"),
                         explained_variance=col("explained_variance"), mse=col("mse"),
                         dead_fraction=col("dead_fraction"), loss_recovered=col("loss_recovered"),
                         accuracy_recovered=col("accuracy_recovered"), site=site)


def _next_coefficient(tried: list[tuple[SAESpec, SAE, float]], target: float) -> SAESpec | None:
    """The coefficient log-interpolated between the neighbours (in coefficient) whose L0 straddle
    the target (their log-midpoint when the interpolation hugs one end: L0 can fall off a cliff),
    or extrapolated from the two candidates nearest the target when none straddle it."""
    pts = sorted(((math.log(s.coefficient()), math.log(max(l0, 1e-6))) for s, _, l0 in tried))
    goal = math.log(target)
    cross = [(a, b) for a, b in zip(pts, pts[1:], strict=False) if (a[1] - goal) * (b[1] - goal) < 0]
    near = list(cross[0]) if cross else sorted(pts, key=lambda p: abs(p[1] - goal))[:2]
    if len(near) < 2 or near[0][1] == near[1][1]:
        return None
    (c1, l1), (c2, l2) = near
    c = c1 + (goal - l1) * (c2 - c1) / (l2 - l1)
    if cross and not 0.25 < (c - c1) / (c2 - c1) < 0.75:
        c = (c1 + c2) / 2
    spec = tried[0][0]
    coef = math.exp(min(max(c, min(p[0] for p in pts) - 2.0), max(p[0] for p in pts) + 2.0))
    if any(abs(math.log(s.coefficient()) - math.log(coef)) < 1e-6 for s, _, _ in tried):
        return None
    return replace(spec, sparsity=coef, name=f"{spec.architecture}@{coef:.6g}")
