"""Linear probes (Alain & Bengio 2016; Hewitt & Liang 2019 for control tasks).

A probe is a linear classifier (multinomial logistic regression with L2) or a ridge regressor
trained to read a property from a site's activations. vlmscope trains every probe of a study —
all layers x sites x patch positions — at once, as one stack: a closed-form ridge warm start,
then a few batched L-BFGS steps with per-probe early stopping on a validation split. Accuracy
is reported on a held-out test split, beside the accuracy of the same probe on a control task
(labels re-assigned at random) — their difference is the probe's selectivity.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import torch

from vlmscope.results import Result, long_frame


@dataclass(frozen=True)
class ProbeConfig:
    kind: Literal["logistic", "ridge"] = "logistic"
    l2: float | None = None  # penalty on the mean loss; None: 1 / (2 n_train), sklearn's C = 1
    val_frac: float = 0.1
    test_frac: float = 0.2
    steps: int = 4  # L-BFGS rounds of `inner` iterations; early stopping keeps each probe's best round
    inner: int = 5
    patience: int = 2
    control: bool = True
    seed: int = 0


@dataclass(frozen=True, repr=False)
class ProbeResult(Result):
    """A stack of trained probes: one per name (site, site@patch, ...), with test scores."""

    kind = "probes"
    names: tuple[str, ...]
    target: str
    probe_kind: str
    score: torch.Tensor  # (probe,) test accuracy (logistic) or R^2 (ridge)
    control_score: torch.Tensor  # (probe,) the same on the control task; NaN when not run
    weight: torch.Tensor  # (probe, d, classes)
    bias: torch.Tensor  # (probe, classes)
    mean: torch.Tensor  # (probe, d) feature standardisation
    std: torch.Tensor  # (probe, d)
    classes: tuple[str, ...] = ()
    n_train: int = 0
    n_test: int = 0

    @property
    def selectivity(self) -> torch.Tensor:
        return self.score - self.control_score

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """(probe, n, d) -> (probe, n, classes) scores of new activations."""
        x = (features.float() - self.mean[:, None]) / self.std[:, None]
        return torch.baddbmm(self.bias[:, None], x, self.weight)

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        out = self.logits(features)
        return out.argmax(-1) if self.probe_kind == "logistic" else out[..., 0]

    def to_dataframe(self):
        df = long_frame(self.score, ("probe",), {"probe": list(self.names)}, name="score")
        df["control"] = self.control_score.tolist()
        df["selectivity"] = self.selectivity.tolist()
        df["target"] = self.target
        return df

    def __getitem__(self, name: str) -> float:
        return float(self.score[self.names.index(name)])


def _split(n: int, cfg: ProbeConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed))
    n_test, n_val = int(n * cfg.test_frac), int(n * cfg.val_frac)
    return perm[n_test + n_val:], perm[n_test:n_test + n_val], perm[:n_test]


def _standardise(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-probe mean/std over rows weighted by w (probe, n)."""
    denom = w.sum(1, keepdim=True).clamp_min(1)[..., None]
    mean = (x * w[..., None]).sum(1, keepdim=True) / denom
    var = (((x - mean) ** 2) * w[..., None]).sum(1, keepdim=True) / denom
    return mean[:, 0], var[:, 0].sqrt().clamp_min(1e-6)


