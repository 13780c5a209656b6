"""The logit lens (nostalgebraist 2020) and the tuned lens (Belrose et al. 2023), over text and
image positions alike.

The logit lens reads each layer's residual stream through the LM's final norm and unembedding,
as if the model stopped there. At image-token positions it shows whether patches already carry
words for what they depict (Neo et al. 2024); its entropy across layers shows the three-stage
pattern Huo et al. (2024) report. The tuned lens learns one affine translator per layer so that
the early layers' reading matches the final distribution (lower KL to the final layer).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from vlmscope.model.positions import ROLES
from vlmscope.results import Result, long_frame


@dataclass(frozen=True, repr=False)
class LensResult(Result):
    """What each layer 'predicts' at each position: (layer, batch, pos[, k]) tensors."""

    kind = "lens"
    lens: str  # "logit", "tuned" or "vision-logit"
    layers: tuple[int, ...]
    top_ids: torch.Tensor  # (layer, batch, pos, k)
    top_probs: torch.Tensor  # (layer, batch, pos, k)
    entropy: torch.Tensor  # (layer, batch, pos), nats
    kl_to_final: torch.Tensor  # (layer, batch, pos): KL(final || layer)
    role: torch.Tensor  # (batch, pos) role codes (see vlmscope.model.positions.ROLES)
    patch_row: torch.Tensor  # (batch, pos), -1 off the image
    patch_col: torch.Tensor  # (batch, pos)
    image: torch.Tensor  # (batch, pos)
    target_prob: torch.Tensor  # (layer, batch, pos) probability of each row's target token (NaN if none)
    target_rank: torch.Tensor  # (layer, batch, pos) rank of the target (0 = top), -1 if none
    vocab: tuple[str, ...] = ()
    approximate: bool = False  # true for the vision-side lens (towers never trained for the unembedding)

    def token(self, i: int) -> str:
        return self.vocab[i] if self.vocab and i < len(self.vocab) else str(i)

    def top_tokens(self, layer: int, example: int = 0) -> list[str]:
        """The top-1 token at each position of an example, at one layer."""
        li = self.layers.index(layer)
        return [self.token(int(t)) for t in self.top_ids[li, example, :, 0]]

    def patch_map(self, layer: int, example: int = 0, image: int = 0) -> tuple[list[list[str]], torch.Tensor]:
        """Top-1 token and its probability at each image patch, as (rows x cols) grids."""
        li = self.layers.index(layer)
        sel = (self.patch_row[example] >= 0) & (self.image[example] == image)
        rows, cols = self.patch_row[example, sel], self.patch_col[example, sel]
        h, w = int(rows.max()) + 1, int(cols.max()) + 1
        words = [["" for _ in range(w)] for _ in range(h)]
        probs = torch.zeros(h, w)
        ids, ps = self.top_ids[li, example, sel, 0], self.top_probs[li, example, sel, 0]
        for r, c, i, p in zip(rows.tolist(), cols.tolist(), ids.tolist(), ps.tolist()):
            words[r][c], probs[r, c] = self.token(i), p
        return words, probs

    def entropy_curve(self, by_role: bool = True):
        """Mean entropy per layer (and per position role): the survey's three-stage curve."""
        df = long_frame(self.entropy, ("layer", "example", "position"), {"layer": list(self.layers)}, "entropy")
        df["role"] = [ROLES[int(r)] for r in self.role.flatten().tolist()] * len(self.layers)
        df = df[df.role != "pad"]
        keys = ["layer", "role"] if by_role else ["layer"]
        return df.groupby(keys, as_index=False)["entropy"].mean()

    def to_dataframe(self):
        """One row per (layer, example, position): top-1 token and probability, entropy, KL, target."""
        df = long_frame(self.entropy, ("layer", "example", "position"), {"layer": list(self.layers)}, "entropy")
        n = len(self.layers)
        df["role"] = [ROLES[int(r)] for r in self.role.flatten().tolist()] * n
        df["patch_row"] = self.patch_row.flatten().tolist() * n
        df["patch_col"] = self.patch_col.flatten().tolist() * n
        df["top_token"] = [self.token(int(i)) for i in self.top_ids[..., 0].flatten()]
        df["top_prob"] = self.top_probs[..., 0].flatten().tolist()
        df["kl_to_final"] = self.kl_to_final.flatten().tolist()
        df["target_prob"] = self.target_prob.flatten().tolist()
        df["target_rank"] = self.target_rank.flatten().tolist()
        return df


