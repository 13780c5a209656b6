"""The world's word-level tokenizer (built with `tokenizers`, saved as a normal tokenizer.json) and
the real transformers processor (LlavaProcessor + CLIPImageProcessorPil; needs Pillow, works
offline), plus a fast batch encoder that gives exactly the processor's ids and pixel values."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    Blip2Processor,
    BlipImageProcessorPil,
    CLIPImageProcessorPil,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from vlmscope.data.scene import CELL, IMAGE_SIZE
from vlmscope.data.vocab import SPECIAL_TOKENS, words

IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's normalisation, as the processor uses
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
N_IMAGE_TOKENS = (IMAGE_SIZE // CELL) ** 2  # 9: one token per grid cell


def vocabulary() -> dict[str, int]:
    """Word -> id: the special tokens first (<pad> 0, <s> 1, </s> 2, <unk> 3, <image> 4), then words()."""
    return {w: i for i, w in enumerate((*SPECIAL_TOKENS, *words()))}


def build_tokenizer(image_token: bool = True) -> PreTrainedTokenizerFast:
    """WordLevel tokenizer over the full vocabulary, whitespace split, <s> prepended; `image_token`
    names <image> as the tokenizer's image token (LLaVA's processor reads it; BLIP-2's registers its own)."""
    tok = Tokenizer(models.WordLevel(vocab=vocabulary(), unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                       special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"} if image_token else None, padding_side="right",
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


def build_blip2_processor(num_query_tokens: int) -> Blip2Processor:
    """A Blip2Processor for 72-px images: `num_query_tokens` <image> tokens before <s> and the question."""
    ip = BlipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_mean=list(IMAGE_MEAN),
                               image_std=list(IMAGE_STD), do_convert_rgb=True)
    return Blip2Processor(image_processor=ip, tokenizer=build_tokenizer(image_token=False),
                          num_query_tokens=num_query_tokens)


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


@dataclass(frozen=True)
class Layout:
    """Where a zoo model's image tokens lie in its prompt: LLaVA puts its 9 after <s>; BLIP-2's
    processor puts one per query *before* <s>."""

    n_image: int = N_IMAGE_TOKENS
    image_first: bool = False

    def head(self, vocab: dict[str, int]) -> list[int]:
        """The prompt's ids before the question's words."""
        image = [vocab["<image>"]] * self.n_image
        return image + [vocab["<s>"]] if self.image_first else [vocab["<s>"]] + image


LLAVA_LAYOUT = Layout()


def layout_of(model) -> Layout:
    """The prompt layout a zoo model (a transformers model) was trained with."""
    n_query = getattr(model.config, "num_query_tokens", None)
    return Layout(n_query, image_first=True) if n_query else LLAVA_LAYOUT


def encode(images: list[np.ndarray], questions: list[str], vocab: dict[str, int] | None = None,
           layout: Layout = LLAVA_LAYOUT) -> Encoded:
    """Fast equivalent of processor(images, [prompt(q)...], padding=True): by default [<s>] + 9 <image> +
    words (LLaVA), or the layout given (BLIP-2: n_query <image> + [<s>] + words)."""
    vocab = vocab or vocabulary()
    head = layout.head(vocab)
    rows = [head + [vocab.get(w, vocab["<unk>"]) for w in q.split()] for q in questions]
    ids, mask = pad_right(rows, vocab["<pad>"])
    return Encoded(ids, mask, pixel_values(images), mask.sum(1) - 1)


def pad_right(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id rows right-padded to the longest: ids and attention mask, (batch, pos) long."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask
