"""Training batches: per-patch attribute labels for vision-tower pre-training, and question batches
mixing the binding curriculum with the standard generator, families weighted toward those that lag."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from vlmscope.data.render import patch_objects, render_with_mask
from vlmscope.data.sampling import ask
from vlmscope.data.scene import sample_scene
from vlmscope.data.tokenizer import LLAVA_LAYOUT, N_IMAGE_TOKENS, Encoded, Layout, encode, pixel_values, vocabulary
from vlmscope.data.vocab import COLOURS, FAMILIES, GRID, SHAPES, SIZES

# classes per per-patch head; for the attributes, class 0 = no object in the patch
PATCH_HEADS: dict[str, int] = {"colour": 1 + len(COLOURS), "shape": 1 + len(SHAPES), "size": 1 + len(SIZES),
                               "row": GRID, "col": GRID}


@dataclass(frozen=True)
class PatchBatch:
    """Images (batch, 3, H, W) and per-patch labels, name -> (batch, 9) long, row-major patches."""

    pixel_values: torch.Tensor
    labels: dict[str, torch.Tensor]


@dataclass(frozen=True)
class QABatch:
    """Encoded questions, the answer token id of each row (batch,), and each row's family."""

    inputs: Encoded
    answers: torch.Tensor
    families: tuple[str, ...]


def patch_batch(rng: np.random.Generator, batch_size: int) -> PatchBatch:
    """Random scenes of 1-4 objects with the attribute of the object at each 24-px patch."""
    images, labels = [], {k: np.zeros((batch_size, N_IMAGE_TOKENS), np.int64) for k in PATCH_HEADS}
    for b in range(batch_size):
        scene = sample_scene(rng)
        image, mask = render_with_mask(scene)
        images.append(image)
        owner = patch_objects(mask, GRID).ravel()  # (9,)
        for p, o in enumerate(owner):
            labels["row"][b, p], labels["col"][b, p] = divmod(p, GRID)
            if o >= 0:
                obj = scene.objects[o]
                labels["colour"][b, p] = 1 + COLOURS.index(obj.colour)
                labels["shape"][b, p] = 1 + SHAPES.index(obj.shape)
                labels["size"][b, p] = 1 + SIZES.index(obj.size)
    return PatchBatch(pixel_values(images), {k: torch.from_numpy(v) for k, v in labels.items()})


def family_weights(accuracy: dict[str, float] | None) -> dict[str, float]:
    """Sampling weight per family: 0.05 + max(1 - acc, 0.02), normalised; uniform before any eval."""
    if not accuracy:
        return {f: 1 / len(FAMILIES) for f in FAMILIES}
    raw = {f: 0.05 + max(1.0 - accuracy[f], 0.02) for f in FAMILIES}
    total = sum(raw.values())
    return {f: w / total for f, w in raw.items()}


def qa_batch(rng: np.random.Generator, batch_size: int, weights: dict[str, float] | None = None,
             hard_fraction: float = 0.75, vocab: dict[str, int] | None = None,
             layout: Layout = LLAVA_LAYOUT) -> QABatch:
    """Questions drawn by family weight; a `hard_fraction` share from the binding curriculum."""
    vocab = vocab or vocabulary()
    w = weights or family_weights(None)
    p = np.asarray([w[f] for f in FAMILIES], dtype=np.float64)
    fams = [FAMILIES[i] for i in rng.choice(len(FAMILIES), size=batch_size, p=p / p.sum())]
    examples = [ask(rng, f, hard=bool(rng.random() < hard_fraction)) for f in fams]
    return examples_batch(examples, vocab, layout)


def examples_batch(examples: list, vocab: dict[str, int] | None = None, layout: Layout = LLAVA_LAYOUT) -> QABatch:
    """Render and encode a list of sampling.Example in a model's prompt layout (LLaVA's by default)."""
    vocab = vocab or vocabulary()
    images = [render_with_mask(e.scene)[0] for e in examples]
    inputs = encode(images, [e.question.text for e in examples], vocab, layout)
    answers = torch.tensor([vocab[e.question.answer] for e in examples], dtype=torch.long)
    return QABatch(inputs, answers, tuple(e.question.family for e in examples))
