"""shapes-clip: its processor is a real CLIPProcessor that round-trips offline and matches the fast
encoder, ground-truth matching and hard negatives are right, training is deterministic and resumable;
and the shipped model (when exported) loads, classifies colour and shape zero-shot at >= 95%, and
passes hooked == plain through the CLIP adapter."""

import argparse
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from vlmscope import zoo
from vlmscope.data import example_batch, place
from vlmscope.data.questions import caption
from vlmscope.data.tokenizer import pixel_values
from vlmscope.zoo import shapes_clip as sc
from vlmscope.zoo import train_clip
from vlmscope.zoo.checkpoint import compose_snapshot, read_index
from vlmscope.zoo.cli import add_parser
from vlmscope.zoo.registry import MODELS

NAME = sc.NAME
shipped = pytest.mark.skipif(NAME not in zoo.names(), reason="shapes-clip has not been exported yet")
TEXTS = ["a red object", "a circle",
         "a large blue circle at top-left and a small green square at center on a plain background ."]


def test_processor_appends_eos_pads_right_and_round_trips_offline(tmp_path):
    from transformers import CLIPProcessor

    processor = sc.build_processor()
    images, _ = example_batch(3, seed=1)
    x = processor(text=TEXTS, images=images, return_tensors="pt", padding=True)
    eos, pad = sc.clip_vocabulary()[sc.EOT], sc.clip_vocabulary()["<pad>"]
    assert eos == max(sc.clip_vocabulary().values()) == sc.build_config().text_config.eos_token_id
    last = x["attention_mask"].sum(1) - 1
    assert x["input_ids"][torch.arange(3), last].tolist() == [eos] * 3  # EOS ends every text ...
    assert x["input_ids"][0, last[0] + 1:].eq(pad).all() and x["attention_mask"][0, -1] == 0  # ... then pads
    ids, mask = sc.encode_texts(TEXTS)
    assert torch.equal(ids, x["input_ids"]) and torch.equal(mask, x["attention_mask"])
    torch.testing.assert_close(x["pixel_values"], pixel_values(images))
    processor.save_pretrained(tmp_path)
    again = CLIPProcessor.from_pretrained(tmp_path, local_files_only=True)
    y = again(text=TEXTS, images=images, return_tensors="pt", padding=True)
    assert all(torch.equal(x[k], y[k]) for k in x)


def test_text_tower_pools_at_the_end_token():
    model = sc.build_model(0)
    ids, mask = sc.encode_texts(["a circle", "a red object"])
    with torch.no_grad():
        out = model.text_model(input_ids=ids, attention_mask=mask)
    last = mask.sum(1) - 1
    torch.testing.assert_close(out.pooler_output, out.last_hidden_state[torch.arange(2), last])


def test_texts_match_by_ground_truth_and_hard_negatives_differ():
    rng = np.random.default_rng(0)
    one = place(rng, [("circle", "red")])
    o = one.objects[0]
    assert sc.describe({"colour": "red"}).matches(one) and sc.describe({"shape": "circle"}).matches(one)
    assert sc.describe({"colour": "red"}).text == "a red object"
    assert sc.describe({"size": o.size, "shape": "circle", "position": o.position}).matches(one)
    assert not sc.describe({"colour": "blue"}).matches(one)
    two = place(rng, [("circle", "red"), ("square", "blue")])
    assert not sc.describe({"colour": "red"}).matches(two)  # a partial text describes a one-object scene
    assert sc.full_text(two).matches(two)
    for i in range(50):
        s = place(rng, [("circle", "red"), ("square", "blue"), ("cross", "red")])
        assert caption(sc.swap_one(np.random.default_rng(i), s)) != caption(s)
    b = sc.contrastive_batch(np.random.default_rng(1), 16)
    assert b.match.shape == (16, 32) and b.match.diagonal().all() and not b.match[:, 16:].diagonal().any()
    loss = sc.contrastive_loss(sc.build_model(0), b)
    assert torch.isfinite(loss) and loss.item() > 0


