"""Ground-truth labels line up with a zoo-shaped model's positions (random weights: plumbing only)."""

import torch

import vlmscope as vs
from vlmscope.data import build_processor, patch_objects
from vlmscope.methods.probing import patch_probe_grid, trace_concept
from vlmscope.zoo import truth
from vlmscope.zoo.shapes_llava import build_model


def _random_zoo_model():
    return vs.load(build_model(seed=0).eval(), build_processor())


def test_patch_labels_follow_the_scene():
    m = _random_zoo_model()
    exs = truth.examples(seed=3, n=6)
    x = truth.inputs_for(m, exs)
    lab = truth.patch_labels(m, x, [e.scene for e in exs], "colour")
    pos = m.positions(x)["lm"]
    for b, ex in enumerate(exs):
        owner = patch_objects(ex.scene, pos.grid)
        for p in (pos.row[b] >= 0).nonzero().flatten().tolist():
            k = owner[pos.row[b, p], pos.col[b, p]]
            want = -1 if k < 0 else truth.ATTRIBUTES["colour"].index(ex.scene.objects[k].colour)
            assert lab[b, p] == want
        assert (lab[b, pos.row[b] < 0] == -1).all()
    vis = truth.patch_labels(m, x, [e.scene for e in exs], "shape", stream="vision", background=5)
    assert vis.shape == m.positions(x)["vision"].shape and (vis[:, 0] == -1).all()  # CLS unlabelled


def test_trace_and_patch_grid_run_on_every_stream():
    m = _random_zoo_model()
    exs = truth.examples(seed=4, n=60)
    x = truth.inputs_for(m, exs)
    scenes = [e.scene for e in exs]
    labels = {s: truth.patch_labels(m, x, scenes, "colour", stream=s) for s in ("vision", "connector", "lm")}
    tr = trace_concept(m, x, labels, target="colour")
    assert tr.sites[0].startswith("vision.") and "connector.out" in tr.sites and tr.sites[-1].startswith("lm.")
    assert tr.drop_after in tr.sites and len(tr.to_dataframe()) == len(tr.sites)
    labels = truth.patch_labels(m, x, scenes, "colour", background=6)
    grid, probes = patch_probe_grid(m, x, labels, "lm.blocks.0.resid_post")
    assert grid.shape == (3, 3) and not grid.isnan().any()
    assert torch.all((grid >= 0) & (grid <= 1))
