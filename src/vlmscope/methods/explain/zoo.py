"""Domain- and modality-specific neurons checked against the shapes world's ground truth (the demo's
experiments; SAE features are in zoo_features.py).

Each function returns (result, scores) like `vlmscope.experiments.grounded`: the typed result and
a dict of named numbers for the report's scorecard.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from vlmscope.data import DOMAINS
from vlmscope.errors import InputError
from vlmscope.methods.explain.neurons import (
    DomainNeurons,
    ModalityNeurons,
    deactivate,
    domain_neurons,
    hidden_change,
    modality_deactivation,
    modality_neurons,
)
from vlmscope.methods.metrics import last_logits
from vlmscope.zoo import truth


def _answer_logprob_drop(answers: dict[str, torch.Tensor]):
    def damage(vlm, group, inputs, interventions) -> float:
        ids = answers[group]
        clean = last_logits(vlm, vlm.run(inputs), inputs).float().log_softmax(-1)
        hurt = last_logits(vlm, vlm.run(inputs, interventions), inputs).float().log_softmax(-1)
        rows = torch.arange(len(ids))
        return float((clean[rows, ids] - hurt[rows, ids]).mean())
    return damage


def background_mask(vlm, inputs, scenes, stream: str) -> torch.Tensor:
    """(batch, pos) True at the image patches of `stream` where no object is (ground truth)."""
    pos = vlm.positions(inputs)[stream]
    return (pos.row >= 0) & (truth.patch_labels(vlm, inputs, scenes, "colour", stream=stream) < 0)


def zoo_domain_neurons(vlm, n: int = 120, seed: int = 0, top_fraction: float = 0.01,
                       sites: str = "vision.blocks.*.mlp.post", where: str = "background", quantile: float = 0.9,
                       how: str = "clamp", fire: str = "quantile", select: str = "mmneuron", bar: float = 0.95,
                       ) -> tuple[DomainNeurons, dict, dict[str, float]]:
    """Domain-specific neurons for the three backgrounds: the same scenes and questions rendered on
    each, firing read at the background patches (`where="image"`: every patch) of the sites' stream.
    The selected neurons are grouped by the domains they are specific to (`DomainNeurons.groups`:
    "noisy", "textured+noisy", ...; a domain no neuron singles out has none, see neurons.py for
    `select`, `bar` and `fire`); each group is switched off (`how`) and the relative hidden change
    at those positions is measured at the first and the last block of that tower ("first block",
    "last block"), and for a generative model the answer's log-prob drop ("answer"). A group's
    own/other hit compares its own domains with the rest. Returns (neurons, {name: Deactivation}, scores)."""
    if where not in ("background", "image"):
        raise InputError(f"unknown position set {where!r}; valid: 'background', 'image'")
    exs = truth.examples(seed, n)
    by_domain = {d: [replace(e, scene=replace(e.scene, domain=d)) for e in exs] for d in DOMAINS}
    inputs = {d: truth.inputs_for(vlm, ex) for d, ex in by_domain.items()}
    stream = vlm.site(vlm.sites(sites)[0]).stream
    x0 = inputs[DOMAINS[0]]
    positions = (background_mask(vlm, x0, [e.scene for e in exs], stream) if where == "background"
                 else vlm.select(x0, "image", stream=stream))  # the same scenes on every domain: one mask
    dn = domain_neurons(vlm, inputs, sites, positions=positions, top_fraction=top_fraction, quantile=quantile,
                        fire=fire, select=select, bar=bar)
    sets = dn.groups()
    part = stream.split(".")[0]
    what = f"relative hidden change at {where} patches"
    ref = dn.reference(how)
    effects = {f"{name} block": deactivate(vlm, inputs, sets, hidden_change(f"{part}.blocks.{i}.resid_post", positions),
                                          f"{what}, {part} block {i}", how, ref)
               for name, i in (("first", 0), ("last", vlm.n_layers(part) - 1))}
    if not vlm.adapter.dual_encoder:
        answers = {d: truth.answer_ids(vlm, ex) for d, ex in by_domain.items()}
        effects["answer"] = deactivate(vlm, inputs, sets, _answer_logprob_drop(answers), "answer log-prob drop",
                                       how, ref)
    return dn, effects, _domain_scores(dn, effects)


def _domain_scores(dn: DomainNeurons, effects: dict) -> dict[str, float]:
    """Per domain: how many neurons are specific to it and the lowest entropy of those firing most
    there; per group of neurons: where they fire and how hard switching them off hits their own
    domains vs the others (`zoo_domain_neurons`)."""
    finite = dn.entropy[dn.entropy.isfinite()]
    scores: dict[str, float] = {"domain-specific neurons": len(dn.selected_neuron),
                                "lowest domain entropy (uniform: ln 3 = 1.10)": float(finite.min())}
    owner = dn.prob.argmax(-1)  # (site, neuron) the domain each neuron fires most in
    for i, d in enumerate(dn.domains):
        scores[f"neurons specific to {d}"] = int(dn.selected_in[:, i].sum())
        own_ent = dn.entropy[(owner == i) & dn.entropy.isfinite()]
        scores[f"lowest entropy of a neuron firing most on {d}"] = (float(own_ent.min()) if own_ent.numel()
                                                                    else float("nan"))
    weakest = float("inf")
    for g, neurons in dn.groups().items():
        idx = [(dn.sites.index(s), n) for s, ns in neurons.items() for n in ns]
        p = dn.prob[[s for s, _ in idx], [n for _, n in idx]].mean(0)  # (domain,) firing probability
        scores[f"{g} neurons"] = len(idx)
        for j, other in enumerate(dn.domains):
            scores[f"{g} neurons: firing probability on {other}"] = float(p[j])
        mine = [dn.domains.index(x) for x in g.split("+")]
        rest = [j for j in range(len(dn.domains)) if j not in mine]
        for name, eff in effects.items():
            hit = eff.hit[eff.targets.index(g)]
            scores[f"{g} neurons: own {name} hit"] = float(hit[mine].mean())
            if rest:
                scores[f"{g} neurons: other {name} hit"] = float(hit[rest].mean())
                scores[f"{g} neurons: own/other {name} hit"] = eff.selectivity[g]
        at = [e.selectivity[g] for name, e in effects.items() if name.endswith("block") and g in e.selectivity
              and not math.isnan(e.selectivity[g])]  # NaN: no effect there
        best = max(at) if at else float("nan")
        scores[f"{g} neurons: own/other hit, the block where it is largest"] = best
        if rest and not math.isnan(best):
            weakest = min(weakest, best)
    if weakest < float("inf"):
        scores["weakest own/other hit over the neuron groups, the block where it is largest"] = weakest
    return scores


def zoo_modality_neurons(vlm, n: int = 60, seed: int = 0, top_fraction: float = 0.01,
                         sites: str = "lm.blocks.*.mlp.post") -> tuple[ModalityNeurons, dict, dict[str, float]]:
    """MINER's image- and text-specific LM neurons on n zoo questions, each set zero-ablated and the
    relative hidden change at image and at text positions measured at the LM's first block (where
    MINER finds them) and its last (after image information has flowed into the text tokens).
    Returns (neurons, {"first block": Deactivation, "last block": Deactivation}, scores)."""
    x = truth.inputs_for(vlm, truth.examples(seed, n))
    res = modality_neurons(vlm, x, sites, top_fraction=top_fraction)
    last = vlm.n_layers("lm") - 1
    effects = {f"{name} block": modality_deactivation(vlm, x, res, f"lm.blocks.{i}.resid_post")
               for name, i in (("first", 0), ("last", last))}
    scores: dict[str, float] = {"modality-specific neurons per modality": len(res.image_neurons)}
    for m, neurons in (("image", res.image_neurons), ("text", res.text_neurons)):
        scores[f"{m} neurons in the first block"] = float((neurons[:, 0] == 0).float().mean())
        for name, eff in effects.items():
            scores[f"{m} neurons: own/other hit, {name}"] = eff.selectivity[m]
    return res, effects, scores
