"""Issue #9's zoo check at a CI budget: SAEs on shapes-llava's last vision block, colour concept F1
with and without ZCA whitening of the rows (docs/sae.md, "Colour concept F1 on shapes-llava")."""

import pytest
import torch

from vlmscope import zoo

pytestmark = pytest.mark.skipif("shapes-llava" not in zoo.names(), reason="shapes-llava is not exported")


def test_whitening_lifts_colour_f1_but_orange_stays_uncaptured():
    """Measured (seed 0, 1,000 scenes, 1,000 steps, TopK 64 latents k 10; seed 1 alike): whitened
    mean colour F1 0.747 (red 0.81, green 0.79, blue 0.88, yellow 0.97, purple 0.53, orange 0.50),
    raw 0.648 with only red >= 0.8. Orange sits near the red-yellow midpoint at every site; no setup
    of the sweep gives it a feature of its own."""
    from vlmscope.experiments import grounded

    torch.set_num_threads(1)
    vlm = zoo.load("shapes-llava")
    budget = {"n": 1000, "steps": 1000, "k": 10, "seed": 0}
    _, white, _, scores = grounded.sae_concepts(vlm, whiten=0.1, **budget)
    _, raw, _, _ = grounded.sae_concepts(vlm, whiten=0.0, **budget)
    assert scores["site"] == "vision.blocks.2.resid_post"
    assert float(white.best_f1.mean()) >= 0.72 and float(raw.best_f1.mean()) <= float(white.best_f1.mean()) - 0.05
    assert {"blue", "yellow"}.isdisjoint(white.uncaptured)
    assert "orange" in white.uncaptured and len(raw.uncaptured) >= 4
