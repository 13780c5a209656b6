"""The word-level tokenizer and LlavaProcessor: offline save/reload, and the fast encoder used in
training gives exactly what the processor gives."""

import numpy as np
import pytest
import torch
from transformers import LlavaProcessor

from vlmscope.data import build_processor, encode, example_batch, patch_batch, qa_batch, vocabulary
from vlmscope.data.tokenizer import N_IMAGE_TOKENS
from vlmscope.data.vocab import FAMILIES, answer_words, words


@pytest.fixture(scope="module")
def processor():
    return build_processor()


def test_vocabulary_is_every_word_once():
    vocab = vocabulary()
    assert len(vocab) == len(set(vocab)) == 5 + len(words())
    assert vocab["<pad>"] == 0 and vocab["<s>"] == 1 and vocab["<image>"] == 4
    for family in FAMILIES:
        assert all(w in vocab for w in answer_words(family))


def test_fast_encoder_matches_the_processor(processor):
    images, prompts = example_batch(12, seed=3)
    out = processor(images=images, text=prompts, padding=True, return_tensors="pt")
    fast = encode(images, [p.removeprefix("<image> ") for p in prompts])
    assert torch.equal(out["input_ids"], fast.input_ids)
    assert torch.equal(out["attention_mask"], fast.attention_mask)
    torch.testing.assert_close(out["pixel_values"], fast.pixel_values, atol=1e-5, rtol=0)
    assert (fast.input_ids == vocabulary()["<image>"]).sum(1).tolist() == [N_IMAGE_TOKENS] * 12
    assert fast.input_ids[torch.arange(12), fast.last].tolist() == [vocabulary()["?"]] * 12


def test_processor_saves_and_reloads_offline(processor, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    processor.save_pretrained(tmp_path)
    assert {"tokenizer.json", "processor_config.json"} <= {p.name for p in tmp_path.iterdir()}
    again = LlavaProcessor.from_pretrained(tmp_path, local_files_only=True)
    images, prompts = example_batch(4, seed=4)
    a = processor(images=images, text=prompts, padding=True, return_tensors="pt")
    b = again(images=images, text=prompts, padding=True, return_tensors="pt")
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["pixel_values"], b["pixel_values"])
    assert again.tokenizer.decode(a["input_ids"][0, 10:]).split()[0] in words()


def test_qa_batch_answers_and_patch_labels():
    b = qa_batch(np.random.default_rng(0), 64, {f: float(f == "relation") for f in FAMILIES})
    assert set(b.families) == {"relation"}
    yes_no = {vocabulary()["yes"], vocabulary()["no"]}
    assert set(b.answers.tolist()) <= yes_no
    p = patch_batch(np.random.default_rng(1), 16)
    assert p.pixel_values.shape == (16, 3, 72, 72)
    has_obj = p.labels["colour"] > 0
    assert torch.equal(has_obj, p.labels["shape"] > 0) and torch.equal(has_obj, p.labels["size"] > 0)
    assert p.labels["row"][0].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert 1 <= has_obj.sum(1).min() and has_obj.sum(1).max() <= 4