def test_background_in_partial_texts_matches_by_domain():
    from dataclasses import replace

    one = place(np.random.default_rng(0), [("circle", "red")], domain="noisy")
    t = sc.describe({"colour": "red", "background": "noisy"})
    assert t.text == "a red object on a noisy background ."  # the phrase as the full caption ends
    assert t.matches(one) and not t.matches(replace(one, domain="plain"))
    texts = [sc._partial(np.random.default_rng(i), one, 0.0, (0.5, 0.5, 0.5, 0.5, 0.0), (1,) * 6)[0].text
             for i in range(40)]
    assert not any("background" in x for x in texts)  # keep_p 0: never mentioned (the shipped recipe)
    texts = [sc._partial(np.random.default_rng(i), one, 0.0, (0.5,) * 5, (1,) * 6)[0].text for i in range(40)]
    assert any("background" in x for x in texts)


def test_twins_differ_only_in_position_or_background_and_say_so():
    b = sc.contrastive_batch(np.random.default_rng(3), 32, single=1.0, twins=1.0)
    own = b.match[:, :32]  # (image, image's own text): pairs (0, 1), (2, 3), ... tell each other apart
    assert own.diagonal().all() and not own[::2, 1::2].diagonal().any() and not own[1::2, ::2].diagonal().any()
    rng = np.random.default_rng(4)
    seen = {"position": 0, "background": 0}
    for _ in range(200):
        s = place(rng, [("circle", "red")])
        twin = sc.swap_one(rng, s, (0, 0, 0, 1, 1))
        kind = "background" if twin.domain != s.domain else "position"
        assert (twin.domain != s.domain) != (twin.objects[0].cell != s.objects[0].cell)  # exactly one differs
        assert twin.objects[0].shape == s.objects[0].shape and twin.objects[0].colour == s.objects[0].colour
        (ta, ha), (tb, _) = (sc._partial(rng, x, 0.25, (0.5,) * 5, (1,) * 6, kind) for x in (s, twin))
        assert ta.matches(s) and not ta.matches(twin) and tb.matches(twin) and not ha.matches(s)
        seen[kind] += 1
    assert min(seen.values()) > 50


def test_position_init_is_redrawn_and_nothing_else():
    a, b = sc.build_model(0), sc.build_model(0, pos_std=0.5)
    key = "vision_model.embeddings.position_embedding.weight"
    assert abs(float(b.state_dict()[key].std()) - 0.5) < 0.05 and float(a.state_dict()[key].std()) < 0.03
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items() if k != key)


TINY = train_clip.ClipConfig(steps=6, replan=None, batch_size=8, warmup=2, snapshots=(0, 2, 4), eval_every=3,
                             eval_n=20, save_every=2)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run = tmp_path_factory.mktemp("clip-full")
    train_clip.train(run, TINY, progress_bar=False)
    return run


