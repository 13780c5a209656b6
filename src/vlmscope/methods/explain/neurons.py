"""Domain- and modality-specific neurons, with deactivation experiments.

- Domain-specific neurons (MMNeuron, Huo et al. 2024): a neuron's activation probability in each
  domain, normalised over domains; neurons whose distribution has low entropy are domain-specific.
  MMNeuron's selection (select="mmneuron", the default) keeps the `top_fraction` of all neurons
  with the lowest entropy among those whose probability in some domain tops the `bar` quantile of
  all probabilities, and assigns each kept neuron to every domain where it does: a neuron can be
  specific to two domains, and a domain that no neuron singles out gets none. select="per-domain"
  instead keeps, for every domain, the `top_fraction` lowest-entropy neurons among those firing most
  there, so every domain gets neurons, however unspecific. MMNeuron counts a neuron as active when
  it is > 0 (after a ReLU-like activation); gated MLPs (SiLU · up) have no such zero, so by default
  a neuron "fires" when it exceeds its own `quantile` over all domains' tokens (fire="positive"
  gives the paper's rule).
- Modality-specific neurons (MINER, Huang et al. 2024): a neuron's importance for image and for
  text tokens (mean |activation| over each modality's positions, each relative to its layer's
  average); the log ratio ranks image- and text-specific neurons.
- `deactivate`: switch each selected set off and measure how hard each group (domain, modality) is
  hit; the targeted group should be hit hardest. "zero" sets the neurons to 0 (MMNeuron, MINER);
  "clamp" holds them at or below their firing threshold, which is MMNeuron's zeroing generalised to
  the firing rule used: with a ReLU and fire="positive" the two are the same, while zeroing a dense
  GELU / SiLU neuron shifts every group alike and hides what is specific to one; "mean" sets them to
  their mean over every group (standard mean-ablation; it writes that mean where a sparse neuron
  was silent, hitting the other groups).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from vlmscope.errors import InputError
from vlmscope.model.interventions import ablate, hook
from vlmscope.results import Result, long_frame


def _acts(vlm, inputs, sites, positions) -> dict[str, torch.Tensor]:
    """site -> (rows, neurons) activations at the selected positions."""
    names = vlm._resolve(sites)
    _, cache = vlm.run_with_cache(inputs, names)
    mask = None
    out = {}
    for s in names:
        if mask is None:
            mask = vlm.select(inputs, positions, stream=vlm.site(s).stream)
        out[s] = cache[s][mask].float()
    return out


@dataclass(frozen=True, repr=False)
class DomainNeurons(Result):
    """Activation probability per (site, neuron, domain), its entropy over domains, and the selected
    low-entropy neurons with the domain each is specific to."""

    kind = "domain_neurons"
    sites: tuple[str, ...]
    domains: tuple[str, ...]
    prob: torch.Tensor  # (site, neuron, domain)
    entropy: torch.Tensor  # (site, neuron), nats; log(len(domains)) = uniform
    selected_site: torch.Tensor  # (k,) index into sites
    selected_neuron: torch.Tensor  # (k,)
    selected_domain: torch.Tensor  # (k,) index into domains: the one each fires most in
    fire: str
    mean: torch.Tensor  # (site, neuron) mean activation over every domain's tokens (for how="mean")
    threshold: torch.Tensor  # (site, neuron) the firing threshold (for how="clamp")
    selected_in: torch.Tensor  # (k, domain) bool: the domains each selected neuron is specific to
    selection: str  # "mmneuron" or "per-domain" (module docstring)

    def __repr__(self) -> str:
        counts = {g: sum(map(len, ns.values())) for g, ns in self.groups().items()}
        return f"DomainNeurons({len(self.sites)} sites, {self.selection} selection, neurons per domain set {counts})"

    def neurons_for(self, domain: str) -> dict[str, list[int]]:
        """site -> neurons specific to `domain`, alone or with other domains (MMNeuron's per-domain set)."""
        if domain not in self.domains:
            raise InputError(f"unknown domain {domain!r}; valid: {', '.join(self.domains)}")
        d = self.domains.index(domain)
        return self._sites_of(self.selected_in[:, d])

    def groups(self) -> dict[str, dict[str, list[int]]]:
        """Selected neurons grouped by the exact set of domains they are specific to: "textured+noisy"
        -> site -> neurons. The deactivation targets of `zoo_domain_neurons`: each group's own domains
        are the ones it names (`Deactivation.selectivity`)."""
        keys = [tuple(row) for row in self.selected_in.tolist()]
        out = {}
        for key in sorted(set(keys), key=lambda k: (-sum(k), [not x for x in k])):
            name = "+".join(d for d, x in zip(self.domains, key) if x)
            out[name] = self._sites_of(torch.tensor([k == key for k in keys], dtype=torch.bool))
        return out

    def _sites_of(self, mask: torch.Tensor) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for s, n in zip(self.selected_site[mask].tolist(), self.selected_neuron[mask].tolist()):
            out.setdefault(self.sites[s], []).append(n)
        return out

    def reference(self, how: str) -> dict[str, torch.Tensor] | None:
        """site -> (neuron,) values `deactivate(..., how, reference)` needs: thresholds for "clamp",
        means for "mean", None for "zero"."""
        if how not in DEACTIVATIONS:
            raise InputError(f"unknown deactivation {how!r}; valid: {', '.join(DEACTIVATIONS)}")
        table = {"clamp": self.threshold, "mean": self.mean}.get(how)
        return None if table is None else dict(zip(self.sites, table))

    def to_dataframe(self):
        """One row per selected neuron: site, neuron, the domain it fires most in, the domains it is
        specific to, entropy, probability per domain."""
        import pandas as pd

        rows = []
        for s, n, d, mine in zip(self.selected_site.tolist(), self.selected_neuron.tolist(),
                                 self.selected_domain.tolist(), self.selected_in.tolist()):
            row = {"site": self.sites[s], "neuron": n, "domain": self.domains[d],
                   "domains": "+".join(x for x, m in zip(self.domains, mine) if m),
                   "entropy": float(self.entropy[s, n])}
            row.update({f"p_{dom}": float(self.prob[s, n, j]) for j, dom in enumerate(self.domains)})
            rows.append(row)
        return pd.DataFrame(rows)


def entropy_selection(prob: torch.Tensor, top_fraction: float, tiebreak: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Entropy over domains of (site, neuron, domain) probabilities normalised per neuron; per
    domain, the top_fraction of all neurons with the lowest entropy among those firing most in that
    domain (neurons that never fire are skipped; equal entropies go to the larger `tiebreak`,
    (site, neuron)). Returns (entropy, flat indices, their domain)."""
    ent = domain_entropy(prob)
    ent = torch.where(prob.sum(-1) > 0, ent, torch.full_like(ent, float("inf")))
    k = max(1, int(round(top_fraction * ent.numel())))
    flat_ent, owner = ent.flatten(), prob.flatten(0, 1).argmax(-1)
    picks, domains = [], []
    for d in range(prob.shape[-1]):
        idx = _lowest(torch.where(owner == d, flat_ent, torch.full_like(flat_ent, float("inf"))), k, tiebreak)
        picks.append(idx)
        domains.append(torch.full_like(idx, d))
    return ent, torch.cat(picks), torch.cat(domains)


def domain_entropy(prob: torch.Tensor) -> torch.Tensor:
    """(site, neuron) entropy in nats of each neuron's firing probabilities normalised over domains."""
    q = prob / prob.sum(-1, keepdim=True).clamp_min(1e-12)
    return -(q * q.clamp_min(1e-12).log()).sum(-1)


def _lowest(flat_ent: torch.Tensor, k: int, tiebreak: torch.Tensor | None) -> torch.Tensor:
    """Indices of the k lowest finite entries (equal ones, to 6 decimals, go to the larger `tiebreak`)."""
    order = torch.arange(len(flat_ent)) if tiebreak is None else (-tiebreak.flatten()).argsort()
    idx = order[flat_ent[order].round(decimals=6).argsort(stable=True)][:k]
    return idx[flat_ent[idx].isfinite()]


def mmneuron_selection(prob: torch.Tensor, top_fraction: float, bar: float = 0.95,
                       tiebreak: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MMNeuron's rule over (site, neuron, domain) probabilities: the `top_fraction` of all neurons
    with the lowest entropy over domains, among those whose probability in some domain exceeds the
    `bar` quantile of every probability; each kept neuron is specific to each domain where it
    exceeds that value. Equal entropies go to the larger `tiebreak` (site, neuron). Returns (entropy,
    flat indices, (k, domain) bool: the domains each is specific to)."""
    if not 0 < bar < 1:
        raise InputError(f"bar must be a quantile in (0, 1), got {bar}")
    ent = domain_entropy(prob)
    flat_prob = prob.flatten()
    level = float(flat_prob.kthvalue(max(1, round(bar * flat_prob.numel()))).values)
    above = prob > level  # (site, neuron, domain)
    ent_ok = torch.where(above.any(-1), ent, torch.full_like(ent, float("inf"))).flatten()
    idx = _lowest(ent_ok, max(1, int(round(top_fraction * ent.numel()))), tiebreak)
    return ent, idx, above.flatten(0, 1)[idx]


SELECTIONS = ("mmneuron", "per-domain")


def domain_neurons(vlm, inputs_by_domain: Mapping[str, Mapping[str, Any]], sites: str | Sequence[str] =
                   "lm.blocks.*.mlp.post", positions="image", top_fraction: float = 0.01, quantile: float = 0.9,
                   fire: str = "quantile", select: str = "mmneuron", bar: float = 0.95) -> DomainNeurons:
    """MMNeuron's domain-specific neurons among `sites` (activations at `positions` of each domain's
    inputs); `select` and `bar`: which neurons are kept (module docstring)."""
    if fire not in ("quantile", "positive"):
        raise InputError(f"unknown firing rule {fire!r}; valid: 'quantile', 'positive'")
    if select not in SELECTIONS:
        raise InputError(f"unknown selection {select!r}; valid: {', '.join(map(repr, SELECTIONS))}")
    if len(inputs_by_domain) < 2:
        raise InputError("domain-specific neurons need at least two domains")
    acts = {d: _acts(vlm, x, sites, positions) for d, x in inputs_by_domain.items()}
    names = list(next(iter(acts.values())))
    probs, gaps, mean, thresholds = [], [], [], []
    for s in names:
        per = [acts[d][s] for d in inputs_by_domain]  # each (rows, neuron)
        if fire == "quantile":
            pooled = torch.cat(per)
            k = max(1, int(quantile * pooled.shape[0]))
            thr = pooled.kthvalue(k, dim=0).values  # (neuron,)
        else:
            thr = torch.zeros(per[0].shape[-1])
        probs.append(torch.stack([(a > thr).float().mean(0) for a in per], -1))  # (neuron, domain)
        means = torch.stack([a.mean(0) for a in per], -1)  # (neuron, domain)
        mean.append(torch.cat(per).mean(0))
        thresholds.append(thr)
        gaps.append((means.max(-1).values - means.median(-1).values) / (torch.cat(per).std(0) + 1e-6))
    prob = torch.stack(probs)  # (site, neuron, domain)
    if select == "mmneuron":
        ent, flat, mine = mmneuron_selection(prob, top_fraction, bar, torch.stack(gaps))
        dom = prob.flatten(0, 1)[flat].argmax(-1)
    else:
        ent, flat, dom = entropy_selection(prob, top_fraction, torch.stack(gaps))
        mine = torch.nn.functional.one_hot(dom, prob.shape[-1]).bool()
    n = prob.shape[1]
    return DomainNeurons(tuple(names), tuple(inputs_by_domain), prob, ent, flat // n, flat % n, dom, fire,
                         torch.stack(mean), torch.stack(thresholds), mine, select)


@dataclass(frozen=True, repr=False)
class ModalityNeurons(Result):
    """Importance of each neuron for image and text tokens, and the most specific neurons of each."""

    kind = "modality_neurons"
    sites: tuple[str, ...]
    importance: torch.Tensor  # (site, neuron, 2): image, text (relative to the layer's mean)
    specificity: torch.Tensor  # (site, neuron): log(image / text) importance
    image_neurons: torch.Tensor  # (k, 2) rows of (site index, neuron)
    text_neurons: torch.Tensor  # (k, 2)

    def neurons_for(self, modality: str) -> dict[str, list[int]]:
        if modality not in ("image", "text"):
            raise InputError(f"unknown modality {modality!r}; valid: 'image', 'text'")
        out: dict[str, list[int]] = {}
        for s, n in (self.image_neurons if modality == "image" else self.text_neurons).tolist():
            out.setdefault(self.sites[s], []).append(n)
        return out

    def to_dataframe(self):
        df = long_frame(self.specificity, ("site", "neuron"), {"site": list(self.sites)}, "specificity")
        df["image_importance"] = self.importance[..., 0].flatten().tolist()
        df["text_importance"] = self.importance[..., 1].flatten().tolist()
        return df


def modality_neurons(vlm, inputs: Mapping[str, Any], sites: str | Sequence[str] = "lm.blocks.*.mlp.post",
                     top_fraction: float = 0.01) -> ModalityNeurons:
    """MINER-style modality-specific neurons: mean |activation| at image vs text positions."""
    img, txt = _acts(vlm, inputs, sites, "image"), _acts(vlm, inputs, sites, "text")
    names = list(img)
    imp = []
    for s in names:
        a, b = img[s].abs().mean(0), txt[s].abs().mean(0)  # (neuron,)
        imp.append(torch.stack([a / a.mean().clamp_min(1e-12), b / b.mean().clamp_min(1e-12)], -1))
    importance = torch.stack(imp)  # (site, neuron, 2)
    spec = (importance[..., 0].clamp_min(1e-12) / importance[..., 1].clamp_min(1e-12)).log()
    k = max(1, int(round(top_fraction * spec.numel())))
    n = spec.shape[1]
    pick = lambda flat: torch.stack([flat // n, flat % n], -1)  # noqa: E731
    return ModalityNeurons(tuple(names), importance, spec, pick(spec.flatten().topk(k).indices),
                           pick((-spec).flatten().topk(k).indices))


@dataclass(frozen=True, repr=False)
class Deactivation(Result):
    """How hard each group is hit (`hit`, larger = more damage) when each target's neurons are
    zero-ablated; `selectivity` compares a target's own group with the others."""

    kind = "deactivation"
    targets: tuple[str, ...]
    groups: tuple[str, ...]
    hit: torch.Tensor  # (target, group)
    n_neurons: tuple[int, ...]
    metric: str

    @property
    def selectivity(self) -> dict[str, float]:
        """target -> mean hit on its own groups / mean hit on the other groups, for targets that name
        groups: "noisy", or "textured+noisy" for neurons specific to both (`DomainNeurons.groups`)."""
        out = {}
        for t, name in enumerate(self.targets):
            parts = name.split("+")
            if not set(parts) <= set(self.groups) or len(parts) == len(self.groups):
                continue
            mine = [self.groups.index(p) for p in parts]
            own = float(self.hit[t, mine].mean())
            others = [float(self.hit[t, j]) for j in range(len(self.groups)) if j not in mine]
            mean = sum(others) / len(others)
            out[name] = own / mean if mean > 0 else float("inf") if own > 0 else float("nan")
        return out

    def to_dataframe(self):
        return long_frame(self.hit, ("target", "group"), {"target": list(self.targets),
                                                          "group": list(self.groups)}, self.metric)


DEACTIVATIONS = ("zero", "clamp", "mean")


def _clamp(site: str, neurons: Sequence[int], cap: torch.Tensor):
    idx = torch.tensor(list(neurons))

    def fn(t: torch.Tensor, *, site: str) -> torch.Tensor:  # (..., neuron)
        out = t.clone()
        out[..., idx] = torch.minimum(t[..., idx], cap[idx].to(t.device, t.dtype))
        return out
    return hook(site, fn)


def ablations(neurons: Mapping[str, Sequence[int]], how: str = "zero",
              reference: Mapping[str, torch.Tensor] | None = None) -> list:
    """Interventions switching off site -> neurons (see the module docstring); "clamp" and "mean"
    read `reference[site]`, (neuron,) thresholds or means (`DomainNeurons.reference(how)`)."""
    if how not in DEACTIVATIONS:
        raise InputError(f"unknown deactivation {how!r}; valid: {', '.join(DEACTIVATIONS)}")
    if how != "zero" and reference is None:
        raise InputError(f"deactivation {how!r} needs reference= (site -> per-neuron values)")
    out = []
    for site, ns in neurons.items():
        if not ns:
            continue
        if how == "zero":
            out.append(ablate(site, neurons=list(ns)))
        elif how == "mean":
            out.append(ablate(site, "mean", neurons=list(ns), reference=reference[site]))
        else:
            out.append(_clamp(site, ns, reference[site]))
    return out


def deactivate(vlm, inputs_by_group: Mapping[str, Mapping[str, Any]], neuron_sets: Mapping[str, Mapping[str,
               Sequence[int]]], damage: Callable[[Any, str, Mapping[str, Any], list], float],
               metric: str = "damage", how: str = "zero", reference: Mapping[str, torch.Tensor] | None = None,
               ) -> Deactivation:
    """For each target's neurons (site -> neurons) switched off (`ablations(ns, how, reference)`),
    `damage(vlm, group, inputs, interventions)` on each group's inputs (0 for no interventions)."""
    hit = torch.tensor([[damage(vlm, g, x, ablations(ns, how, reference)) for g, x in inputs_by_group.items()]
                        for ns in neuron_sets.values()])
    return Deactivation(tuple(neuron_sets), tuple(inputs_by_group), hit,
                        tuple(sum(len(v) for v in ns.values()) for ns in neuron_sets.values()), metric)


def hidden_change(site: str | None = None, positions=None) -> Callable:
    """A `damage`: the mean relative change ||h' - h|| / ||h|| of a residual site (default: the LM's
    last block output) at `positions`, by default the group's own (modality groups "image", "text")."""
    def damage(vlm, group, inputs, interventions) -> float:
        s = site or f"lm.blocks.{vlm.n_layers('lm') - 1}.resid_post"
        _, clean = vlm.run_with_cache(inputs, s)
        _, hurt = vlm.run_with_cache(inputs, s, interventions=interventions)
        mask = vlm.select(inputs, group if positions is None else positions, stream=vlm.site(s).stream)
        a, b = clean[s][mask].float(), hurt[s][mask].float()
        return float(((b - a).norm(dim=-1) / a.norm(dim=-1).clamp_min(1e-12)).mean())
    return damage


def modality_deactivation(vlm, inputs: Mapping[str, Any], result: ModalityNeurons, site: str | None = None
                          ) -> Deactivation:
    """Ablate image- then text-specific neurons; hit = relative change of the final hidden state at
    image and at text positions."""
    sets = {m: result.neurons_for(m) for m in ("image", "text")}
    return deactivate(vlm, {"image": inputs, "text": inputs}, sets, hidden_change(site), "relative hidden change")