def _ridge(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched weighted ridge: x (p, n, d), y (p, n, c), w (p, n) -> W (p, d, c), b (p, c)."""
    xw = x * w[..., None]
    n = w.sum(1).clamp_min(1)
    ym = (y * w[..., None]).sum(1) / n[:, None]
    xm = xw.sum(1) / n[:, None]
    xc, yc = x - xm[:, None], y - ym[:, None]
    gram = (xc * w[..., None]).transpose(1, 2) @ xc  # (p, d, d)
    eye = torch.eye(x.shape[-1], dtype=x.dtype)
    rhs = (xc * w[..., None]).transpose(1, 2) @ yc
    weight = torch.linalg.solve(gram + lam * n[:, None, None] * eye, rhs)
    bias = ym - (xm[:, None] @ weight)[:, 0]
    return weight, bias


def _ce(x, y, w, weight, bias) -> torch.Tensor:
    """Per-probe weighted mean cross-entropy: (probe,)."""
    logits = torch.baddbmm(bias[:, None], x, weight)
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.clamp_min(0).flatten(), reduction="none")
    return (nll.view_as(w) * w).sum(1) / w.sum(1).clamp_min(1)


def _accuracy(x, y, w, weight, bias) -> torch.Tensor:
    pred = torch.baddbmm(bias[:, None], x, weight).argmax(-1)
    return ((pred == y).float() * w).sum(1) / w.sum(1).clamp_min(1)


def _r2(x, y, w, weight, bias) -> torch.Tensor:
    pred = torch.baddbmm(bias[:, None], x, weight)[..., 0]
    n = w.sum(1).clamp_min(1)
    mean = (y * w).sum(1) / n
    ss_res = (((pred - y) ** 2) * w).sum(1)
    ss_tot = (((y - mean[:, None]) ** 2) * w).sum(1).clamp_min(1e-12)
    return 1 - ss_res / ss_tot


def _fit_logistic(x, y, w_tr, w_va, n_classes: int, cfg: ProbeConfig):
    onehot = torch.nn.functional.one_hot(y.clamp_min(0), n_classes).float()
    weight, bias = _ridge(x, onehot, w_tr, 1e-3)
    # a ridge fit to one-hot targets has the right directions but a tiny scale: rescale per probe
    scale = torch.ones(x.shape[0])
    for s in (3.0, 10.0, 30.0):
        loss = _ce(x, y, w_tr, weight * s, bias * s)
        better = loss < _ce(x, y, w_tr, weight * scale[:, None, None], bias * scale[:, None])
        scale[better] = s
    weight = (weight * scale[:, None, None]).contiguous().requires_grad_(True)
    bias = (bias * scale[:, None]).contiguous().requires_grad_(True)
    opt = torch.optim.LBFGS([weight, bias], lr=1, max_iter=cfg.inner, history_size=10,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = _ce(x, y, w_tr, weight, bias).sum() + cfg.l2 * (weight ** 2).sum()
        loss.backward()
        return loss

    w_sel = w_va if w_va.sum() > 0 else w_tr  # no validation rows: keep the best training loss
    with torch.no_grad():
        best_loss = _ce(x, y, w_sel, weight, bias)
    best_w, best_b = weight.detach().clone(), bias.detach().clone()
    stall = torch.zeros(x.shape[0], dtype=torch.long)
    for _ in range(cfg.steps):
        opt.step(closure)
        with torch.no_grad():
            val = _ce(x, y, w_sel, weight, bias)
            improved = val < best_loss - 1e-5
            best_loss = torch.where(improved, val, best_loss)
            best_w[improved], best_b[improved] = weight[improved], bias[improved]
            stall = torch.where(improved, 0, stall + 1)
        if (stall >= cfg.patience).all():
            break
    return best_w, best_b


def fit_probes(features: torch.Tensor | Mapping[str, torch.Tensor], labels: torch.Tensor,
               config: ProbeConfig | None = None, *, names: Sequence[str] | None = None, target: str = "label",
               classes: Sequence[str] = (), types: torch.Tensor | None = None) -> ProbeResult:
    """Train one probe per feature set, all at once.

    features: (probe, n, d), or {name: (n, d)} with the same n. labels: (n,) shared or
    (probe, n); class ids >= 0 for logistic probes, -1 marks rows a probe ignores; real
    values for ridge. types: optional (n,) ids for a Hewitt & Liang control task (each type
    gets one random label); without them the control shuffles labels across rows.
    """
    cfg = config or ProbeConfig()
    if isinstance(features, Mapping):
        names = list(features) if names is None else list(names)
        x = torch.stack([features[k].float() for k in names])
    else:
        x = features.float()
        names = [f"probe{i}" for i in range(x.shape[0])] if names is None else list(names)
    p, n, _ = x.shape
    if len(names) != p:
        raise ValueError(f"{len(names)} names for {p} probes")
    y = labels if labels.dim() == 2 else labels.expand(p, n)
    if y.shape != (p, n):
        raise ValueError(f"labels have shape {tuple(labels.shape)}; expected ({n},) or ({p}, {n})")
    logistic = cfg.kind == "logistic"
    if cfg.kind not in ("logistic", "ridge"):
        raise ValueError(f"unknown probe kind {cfg.kind!r}; valid: 'logistic', 'ridge'")
    y = y.long() if logistic else y.float()
    valid = (y >= 0) if logistic else torch.isfinite(y)
    tr, va, te = _split(n, cfg)

    def rows(idx):
        w = torch.zeros(p, n)
        w[:, idx] = 1
        return w * valid

    w_tr, w_va, w_te = rows(tr), rows(va), rows(te)
    mean, std = _standardise(x, w_tr)
    xs = (x - mean[:, None]) / std[:, None]
    n_classes = int(y.max()) + 1 if logistic else 1

    l2 = cfg.l2 if cfg.l2 is not None else 1 / (2 * max(len(tr), 1))
    cfg = replace(cfg, l2=l2)

    def fit_and_score(targets):
        if logistic:
            weight, bias = _fit_logistic(xs, targets, w_tr, w_va, n_classes, cfg)
            return weight, bias, _accuracy(xs, targets, w_te, weight, bias)
        weight, bias = _ridge(xs, targets[..., None], w_tr + w_va, cfg.l2 + 1e-6)
        return weight, bias, _r2(xs, targets, w_te, weight, bias)

    weight, bias, score = fit_and_score(y)
    control = torch.full((p,), float("nan"))
    if cfg.control:
        g = torch.Generator().manual_seed(cfg.seed + 1)
        if types is not None:
            _, inv = torch.unique(types, return_inverse=True)
            pool = y[0][valid[0]] if logistic else y[0]
            table = pool[torch.randint(len(pool), (int(inv.max()) + 1,), generator=g)]
            shuffled = torch.where(valid, table[inv].expand(p, n), y)
        else:
            shuffled = y.clone()
            for i in range(p):
                idx = valid[i].nonzero().flatten()
                shuffled[i, idx] = y[i, idx[torch.randperm(len(idx), generator=g)]]
        control = fit_and_score(shuffled)[2]
    return ProbeResult(
        names=tuple(names), target=target, probe_kind=cfg.kind, score=score.detach(),
        control_score=control.detach(), weight=weight.detach(), bias=bias.detach(),
        mean=mean.detach(), std=std.detach(), classes=tuple(classes), n_train=len(tr) + len(va), n_test=len(te),
    )


# --- probing a VLM's sites -------------------------------------------------------------------


@dataclass(frozen=True, repr=False)
class ConceptTrace(Result):
    """Decodability of one concept at each site, in forward order (vision -> connector -> LM),
    and where it falls most: the survey's "is visual information lost at the connector?"."""

    kind = "concept_trace"
    target: str
    sites: tuple[str, ...]
    parts: tuple[str, ...]  # vision / connector / lm per site
    score: torch.Tensor  # (site,) test accuracy
    control_score: torch.Tensor  # (site,)
    n_rows: torch.Tensor  # (site,) rows probed
    drop_after: str  # the site after which decodability falls the most
    drop: float  # by how much (accuracy points, 0..1)

    def to_dataframe(self):
        df = long_frame(self.score, ("site",), {"site": list(self.sites)}, name="score")
        df["part"] = list(self.parts)
        df["control"] = self.control_score.tolist()
        df["depth"] = [i / max(1, len(self.sites) - 1) for i in range(len(self.sites))]
        df["target"] = self.target
        return df

    def lost(self, threshold: float = 0.1) -> bool:
        return self.drop >= threshold

    @classmethod
    def of(cls, target: str, sites: Sequence[str], score: torch.Tensor, control: torch.Tensor,
           n_rows: torch.Tensor) -> ConceptTrace:
        """A trace from per-site scores, with each site's part and the largest fall marked."""
        falls = score[:-1] - score[1:]
        k = int(falls.argmax()) if len(falls) else 0
        return cls(target=target, sites=tuple(sites), parts=tuple(s.split(".")[0] for s in sites), score=score,
                   control_score=control, n_rows=n_rows, drop_after=sites[k],
                   drop=float(falls[k]) if len(falls) else 0.0)

    def last_of(self, part: str) -> int | None:
        """Index of the last site probed in `part` (vision / connector / lm), None if none was."""
        idx = [i for i, p in enumerate(self.parts) if p == part]
        return idx[-1] if idx else None


def trace_sites(vlm, streams) -> list[str]:
    """Each block's residual output and the connector's output, in forward order, in `streams`."""
    return [s for s in vlm.sites() if (s.endswith(".resid_post") or s == "connector.out")
            and vlm.site(s).stream in streams]


def site_features(vlm, inputs: Mapping, sites: Sequence[str], labels: Mapping[str, torch.Tensor]
                  ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """For each site, the (rows, d) activations at the positions of its stream whose label is
    >= 0, and those labels. labels: {stream: (batch, pos) long}, -1 where there is no label."""
    _, cache = vlm.run_with_cache(inputs, list(sites))
    out = {}
    for site in sites:
        spec = vlm.site(site)
        if spec.stream not in labels:
            raise ValueError(f"no labels for the {spec.stream!r} stream of {site!r}; give labels for: "
                             f"{', '.join(sorted({vlm.site(s).stream for s in sites}))}")
        lab = labels[spec.stream]
        act = cache[site]
        if act.shape[:2] != lab.shape:
            raise ValueError(f"labels for {spec.stream!r} have shape {tuple(lab.shape)}, activations of {site!r} "
                             f"{tuple(act.shape[:2])}")
        keep = lab >= 0
        out[site] = (act[keep].flatten(1).float().cpu(), lab[keep].cpu())
    return out


def trace_concept(vlm, inputs: Mapping, labels: Mapping[str, torch.Tensor], sites: Sequence[str] | None = None,
                  target: str = "concept", config: ProbeConfig | None = None) -> ConceptTrace:
    """Probe one concept at every site (default: each vision block, the connector output, each LM
    block's residual), in forward order, and mark the largest fall in decodability."""
    if sites is None:
        sites = trace_sites(vlm, labels)
    feats = site_features(vlm, inputs, sites, labels)
    scores, controls, rows = [], [], []
    groups: dict[tuple, list[str]] = {}
    for s in sites:  # stack sites with the same rows and width into one batched fit
        x, y = feats[s]
        groups.setdefault((vlm.site(s).stream, x.shape[1], x.shape[0]), []).append(s)
    fitted: dict[str, tuple[float, float, int]] = {}
    for names in groups.values():
        x = torch.stack([feats[s][0] for s in names])
        r = fit_probes(x, feats[names[0]][1], config, names=names, target=target)
        for i, s in enumerate(names):
            fitted[s] = (float(r.score[i]), float(r.control_score[i]), x.shape[1])
    for s in sites:
        scores.append(fitted[s][0])
        controls.append(fitted[s][1])
        rows.append(fitted[s][2])
    return ConceptTrace.of(target, sites, torch.tensor(scores), torch.tensor(controls), torch.tensor(rows))


def patch_probe_grid(vlm, inputs: Mapping, labels: torch.Tensor, site: str,
                     config: ProbeConfig | None = None) -> tuple[torch.Tensor, ProbeResult]:
    """One probe per image-patch location (row, col) at `site`: a (rows, cols) heatmap of test
    accuracy over the image, and the probes. labels: (batch, pos) on the site's stream, -1 to skip."""
    _, cache = vlm.run_with_cache(inputs, site)
    spec = vlm.site(site)
    pos = vlm.positions(inputs)[spec.stream]
    act = cache[site].flatten(2).float().cpu()
    cells = sorted({(r, c) for r, c in zip(pos.row[pos.row >= 0].tolist(), pos.col[pos.row >= 0].tolist())})
    xs, ys = [], []
    for r, c in cells:
        at = (pos.row == r) & (pos.col == c)  # one position per image row
        idx = at.float().argmax(1)
        rows = torch.arange(act.shape[0])
        xs.append(act[rows, idx])
        ys.append(torch.where(at.any(1), labels[rows, idx], -1))
    result = fit_probes(torch.stack(xs), torch.stack(ys), config, names=[f"r{r}c{c}" for r, c in cells],
                        target=f"{site} per patch")
    h, w = max(r for r, _ in cells) + 1, max(c for _, c in cells) + 1
    grid = torch.full((h, w), float("nan"))
    for (r, c), s in zip(cells, result.score):
        grid[r, c] = s
    return grid, result


def probe_sites(vlm, inputs: Mapping, labels: torch.Tensor, sites: Sequence[str], select: str = "last",
                config: ProbeConfig | None = None, target: str = "label") -> ProbeResult:
    """One probe per site on one vector per example: `select` = "last" (the last token), "mean:image"
    (the mean over image tokens: patches, tiles or Q-Former queries alike), "mean:text", or any
    position spec picking one position per row. labels: (batch,) per-example targets."""
    from vlmscope.methods.similarity import site_representations

    reps = site_representations(vlm, inputs, sites, positions=select)
    widths = {t.shape[-1] for t in reps.values()}
    if len(widths) != 1:
        raise ValueError(f"sites {list(sites)} have different widths {sorted(widths)}; probe them in separate calls")
    return fit_probes(reps, labels, config, target=target)


def store_features(store, sites: Sequence[str]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Features for `fit_probes` from an activation store (`m.cache_dataset`): {site: (rows, d)} and
    the rows' (example, position) index, which must agree across the sites."""
    feats, index = {}, None
    for site in sites:
        acts, idx = store.load(site)
        if index is not None and not torch.equal(idx, index):
            raise ValueError(f"{site!r} holds other rows than {sites[0]!r}; probe sites of one stream together")
        feats[site], index = acts.flatten(1).float(), idx
    return feats, index