@pytest.mark.parametrize("halt_at", [3, 5])  # after a save and one step more, just before the end
def test_killed_and_resumed_run_ends_with_the_same_weights(uninterrupted, tmp_path, halt_at):
    partial = train_clip.train(tmp_path, TINY, halt_at=halt_at, progress_bar=False)
    assert not partial.done and not (tmp_path / "final").exists()
    assert train_clip.train(tmp_path, TINY, progress_bar=False).done
    a = load_file(str(uninterrupted / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [e["step"] for e in read_index(tmp_path / "checkpoints")] == [0, 2, 4, 6]
    final = compose_snapshot(tmp_path / "checkpoints", 6)
    assert all(torch.allclose(final[k], a[k], atol=1e-2, rtol=1e-3) for k in a)


def test_a_finished_run_extended_by_replan_equals_one_run_of_the_whole_plan(tmp_path):
    from dataclasses import replace

    short = replace(TINY, steps=4, snapshots=(0, 2))
    whole = replace(short, replan=(4, 6))
    train_clip.train(tmp_path / "a", short, progress_bar=False)
    assert train_clip.train(tmp_path / "a", whole, progress_bar=False).step == 6  # goes on from step 4
    train_clip.train(tmp_path / "b", whole, progress_bar=False)
    a, b = (load_file(str(tmp_path / r / "final" / "model.safetensors")) for r in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_second_replan_extends_a_finished_run_as_one_run_of_the_chain(tmp_path):
    from dataclasses import replace

    from vlmscope.zoo.recipes import lr_at

    once = replace(TINY, steps=4, snapshots=(0, 2), replan=(4, 6))
    twice = replace(once, replan=((4, 6), (6, 8)))
    a, b = train_clip._stage(once), train_clip._stage(twice)
    assert b.total == 8 and [lr_at(a, i) for i in range(6)] == [lr_at(b, i) for i in range(6)]
    assert lr_at(b, 6) > lr_at(a, 5)  # the learning rate goes back up at the second re-plan
    train_clip.train(tmp_path / "a", once, progress_bar=False)
    assert train_clip.train(tmp_path / "a", twice, progress_bar=False).step == 8
    train_clip.train(tmp_path / "b", twice, progress_bar=False)
    wa, wb = (load_file(str(tmp_path / r / "final" / "model.safetensors")) for r in ("a", "b"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


# ---- the shipped model --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def loaded():
    return zoo.load_hf(NAME)


@shipped
def test_loads_offline_and_classifies_zero_shot_at_95_percent(loaded):
    model, processor = loaded
    assert type(model).__name__ == "CLIPModel" and type(processor).__name__ == "CLIPProcessor"
    assert not model.training and sum(p.numel() for p in model.parameters()) == zoo.card(NAME)["parameters"]
    acc = zoo.evaluate(model, seed=777, n=400)
    assert acc["colour"] >= 0.95 and acc["shape"] >= 0.95, acc
    assert acc["hard_negative"] > 0.5 and acc["retrieval_i2t"] > 0.1, acc  # above chance (0.5, 0.01)


@shipped
def test_processor_path_gives_the_fast_path_embeddings(loaded):
    model, processor = loaded
    images, _ = example_batch(4, seed=5)
    x = processor(text=TEXTS, images=images, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**x)
    fast_img = sc._embed(model, images=images)
    fast_txt = sc._embed(model, texts=TEXTS)
    torch.testing.assert_close(out.image_embeds, fast_img, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.text_embeds, fast_txt, atol=1e-5, rtol=1e-4)


@shipped
def test_checkpoints_card_and_size_budget():
    steps = zoo.checkpoint_steps(NAME)
    assert len(steps) >= 8 and steps[0] == 0 and steps == sorted(steps)
    first, _ = zoo.load_hf(NAME, step=steps[0])
    mid, _ = zoo.load_hf(NAME, step=steps[len(steps) // 2])
    final, _ = zoo.load_hf(NAME)
    key = "vision_model.encoder.layers.0.mlp.fc1.weight"
    a, b, c = (m.state_dict()[key] for m in (first, mid, final))
    assert not torch.equal(a, b) and not torch.equal(b, c)
    card = zoo.card(NAME)
    assert card["class"] == "CLIPModel" and card["accuracy"]["n"] >= 1000
    assert min(card["accuracy"]["metrics"][k] for k in ("colour", "shape")) >= 0.95
    files = [p for p in (MODELS / NAME).rglob("*") if p.is_file()]
    assert {p.suffix for p in files} <= {".json", ".safetensors", ".md"}
    assert sum(p.stat().st_size for p in files) <= 8 * 2**20
    assert (MODELS / NAME / "card.md").read_text().startswith(f"# {NAME}")


@shipped
def test_cli_eval_json_and_list(capsys):
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["zoo", "eval", NAME, "--seed", "3", "--n", "100", "--json"])
    assert args.func(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"] == NAME and out["n"] == 100
    assert set(out["accuracy"]) == {"colour", "shape", "position", "background", "retrieval_i2t", "retrieval_t2i",
                                    "hard_negative"}
    args = parser.parse_args(["zoo", "list"])
    assert args.func(args) == 0
    assert any(line.startswith(NAME) and "CLIPModel" in line for line in capsys.readouterr().out.splitlines())


@shipped
def test_vlmscope_load_wraps_it_and_hooked_equals_plain():
    import vlmscope as vs

    m = vs.load(f"zoo:{NAME}")
    images, _ = example_batch(3, seed=6)
    inputs = m.processor(images=images, text=TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = m.model(**inputs).logits_per_image
    out, cache = m.run_with_cache(inputs)
    assert torch.equal(out["logits_per_image"], ref) and len(cache) > 0
    assert "text.proj" in cache and "vision.blocks.0.resid_post" in cache


def test_zoo_train_picks_the_deep_recipe(monkeypatch, tmp_path):
    """`vlmscope zoo train shapes-clip` trains train_clip.DEEP_RECIPE (the shipped model's, v3: v2's
    data and optimiser, a 4-block tower with MLPs of 128, a 12,000-step cosine re-planned to 18,000);
    `--recipe position` v2's, `--recipe v1` the first model's; the generative models have one recipe
    and refuse the flag."""
    from dataclasses import replace

    from vlmscope.errors import InputError
    from vlmscope.zoo import train as train_mod
    from vlmscope.zoo import train_clip

    seen = []
    monkeypatch.setattr(train_clip, "train", lambda out, cfg, halt_at=None: seen.append(cfg) or argparse.Namespace(
        done=False, elapsed_s=0.0, accuracy={}))
    parser = argparse.ArgumentParser()
    train_mod.add_arguments(parser)
    train_mod.run(parser.parse_args(["shapes-clip", "--out", str(tmp_path), "--seed", "3"]))
    train_mod.run(parser.parse_args(["shapes-clip", "--out", str(tmp_path), "--recipe", "position"]))
    train_mod.run(parser.parse_args(["shapes-clip", "--out", str(tmp_path), "--recipe", "v1"]))
    assert seen[0] == replace(train_clip.DEEP_RECIPE, seed=3) and seen[0].replan == ((12_000, 18_000),)
    assert (seen[0].layers, seen[0].mlp, seen[0].heads) == (4, 128, 4)
    assert replace(seen[0], layers=3, mlp=256, steps=4500, replan=None, snapshots=()) == replace(
        train_clip.POSITION_RECIPE, seed=3, replan=None, snapshots=())  # v2's data, optimiser and init
    assert seen[1] == train_clip.POSITION_RECIPE and (seen[1].layers, seen[1].mlp) == (3, 256)
    assert seen[2] == train_clip.ClipConfig()
    with pytest.raises(InputError, match="shapes-clip recipe"):
        train_mod.run(parser.parse_args(["shapes-llava", "--out", str(tmp_path), "--recipe", "position"]))


def test_the_tower_is_built_as_configured():
    """v3's tower: 4 blocks with MLPs of 128 (360,513 parameters in all); v2's: 3 blocks of 256."""
    v2, v3 = sc.build_model(0, 0.5), sc.build_model(0, 0.5, layers=4, mlp=128)
    assert (v3.config.vision_config.num_hidden_layers, v3.config.vision_config.intermediate_size) == (4, 128)
    assert v2.config.vision_config.num_hidden_layers == 3 and v2.config.vision_config.intermediate_size == 256
    assert sum(p.numel() for p in v2.parameters()) == 376_577 and sum(p.numel() for p in v3.parameters()) == 360_513
    assert sc.build_model(0, 0.5, heads=8).config.vision_config.num_attention_heads == 8