@dataclass(frozen=True, repr=False)
class TunedLens(Result):
    """One affine translator per layer: resid -> resid @ weight + bias, then the unembedding."""

    kind = "tuned_lens"
    layers: tuple[int, ...]
    weight: torch.Tensor  # (layer, d, d), initialised to the identity
    bias: torch.Tensor  # (layer, d)

    def translate(self, layer: int, resid: torch.Tensor) -> torch.Tensor:
        li = self.layers.index(layer)
        return resid @ self.weight[li].to(resid.dtype) + self.bias[li].to(resid.dtype)

    @classmethod
    def identity(cls, layers: Sequence[int], d: int) -> TunedLens:
        n = len(layers)
        return cls(tuple(layers), torch.eye(d).repeat(n, 1, 1), torch.zeros(n, d))


def _vocab(vlm) -> tuple[str, ...]:
    tok = vlm.tokenizer
    if tok is None or not hasattr(tok, "convert_ids_to_tokens"):
        return ()
    return tuple(tok.convert_ids_to_tokens(list(range(len(tok)))))


def _targets(targets, batch: int, device) -> torch.Tensor | None:
    if targets is None:
        return None
    t = torch.as_tensor(targets, device=device).long()
    return t.expand(batch) if t.dim() == 0 else t


def _read(logits: torch.Tensor, final_logp: torch.Tensor, k: int, target: torch.Tensor | None):
    logp = logits.float().log_softmax(-1)  # (batch, pos, vocab)
    probs = logp.exp()
    top_p, top_i = probs.topk(k, dim=-1)
    entropy = -(probs * logp).sum(-1)
    kl = (final_logp.exp() * (final_logp - logp)).sum(-1)
    if target is None:
        tp = torch.full(entropy.shape, float("nan"))
        tr = torch.full(entropy.shape, -1, dtype=torch.long)
    else:
        idx = target[:, None, None].expand(-1, logp.shape[1], 1)
        tl = logp.gather(-1, idx)
        tp = tl.exp()[..., 0]
        tr = (logp > tl).sum(-1)
    return top_i, top_p, entropy, kl, tp, tr


def logit_lens(vlm, inputs: Mapping[str, Any], layers: Sequence[int] | None = None, k: int = 5,
               targets: Any = None, tuned: TunedLens | None = None) -> LensResult:
    """The logit (or tuned) lens at every LM layer and position of `inputs`.

    targets: a token id, or one per example, whose probability and rank are tracked.
    """
    n = vlm.n_layers("lm")
    layers = list(range(n)) if layers is None else [i % n for i in layers]
    sites = [f"lm.blocks.{i}.resid_post" for i in layers]
    out, cache = vlm.run_with_cache(inputs, sites)
    pos = vlm.positions(inputs)["lm"]
    final_logp = out.logits.float().log_softmax(-1)
    target = _targets(targets, final_logp.shape[0], final_logp.device)
    reads = []
    with torch.no_grad():
        for layer, site in zip(layers, sites):
            resid = cache[site]
            if tuned is not None:
                resid = tuned.translate(layer, resid)
            reads.append(_read(vlm.unembed(resid), final_logp, k, target))
    stacked = [torch.stack([r[j] for r in reads]).cpu() for j in range(6)]
    return LensResult(
        lens="tuned" if tuned is not None else "logit", layers=tuple(layers), top_ids=stacked[0],
        top_probs=stacked[1], entropy=stacked[2], kl_to_final=stacked[3], role=pos.role, patch_row=pos.row,
        patch_col=pos.col, image=pos.image, target_prob=stacked[4], target_rank=stacked[5], vocab=_vocab(vlm),
    )


