"""Patchscopes on the zoo: does an image token's hidden state, moved alone into a blank image, still
answer a question about its object? (Ghandeharioun et al. 2024, with an image-and-question target.)

Source: a one-object scene and its question ("what colour is the circle ?"); the state of the
object's patch token is read at each LM site. Target: the same background without the object and the
same question; the state is written at a *different* patch (the cell four places on), so what is
decoded is carried by the vector, not by where it sits. Accuracy is the share of targets whose most
likely answer among the family's answer words is the object's true value; the blank target alone
gives the floor.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from vlmscope.data import COLOURS, SHAPES, render
from vlmscope.data.questions import question_text
from vlmscope.data.scene import place, random_attrs
from vlmscope.methods.explain.patchscope import patchscope_logits
from vlmscope.methods.metrics import last_logits
from vlmscope.results import Result, long_frame

QUESTIONS = {"colour": ("colour", "shape", COLOURS), "shape": ("shape", "colour", SHAPES)}  # asked, named, answers


@dataclass(frozen=True, repr=False)
class PatchscopeAccuracy(Result):
    """Answer accuracy per (question, site) with the object's patch state written into a blank image."""

    kind = "patchscope_accuracy"
    questions: tuple[str, ...]  # "colour", "shape"
    sites: tuple[str, ...]
    accuracy: torch.Tensor  # (question, site)
    blank: torch.Tensor  # (question,) accuracy of the blank target, nothing written
    clean: torch.Tensor  # (question,) accuracy on the real image
    chance: torch.Tensor  # (question,) 1 / number of answers

    def __repr__(self) -> str:
        best = {q: f"{float(self.accuracy[i].max()):.2f}" for i, q in enumerate(self.questions)}
        return f"PatchscopeAccuracy(best per question {best} over {len(self.sites)} sites)"

    def to_dataframe(self):
        df = long_frame(self.accuracy, ("question", "site"), {"question": list(self.questions),
                                                             "site": list(self.sites)}, "accuracy")
        df["blank"] = [float(self.blank[self.questions.index(q)]) for q in df["question"]]
        df["chance"] = [float(self.chance[self.questions.index(q)]) for q in df["question"]]
        return df


def _patch_mask(vlm, inputs, cells: list[int]) -> torch.Tensor:
    pos = vlm.positions(inputs)["lm"]
    cols = int(pos.col.max()) + 1
    c = torch.tensor(cells)[:, None]
    return (pos.row == c // cols) & (pos.col == c % cols) & (pos.image == 0)  # (batch, pos)


def _accuracy(logits: torch.Tensor, answer_ids: torch.Tensor, truth: torch.Tensor) -> float:
    """Share of rows whose most likely answer among `answer_ids` is the true one."""
    return float((logits[:, answer_ids].argmax(-1).cpu() == truth).float().mean())


@torch.no_grad()
def zoo_patchscope(vlm, n: int = 120, seed: int = 0, sites: list[str] | None = None
                   ) -> tuple[PatchscopeAccuracy, dict[str, float]]:
    """The check above on n one-object scenes per question at `sites` (default: lm.embed and every
    LM block's output). Returns (result, scores)."""
    sites = sites or ["lm.embed", *(f"lm.blocks.{i}.resid_post" for i in range(vlm.n_layers("lm")))]
    rng = np.random.default_rng([seed, 524287])
    acc, blank, clean, chance = [], [], [], []
    for q, (asked, named, answers) in QUESTIONS.items():
        scenes = [place(rng, random_attrs(rng, 1)) for _ in range(n)]
        objs = [s.objects[0] for s in scenes]
        texts = [question_text(q, (getattr(o, named),)) for o in objs]
        truth = torch.tensor([answers.index(getattr(o, asked)) for o in objs])
        ids = torch.tensor(vlm.tokenizer.convert_tokens_to_ids(list(answers)))
        src = vlm.prepare([render(s) for s in scenes], texts)
        tgt = vlm.prepare([render(replace(s, objects=())) for s in scenes], texts)
        src_mask = _patch_mask(vlm, src, [o.cell for o in objs])
        tgt_mask = _patch_mask(vlm, tgt, [(o.cell + 4) % 9 for o in objs])
        out, cache = vlm.run_with_cache(src, sites)
        clean.append(_accuracy(last_logits(vlm, out, src), ids, truth))
        blank.append(_accuracy(last_logits(vlm, vlm.run(tgt), tgt), ids, truth))
        acc.append([_accuracy(patchscope_logits(vlm, cache[s][src_mask], s, tgt, tgt_mask), ids, truth)
                    for s in sites])
        chance.append(1 / len(answers))
    res = PatchscopeAccuracy(tuple(QUESTIONS), tuple(sites), torch.tensor(acc), torch.tensor(blank),
                             torch.tensor(clean), torch.tensor(chance))
    scores: dict[str, float] = {}
    for i, q in enumerate(res.questions):
        for j, site in enumerate(res.sites):
            scores[f"patchscope {q}: accuracy at {site}"] = float(res.accuracy[i, j])
        scores[f"patchscope {q}: blank image"] = float(res.blank[i])
        scores[f"patchscope {q}: chance"] = float(res.chance[i])
    return res, scores
