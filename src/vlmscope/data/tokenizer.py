"""The world's word-level tokenizer (built with `tokenizers`, saved as a normal tokenizer.json) and
the real transformers processor (LlavaProcessor + CLIPImageProcessorPil; needs Pillow, works
offline), plus a fast batch encoder that gives exactly the processor's ids and pixel values."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import CLIPImageProcessorPil, LlavaProcessor, PreTrainedTokenizerFast

from vlmscope.data.scene import CELL, IMAGE_SIZE
from vlmscope.data.vocab import SPECIAL_TOKENS, words

IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's normalisation, as the processor uses
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
N_IMAGE_TOKENS = (IMAGE_SIZE // CELL) ** 2  # 9: one token per grid cell


def vocabulary() -> dict[str, int]:
    """Word -> id: the special tokens first (<pad> 0, <s> 1, </s> 2, <unk> 3, <image> 4), then words()."""
    return {w: i for i, w in enumerate((*SPECIAL_TOKENS, *words()))}


def build_tokenizer() -> PreTrainedTokenizerFast:
    """WordLevel tokenizer over the full vocabulary, whitespace split, <s> prepended."""
    tok = Tokenizer(models.WordLevel(vocab=vocabulary(), unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                       special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"}, padding_side="right",
    )


def build_processor() -> LlavaProcessor:
    """A LlavaProcessor for 72-px images and 24-px patches (9 image tokens, CLS dropped)."""
    ip = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=list(IMAGE_MEAN), image_std=list(IMAGE_STD),
    )
    return LlavaProcessor(
        image_processor=ip, tokenizer=build_tokenizer(), patch_size=CELL,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
    )


def prompt(question_text: str) -> str:
    """The processor's text input for a question: the image placeholder, then the question."""
    return f"<image> {question_text}"


@dataclass(frozen=True)
class Encoded:
    """A right-padded batch: ids (batch, pos), mask (batch, pos), pixels (batch, 3, H, W), and the
    position of each row's last real token (where the answer is read)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pixel_values: torch.Tensor
    last: torch.Tensor


def pixel_values(images: list[np.ndarray]) -> torch.Tensor:
    """uint8 HWC images -> normalised (batch, 3, H, W) float32, as the processor computes them."""
    x = np.stack(images).astype(np.float32) * np.float32(1 / 255)  # (batch, H, W, 3)
    x = (x - np.asarray(IMAGE_MEAN, np.float32)) / np.asarray(IMAGE_STD, np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def encode(images: list[np.ndarray], questions: list[str], vocab: dict[str, int] | None = None) -> Encoded:
    """Fast equivalent of processor(images, [prompt(q)...], padding=True): [<s>] + 9 <image> + words."""
    vocab = vocab or vocabulary()
    head = [vocab["<s>"]] + [vocab["<image>"]] * N_IMAGE_TOKENS
    rows = [head + [vocab.get(w, vocab["<unk>"]) for w in q.split()] for q in questions]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), vocab["<pad>"], dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return Encoded(ids, mask, pixel_values(images), mask.sum(1) - 1)
