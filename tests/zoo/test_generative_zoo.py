"""The shipped shapes-llava: loads offline from the package with safetensors, every checkpoint along
training loads, it answers every question family at >= 95% on a fresh sample, and fits its budget."""

import argparse
import json

import pytest
import torch

from vlmscope import zoo
from vlmscope.zoo.cli import add_parser
from vlmscope.zoo.registry import MODELS

NAME = "shapes-llava"
pytestmark = pytest.mark.skipif(NAME not in zoo.names(), reason="shapes-llava has not been exported yet")


@pytest.fixture(scope="module")
def loaded():
    return zoo.load_hf(NAME)


def test_loads_offline_with_safetensors_only(loaded):
    model, processor = loaded
    files = {p.suffix for p in (MODELS / NAME).rglob("*") if p.is_file()}
    assert files <= {".json", ".safetensors", ".md"}  # no pickle anywhere
    assert type(model).__name__ == "LlavaForConditionalGeneration" and not model.training
    assert model.config.image_token_id == processor.image_token_id
    assert sum(p.numel() for p in model.parameters()) == zoo.card(NAME)["parameters"]


def test_answers_every_family_at_95_percent(loaded):
    acc = zoo.evaluate(loaded[0], seed=777, n=600)
    assert set(acc) == {"colour", "shape", "count", "where", "exists", "relation"}
    assert min(acc.values()) >= 0.95, acc


def test_processor_path_gives_the_same_answers(loaded):
    from vlmscope.data import example_batch
    from vlmscope.data.sampling import standard_examples
    from vlmscope.zoo.evaluate import answer_logits

    model, processor = loaded
    images, prompts = example_batch(12, seed=5)
    inputs = processor(images=images, text=prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    last = inputs["attention_mask"].sum(1) - 1
    fast, _ = answer_logits(model, standard_examples(5, 12))
    torch.testing.assert_close(logits[torch.arange(12), last], fast, atol=1e-4, rtol=1e-4)


def test_checkpoints_span_every_stage_and_load():
    steps = zoo.checkpoint_steps(NAME)
    assert len(steps) >= 8 and steps[0] == 0 and steps == sorted(steps)
    stages = {e["stage"] for e in json.loads((MODELS / NAME / "checkpoints" / "index.json").read_text())}
    assert stages == {"vision", "align", "instruct"}
    first, _ = zoo.load_hf(NAME, step=steps[0])
    mid, _ = zoo.load_hf(NAME, step=steps[-2])
    final, _ = zoo.load_hf(NAME)
    key = "model.language_model.layers.0.mlp.up_proj.weight"
    a, b, c = (m.state_dict()[key] for m in (first, mid, final))
    assert not torch.equal(a, b) and not torch.equal(b, c)
    with pytest.raises(ValueError, match="available"):
        zoo.load_hf(NAME, step=steps[1] + 1)


def test_card_and_size_budget():
    card = zoo.card(NAME)
    for key in ("architecture", "parameters", "data", "recipe", "accuracy", "training", "known_limits"):
        assert card[key]
    assert min(card["accuracy"]["per_family"].values()) >= 0.95 and card["accuracy"]["n"] >= 1000
    size = sum(p.stat().st_size for p in (MODELS / NAME).rglob("*") if p.is_file())
    assert size <= 20 * 2**20
    assert (MODELS / NAME / "card.md").read_text().startswith(f"# {NAME}")


def test_cli_eval_json_prints_only_the_json(capsys):
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["zoo", "eval", NAME, "--seed", "3", "--n", "60", "--json"])
    assert args.func(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert list(out) == ["model", "seed", "n", "accuracy"] and out["model"] == NAME and out["n"] == 60
    assert set(out["accuracy"]) == {"colour", "shape", "count", "where", "exists", "relation"}


def test_vlmscope_load_wraps_it_and_hooked_equals_plain():
    import vlmscope as vs
    from vlmscope.data import example_batch

    m = vs.load(f"zoo:{NAME}")
    images, prompts = example_batch(3, seed=6)
    inputs = m.processor(images=images, text=prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = m.model(**inputs).logits
    out, cache = m.run_with_cache(inputs)
    assert torch.equal(out["logits"], ref) and len(cache) > 0
