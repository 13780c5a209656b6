"""Decoder <-> word-embedding matching (Rao et al. 2024): name a direction by the vocabulary words
whose embeddings it is most aligned with (cosine similarity).

A direction is an SAE feature's decoder row, an MLP neuron's output weights (its column of the
down-projection) or any vector of the residual width. The words come from the LM's input
embedding matrix or its unembedding (stated in the result as `matrix`), optionally filtered
(`keep`: a list of allowed words or a predicate; special tokens are dropped by default).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from vlmscope.errors import InputError
from vlmscope.results import Result

MATRICES = ("input", "unembedding")


@dataclass(frozen=True, repr=False)
class WordMatch(Result):
    """The k most aligned words of each direction: `top_cosine` (direction, k), `top_words`."""

    kind = "word_match"
    matrix: str  # "input" (token embeddings) or "unembedding" (the LM head's rows)
    labels: tuple[str, ...]  # one per direction, e.g. "feature 12"
    top_ids: torch.Tensor  # (direction, k) token ids
    top_cosine: torch.Tensor  # (direction, k)
    top_words: tuple[tuple[str, ...], ...]

    def __post_init__(self):  # a loaded result holds JSON lists: restore the nested tuples
        object.__setattr__(self, "top_words", tuple(tuple(row) for row in self.top_words))

    def __repr__(self) -> str:
        first = ", ".join(self.top_words[0][:3]) if self.top_words else ""
        return f"WordMatch({len(self.labels)} directions, {self.matrix} embeddings; {self.labels[0]}: {first})"

    def to_dataframe(self):
        import pandas as pd

        rows = [{"direction": lab, "rank": r, "word": w, "token_id": int(self.top_ids[d, r]),
                 "cosine": float(self.top_cosine[d, r])}
                for d, lab in enumerate(self.labels) for r, w in enumerate(self.top_words[d])]
        return pd.DataFrame(rows)


def word_match(directions: torch.Tensor, embeddings: torch.Tensor, vocab: Sequence[str], k: int = 10,
               keep: Sequence[str] | Callable[[str], bool] | None = None, labels: Sequence[str] | None = None,
               matrix: str = "input") -> WordMatch:
    """directions (n, d) or (d,) against embeddings (vocab, d): the k words of highest cosine per
    direction among those `keep` allows."""
    if matrix not in MATRICES:
        raise InputError(f"unknown embedding matrix {matrix!r}; valid: {MATRICES}")
    dirs = directions[None] if directions.dim() == 1 else directions  # (n, d)
    if dirs.shape[-1] != embeddings.shape[-1]:
        raise InputError(f"directions have width {dirs.shape[-1]} but the {matrix} embeddings have "
                         f"{embeddings.shape[-1]}; match a direction of the LM's residual width")
    if embeddings.shape[0] != len(vocab):
        raise InputError(f"{embeddings.shape[0]} embedding rows for {len(vocab)} vocabulary words")
    allowed = _allowed(vocab, keep)  # (vocab,) bool
    if not allowed.any():
        raise InputError("the vocabulary filter keeps no word")
    cos = torch.nn.functional.normalize(dirs.float(), dim=-1) @ \
        torch.nn.functional.normalize(embeddings.float(), dim=-1).T  # (n, vocab)
    cos = cos.masked_fill(~allowed, float("-inf"))
    k = min(k, int(allowed.sum()))
    top = cos.topk(k, dim=-1)
    labels = tuple(labels) if labels is not None else tuple(f"direction {i}" for i in range(len(dirs)))
    if len(labels) != len(dirs):
        raise InputError(f"{len(labels)} labels for {len(dirs)} directions")
    words = tuple(tuple(vocab[i] for i in row) for row in top.indices.tolist())
    return WordMatch(matrix, labels, top.indices, top.values, words)


def _allowed(vocab: Sequence[str], keep) -> torch.Tensor:
    if keep is None:
        return torch.tensor([not (w.startswith("<") and w.endswith(">")) for w in vocab])
    if callable(keep):
        return torch.tensor([bool(keep(w)) for w in vocab])
    unknown = set(keep) - set(vocab)
    if unknown:
        raise InputError(f"words not in the vocabulary: {sorted(unknown)[:10]}")
    wanted = set(keep)
    return torch.tensor([w in wanted for w in vocab])


def embedding_matrix(vlm, matrix: str = "unembedding") -> tuple[torch.Tensor, list[str]]:
    """The LM's (vocab, d) input embeddings or unembedding, and the token of each row."""
    if matrix not in MATRICES:
        raise InputError(f"unknown embedding matrix {matrix!r}; valid: {MATRICES}")
    module = vlm.model.get_input_embeddings() if matrix == "input" else vlm.model.get_output_embeddings()
    if module is None:
        raise InputError(f"this model has no {matrix} embedding matrix")
    weight = module.weight.detach().float()  # (vocab, d)
    tok = vlm.tokenizer
    n = len(tok) if tok is not None else 0
    names = tok.convert_ids_to_tokens(list(range(min(n, weight.shape[0])))) if tok is not None else []
    vocab = [str(w) for w in names] + [f"<id {i}>" for i in range(len(names), weight.shape[0])]
    return weight, vocab


def neuron_directions(vlm, layer: int, neurons: Sequence[int], part: str = "lm") -> torch.Tensor:
    """Output weights of MLP neurons: their columns of the down-projection, (n, d_model)."""
    spec = vlm.site(f"{part}.blocks.{layer}.mlp.post")  # its module is the MLP's output projection
    down = vlm.model.get_submodule(spec.module)
    weight = getattr(down, "weight", None)
    if weight is None or weight.dim() != 2:
        raise InputError(f"{spec.module} has no (d_model, d_mlp) weight to read neuron directions from")
    return weight.detach().float()[:, list(neurons)].T


def vlm_word_match(vlm, directions: torch.Tensor, matrix: str = "unembedding", k: int = 10,
                   keep: Sequence[str] | Callable[[str], bool] | None = None,
                   labels: Sequence[str] | None = None) -> WordMatch:
    """`word_match` against one of the model's own matrices (e.g. SAE decoder rows:
    `sae.W_dec[features]`, or `neuron_directions(vlm, layer, neurons)`)."""
    emb, vocab = embedding_matrix(vlm, matrix)
    return word_match(directions, emb, vocab, k=k, keep=keep, labels=labels, matrix=matrix)
