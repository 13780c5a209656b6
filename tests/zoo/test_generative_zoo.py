"""The shipped question-answering zoo models (shapes-llava, shapes-blip2, and the micro-to-macro
variant shapes-llava-contrastive): each loads offline from the package with safetensors, every
checkpoint along training loads, it answers every question family at its bar on a fresh sample, and
fits its budget; the whole zoo fits the git budget."""

import argparse
import json

import pytest
import torch

from vlmscope import zoo
from vlmscope.zoo.cli import add_parser
from vlmscope.zoo.registry import MODELS

FAMILIES = {"colour", "shape", "count", "where", "exists", "relation"}
# name -> (class, stages, accuracy bar per family (None: a variant compared at a fixed step, no bar),
#          families exempt from the bar (the card explains them), size budget in MiB, min. checkpoints)
EXPECT = {
    "shapes-llava": ("LlavaForConditionalGeneration", {"vision", "align", "instruct"}, 0.95, (), 20, 8),
    "shapes-blip2": ("Blip2ForConditionalGeneration", {"vision", "qformer", "align", "instruct"}, 0.95, (), 20, 8),
    "shapes-llava-contrastive": ("LlavaForConditionalGeneration", {"vision", "align", "instruct"}, None, (), 12, 2),
}
SHIPPED = [n for n in EXPECT if n in zoo.names()]


@pytest.fixture(scope="module", params=SHIPPED)
def NAME(request):
    return request.param


@pytest.fixture(scope="module")
def loaded(NAME):
    return zoo.load_hf(NAME)


def _bar(NAME, acc):
    _, _, bar, exempt, _, _ = EXPECT[NAME]
    return {k: v for k, v in acc.items() if k not in exempt and bar is not None and v < bar}


def test_the_whole_zoo_fits_its_git_budget():
    assert {"shapes-llava", "shapes-clip"} <= set(zoo.names())
    size = sum(p.stat().st_size for p in MODELS.rglob("*") if p.is_file())
    assert size <= 60 * 2**20, f"{size / 2**20:.1f} MiB"


def test_loads_offline_with_safetensors_only(NAME, loaded):
    model, processor = loaded
    files = {p.suffix for p in (MODELS / NAME).rglob("*") if p.is_file()}
    assert files <= {".json", ".safetensors", ".md"}  # no pickle anywhere
    assert type(model).__name__ == EXPECT[NAME][0] and not model.training
    assert model.config.image_token_id == processor.tokenizer.convert_tokens_to_ids("<image>")
    assert sum(p.numel() for p in model.parameters()) == zoo.card(NAME)["parameters"]


def test_answers_every_family_at_its_bar(NAME, loaded):
    acc = zoo.evaluate(loaded[0], seed=777, n=600)
    assert set(acc) == FAMILIES
    assert not _bar(NAME, acc), acc
    card = zoo.card(NAME)["accuracy"]["per_family"]  # and the card's held-out numbers are reproducible
    assert all(abs(acc[k] - card[k]) < 0.12 for k in acc), (acc, card)  # 100 per family: 2 s.e. <= 0.1


def test_processor_path_gives_the_same_answers(loaded):
    from vlmscope.data import example_batch
    from vlmscope.data.sampling import standard_examples
    from vlmscope.zoo.evaluate import answer_logits

    model, processor = loaded
    images, prompts = example_batch(12, seed=5)
    if "Blip2" in type(model).__name__:  # BLIP-2's processor puts the query tokens in itself
        prompts = [p.replace("<image> ", "") for p in prompts]
    inputs = processor(images=images, text=prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    last = inputs["attention_mask"].sum(1) - 1
    fast, _ = answer_logits(model, standard_examples(5, 12))
    torch.testing.assert_close(logits[torch.arange(12), last], fast, atol=1e-4, rtol=1e-4)


def test_checkpoints_span_every_stage_and_load(NAME):
    steps = zoo.checkpoint_steps(NAME)
    assert len(steps) >= EXPECT[NAME][5] and steps[0] == 0 and steps == sorted(steps)
    stages = {e["stage"] for e in json.loads((MODELS / NAME / "checkpoints" / "index.json").read_text())}
    assert stages <= EXPECT[NAME][1] and "vision" in stages
    first, _ = zoo.load_hf(NAME, step=steps[0])
    mid, _ = zoo.load_hf(NAME, step=steps[-2])
    final, _ = zoo.load_hf(NAME)
    key = next(k for k in final.state_dict() if "language_model" in k and "layers.0.mlp.up_proj.weight" in k)
    a, b, c = (m.state_dict()[key] for m in (first, mid, final))
    assert not torch.equal(a, c) and (not torch.equal(b, c) or len(steps) < 4)
    with pytest.raises(ValueError, match="available"):
        zoo.load_hf(NAME, step=steps[1] + 1)


def test_card_and_size_budget(NAME):
    card = zoo.card(NAME)
    for key in ("architecture", "parameters", "data", "recipe", "accuracy", "training", "known_limits"):
        assert card[key]
    assert not _bar(NAME, card["accuracy"]["per_family"]) and card["accuracy"]["n"] >= 1000
    size = sum(p.stat().st_size for p in (MODELS / NAME).rglob("*") if p.is_file())
    assert size <= EXPECT[NAME][4] * 2**20
    assert (MODELS / NAME / "card.md").read_text().startswith(f"# {NAME}")


def test_cli_eval_json_prints_only_the_json(NAME, capsys):
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["zoo", "eval", NAME, "--seed", "3", "--n", "60", "--json"])
    assert args.func(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert list(out) == ["model", "seed", "n", "accuracy"] and out["model"] == NAME and out["n"] == 60
    assert set(out["accuracy"]) == FAMILIES


def test_vlmscope_load_wraps_it_and_hooked_equals_plain(NAME):
    import vlmscope as vs
    from vlmscope.data import example_batch

    m = vs.load(f"zoo:{NAME}")
    images, prompts = example_batch(3, seed=6)
    inputs = m.prepare(images, [p.replace("<image> ", "") for p in prompts])
    with torch.no_grad():
        ref = m.model(**inputs).logits
    out, cache = m.run_with_cache(inputs, m.sites())
    assert torch.equal(out["logits"], ref) and len(cache) == len(m.sites())