def vision_lens(vlm, inputs: Mapping[str, Any], layers: Sequence[int] | None = None, k: int = 5) -> LensResult:
    """An approximate lens on the vision tower: each vision layer's patch residuals are passed
    through the connector and the LM's unembedding, as if the LM read them directly.

    Only the positions that the connector receives (matched by patch row/column) are read.
    """
    n = vlm.n_layers("vision")
    layers = list(range(n)) if layers is None else [i % n for i in layers]
    conn = vlm.model.get_submodule(vlm.site("connector.in").module)
    sites = [f"vision.blocks.{i}.resid_post" for i in layers]
    _, cache = vlm.run_with_cache(inputs, sites + ["connector.in"])
    streams = vlm.positions(inputs)
    vis, con = streams["vision"], streams["connector"]
    # connector position j takes the vision position with the same (row, col) role
    take = []
    for j in range(con.shape[1]):
        same = (vis.row[0] == con.row[0, j]) & (vis.col[0] == con.col[0, j]) & (vis.role[0] == con.role[0, j])
        take.append(int(same.nonzero()[0]))
    reads = []
    with torch.no_grad():
        final = vlm.unembed(conn(cache["connector.in"])).float().log_softmax(-1)
        for site in sites:
            feats = cache[site][:, take]
            reads.append(_read(vlm.unembed(conn(feats)), final, k, None))
    stacked = [torch.stack([r[j] for r in reads]).cpu() for j in range(6)]
    return LensResult(
        lens="vision-logit", layers=tuple(layers), top_ids=stacked[0], top_probs=stacked[1], entropy=stacked[2],
        kl_to_final=stacked[3], role=con.role, patch_row=con.row, patch_col=con.col, image=con.image,
        target_prob=stacked[4], target_rank=stacked[5], vocab=_vocab(vlm), approximate=True,
    )


def train_tuned_lens(vlm, batches: Iterable[Mapping[str, Any]], layers: Sequence[int] | None = None,
                     steps: int = 200, lr: float = 1e-3, seed: int = 0) -> TunedLens:
    """Fit one affine translator per layer to minimise KL(final || lens) over the batches'
    valid positions (Belrose et al. 2023), starting from the identity (= the logit lens)."""
    n = vlm.n_layers("lm")
    layers = list(range(n)) if layers is None else [i % n for i in layers]
    sites = [f"lm.blocks.{i}.resid_post" for i in layers]
    data = []
    for inputs in batches:
        out, cache = vlm.run_with_cache(inputs, sites)
        valid = vlm.positions(inputs)["lm"].valid().to(out.logits.device)
        data.append((torch.stack([cache[s][valid] for s in sites]), out.logits[valid].float().log_softmax(-1)))
    d = data[0][0].shape[-1]
    torch.manual_seed(seed)
    lens = TunedLens.identity(layers, d)
    weight = lens.weight.clone().requires_grad_(True)
    bias = lens.bias.clone().requires_grad_(True)
    opt = torch.optim.Adam([weight, bias], lr=lr)
    for step in range(steps):
        resid, final = data[step % len(data)]
        translated = torch.baddbmm(bias[:, None], resid.float(), weight)  # (layer, rows, d)
        logp = vlm.unembed(translated.to(resid.dtype)).float().log_softmax(-1)
        loss = (final.exp() * (final - logp)).sum(-1).mean()
        # gradients for the translators only: the model's own .grad fields stay untouched
        weight.grad, bias.grad = torch.autograd.grad(loss, [weight, bias])
        opt.step()
    return TunedLens(tuple(layers), weight.detach(), bias.detach())
