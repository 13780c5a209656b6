"""The jobs whose memory is planned and measured, one per method, written once for both: run on a
real model they are measured (measure.py); run on the meta device they are the plan (plan.py).

- cache: `run_with_cache` of the sites on the batch, the cache kept on the model's device.
- patch: `patch_sweep` with the batch as its pairs, each forward carrying `sweep_batch` rows of
  patched copies (prefix reuse and identity skipping off: every forward reruns the whole sequence,
  the worst case; the pairs are the inputs patched into themselves).
- atp: `attribution_patching` on the batch (a forward and backward, then a cached forward), one
  position group ("all": the per-position bookkeeping is small and slow to plan).
- sae: the batch's rows of one site (the forward that feeds a trainer), then `sae_steps` steps of
  training one SAE on them with Adam, on the model's device.
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from vlmscope.errors import InputError

METHODS = ("cache", "patch", "atp", "sae")


@dataclass(frozen=True)
class Job:
    """What to plan or measure. sites: names or globs (None: every LM block's resid_post, the vision
    tower's for a dual encoder; for an SAE, the middle block's). The rest are the method's own
    sizes, defaulting to the library's."""

    method: str = "cache"
    sites: tuple[str, ...] | None = None
    sweep_batch: int = 32  # patch: rows per forward of the sweep (patch_sweep's batch_size)
    positions: str = "all"  # sae: the token roles whose rows train it
    architecture: str = "topk"
    expansion: int = 8
    k: int = 32
    sae_batch: int = 1024  # rows per SAE step (fewer when the batch holds fewer)
    sae_steps: int = 2

    def __post_init__(self):
        if self.method not in METHODS:
            raise InputError(f"unknown method {self.method!r}; valid: {', '.join(METHODS)}")
        if self.sites is not None and isinstance(self.sites, str):
            object.__setattr__(self, "sites", (self.sites,))

    def site_names(self, vlm) -> list[str]:
        """The sites this job reads on `vlm` (an error where the method does not apply)."""
        if self.method in ("patch", "atp") and vlm.adapter.dual_encoder:
            raise InputError(f"{self.method} needs a generative VLM (a metric of its logits); "
                             f"{type(vlm.model).__name__} is a dual encoder: plan 'cache' or 'sae'")
        if self.sites is not None:
            return vlm._resolve(list(self.sites))
        part = "lm" if vlm.sites("lm.blocks.0.resid_post") else "vision"  # a dual encoder has no LM
        if self.method == "sae":
            return [f"{part}.blocks.{vlm.n_layers(part) // 2}.resid_post"]
        return vlm.sites(f"{part}.blocks.*.resid_post")


def _metric():
    from vlmscope.methods.metrics import LogitDiff

    return LogitDiff(0, 1)


def cache(vlm, inputs: Mapping[str, Any], job: Job, tracker=None):
    return vlm.run_with_cache(inputs, job.site_names(vlm))


def patch(vlm, inputs: Mapping[str, Any], job: Job, tracker=None):
    from vlmscope.methods.patching import patch_sweep

    sites = job.site_names(vlm)
    pairs = inputs["input_ids"].shape[0]
    per_forward = max(1, job.sweep_batch // pairs)
    # two forwards' worth of jobs: a later forward also holds the output of the one before
    groups = [[i] for i in range(math.ceil(2 * per_forward / len(sites)))]
    return patch_sweep(vlm, inputs, inputs, _metric(), sites=sites, positions=groups,
                       batch_size=job.sweep_batch, prefix_reuse=False, skip_unchanged=False)


def atp(vlm, inputs: Mapping[str, Any], job: Job, tracker=None):
    from vlmscope.methods.attribution import attribution_patching

    return attribution_patching(vlm, inputs, inputs, _metric(), sites=job.site_names(vlm), positions="all")


def sae(vlm, inputs: Mapping[str, Any], job: Job, tracker=None):
    """The real trainer (`train_saes`) on the batch's rows of the site."""
    from vlmscope.methods.sae import SAESpec, TensorSource, TrainConfig, site_rows, train_saes

    (site,) = job.site_names(vlm)[:1]
    rows = site_rows(vlm, inputs, [site], job.positions)
    spec = SAESpec(site, job.architecture, expansion=job.expansion, k=job.k)
    n = len(rows[site])
    cfg = TrainConfig(steps=job.sae_steps, batch_size=min(job.sae_batch, n), log_every=job.sae_steps,
                      checkpoint_every=10**9)
    # where the SAE trains: the model's device, where the trainer takes a device (it trains on CPU otherwise)
    where = {"device": str(vlm.device)} if "device" in inspect.signature(train_saes).parameters else {}
    with _phase(tracker, "sae"):
        return train_saes(TensorSource(rows), [spec], cfg, progress=False, **where)


def sae_on_meta(vlm, inputs: Mapping[str, Any], job: Job, tracker=None):
    """What `sae` holds, step by step, with the SAE on the meta device (for plans): the site's rows,
    their shuffled copy, the SAE, its Adam state, each step's forward and backward, the trained copy."""
    from vlmscope.methods.sae import LossContext, SAEConfig, build_sae, site_rows

    (site,) = job.site_names(vlm)[:1]
    rows = site_rows(vlm, inputs, [site], job.positions)[site].to("meta")  # (rows, d_in)
    n, d_in = rows.shape
    batch = min(job.sae_batch, n)
    with _phase(tracker, "sae", "sae rows"):
        chunk = rows[torch.randperm(n)].float()  # the trainer's shuffled chunk
    with _phase(tracker, "sae", "sae training"), torch.device("meta"):
        model = build_sae(SAEConfig(job.architecture, d_in, job.expansion * d_in, k=job.k, site=site))
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad])
        silent = torch.zeros(model.cfg.d_sae, dtype=torch.long)
        for _ in range(job.sae_steps):
            x = chunk[:batch] * 1.0  # (batch, d_in), scaled rows
            out = model.train_step(x, LossContext(dead=silent > 0))
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            model.remove_parallel_decoder_grad()
            opt.step()
            model.normalise_decoder()
            silent = torch.where((out.acts > 0).any(0), 0, silent + batch)
        return copy.deepcopy(model)


def _phase(tracker, phase: str, tag: str | None = None):
    from contextlib import nullcontext

    return nullcontext() if tracker is None else tracker.phase_of(phase, tag)


JOBS = {"cache": cache, "patch": patch, "atp": atp, "sae": sae}
