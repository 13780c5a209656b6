"""Per-family accuracy of a zoo VLM on fresh standard examples of the shapes world: the answer is the
arg-max over the whole vocabulary of the logits at each row's last real token."""

from __future__ import annotations

import torch

from vlmscope.data.batches import examples_batch
from vlmscope.data.sampling import Example, standard_examples
from vlmscope.data.tokenizer import layout_of, vocabulary
from vlmscope.data.vocab import FAMILIES


@torch.no_grad()
def answer_logits(model: torch.nn.Module, examples: list[Example]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at each row's last real token (batch, vocab) and the answer ids (batch,)."""
    batch = examples_batch(examples, vocabulary(), layout_of(model))
    x = batch.inputs
    logits = model(input_ids=x.input_ids, attention_mask=x.attention_mask, pixel_values=x.pixel_values).logits
    return logits[torch.arange(len(examples)), x.last], batch.answers  # (batch, vocab), (batch,)


def accuracy(model: torch.nn.Module, examples: list[Example], batch_size: int = 100) -> dict[str, float]:
    """Fraction of correct arg-max answers per family (families with no example are left out)."""
    correct = {f: 0 for f in FAMILIES}
    total = {f: 0 for f in FAMILIES}
    was_training = model.training
    model.eval()
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        logits, answers = answer_logits(model, chunk)
        hits = (logits.argmax(-1) == answers).tolist()
        for e, h in zip(chunk, hits, strict=True):
            correct[e.question.family] += int(h)
            total[e.question.family] += 1
    model.train(was_training)
    return {f: correct[f] / total[f] for f in FAMILIES if total[f]}


def evaluate(name_or_model, seed: int, n: int, step: int | None = None) -> dict[str, float]:
    """Per-family accuracy on n fresh standard examples of `seed` (families in turn, n // 6 each); for
    a dual encoder (shapes-clip) zero-shot colour / shape / position / background and caption retrieval
    (shapes_clip.evaluate).
    name_or_model: a zoo name (`step` picks a checkpoint), a transformers model, or a vlmscope VLM."""
    if isinstance(name_or_model, str):
        from vlmscope.zoo.registry import load_hf

        model, _ = load_hf(name_or_model, step=step)
    elif isinstance(name_or_model, torch.nn.Module):
        model = name_or_model
    else:  # a vlmscope.VLM wraps the transformers model it was given
        model = name_or_model.model
    if type(model).__name__ == "CLIPModel":
        from vlmscope.zoo.shapes_clip import evaluate as evaluate_clip

        return evaluate_clip(model, seed, n)
    return accuracy(model, standard_examples(seed, n))
