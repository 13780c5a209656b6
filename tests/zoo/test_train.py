"""Training is deterministic and resumable: a run killed mid-way and resumed from its directory ends
with exactly the weights of an uninterrupted run; snapshots compose to the weights of their step."""

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vlmscope.zoo.checkpoint import compose_snapshot, read_index
from vlmscope.zoo.recipes import Stage, TrainConfig, lr_at
from vlmscope.zoo.train import train

TINY = TrainConfig(
    stages=(
        Stage("vision", ("vision",), 3, 4, 2e-3, 1, snapshots=(1,)),
        Stage("align", ("projector",), 2, 4, 1e-3, 1),
        Stage("instruct", ("projector", "lm"), 5, 4, 1e-3, 2, floor=0.02, snapshots=(2,)),
    ),
    eval_every=2, eval_n=12, save_every=2,
)


# the other recipes' stages, as short (shapes-blip2: tower, Q-Former, generative; the contrastive variant)
TINY_BY_RECIPE = {
    "shapes-blip2": replace(TINY, stages=(
        Stage("vision", ("vision",), 2, 4, 2e-3, 1),
        Stage("qformer", ("qformer",), 2, 4, 1e-3, 1, snapshots=(1,)),
        Stage("instruct", ("projector", "lm"), 4, 4, 1e-3, 2, snapshots=(2,)),
    )),
    "shapes-llava-contrastive": replace(TINY, stages=(
        Stage("vision", ("vision",), 3, 4, 2e-3, 1),
        Stage("align", ("projector",), 1, 4, 1e-3, 1),
        Stage("instruct", ("projector", "lm"), 3, 4, 1e-3, 1),
    )),
}


@pytest.mark.parametrize("name", sorted(TINY_BY_RECIPE))
def test_other_recipes_resume_to_the_same_weights(tmp_path, name):
    cfg = TINY_BY_RECIPE[name]
    full, cut = tmp_path / "full", tmp_path / "cut"
    train(full, cfg, progress_bar=False, recipe=name)
    train(cut, cfg, halt_at=3, progress_bar=False, recipe=name)
    assert train(cut, cfg, progress_bar=False, recipe=name).done
    a, b = _final(full), _final(cut)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    first = compose_snapshot(full / "checkpoints", 0)
    assert len(first) == len(a)  # the init snapshot holds every weight; later ones the stage's parts
    trained = [e["stage"] for e in read_index(full / "checkpoints")]
    assert trained[0] == "vision" and trained[-1] == "instruct"


def _final(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final" / "model.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("full")
    train(run, TINY, progress_bar=False)
    return run


@pytest.mark.parametrize("halt_at", [4, 7, 9])  # mid-stage 1, mid-stage 3 after a save, just before the end
def test_killed_and_resumed_run_ends_with_the_same_weights(uninterrupted, tmp_path, halt_at):
    partial = train(tmp_path, TINY, halt_at=halt_at, progress_bar=False)
    assert not partial.done and not (tmp_path / "final").exists()
    resumed = train(tmp_path, TINY, progress_bar=False)
    assert resumed.done
    a, b = _final(uninterrupted), _final(tmp_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [e["step"] for e in read_index(tmp_path / "checkpoints")] == [0, 1, 3, 5, 7, 10]


def test_snapshots_compose_to_the_weights_of_their_step(uninterrupted):
    from transformers import LlavaForConditionalGeneration

    final = LlavaForConditionalGeneration.from_pretrained(uninterrupted / "final").state_dict()
    composed = compose_snapshot(uninterrupted / "checkpoints", 10)
    assert composed.keys() == final.keys()
    assert all(torch.allclose(composed[k], final[k], atol=1e-2, rtol=1e-3) for k in final)
    init = compose_snapshot(uninterrupted / "checkpoints", 0)
    tower = [k for k in init if k.startswith("model.vision_tower.") and k.endswith("weight")]
    lm = [k for k in init if k.startswith("model.language_model.") and k.endswith("weight")]
    after_vision = compose_snapshot(uninterrupted / "checkpoints", 3)
    assert not torch.equal(after_vision[tower[0]], init[tower[0]])  # stage 1 changed the tower ...
    assert all(torch.equal(after_vision[k], init[k]) for k in lm)  # ... and nothing of the LM
    with pytest.raises(ValueError, match="available"):
        compose_snapshot(uninterrupted / "checkpoints", 2)


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    s = Stage("instruct", ("lm",), 1000, 32, 1e-3, 100, floor=0.02)
    assert lr_at(s, 0) == pytest.approx(1e-5) and lr_at(s, 99) == pytest.approx(1e-3)
    assert lr_at(s, 1000) == pytest.approx(2e-5) and lr_at(s, 550) == pytest.approx(0.51e-3)
    assert replace(s, floor=0.0) != s
