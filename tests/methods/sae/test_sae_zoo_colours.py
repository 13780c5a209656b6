"""Issue #9's zoo check at a CI budget: SAEs on shapes-llava's last vision block, colour concept F1
with and without ZCA whitening of the rows (docs/sae.md, "Colour concept F1 on shapes-llava")."""

import pytest
import torch

from vlmscope import zoo

pytestmark = pytest.mark.skipif("shapes-llava" not in zoo.names(), reason="shapes-llava is not exported")


def test_whitening_lifts_colour_f1_but_orange_stays_uncaptured():
    """Measured (seed 0, 1,000 scenes, 1,000 steps, TopK 64 latents k 10; seed 1 alike): whitened
    mean colour F1 0.747 (red 0.81, green 0.79, blue 0.88, yellow 0.97, purple 0.53, orange 0.50),
    raw 0.648 with only red >= 0.8. Orange sits near the red-yellow midpoint at every site, and at
    the last vision block the SAEs build it from their red and yellow latents."""
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


def test_restarts_at_the_connector_capture_all_six_colours():
    """The issue's goal, F1 >= 0.8 for every colour, with the recipe of docs/sae.md: connector.out,
    whitened TopK k 6 of 64 latents, 20,000 scenes, 6,000 steps, the best of 8 restarts by held-out
    whitened FVU (about 3 min). Measured on seed 0: red 0.99, green 0.98, blue 0.98, yellow 0.98,
    purple 0.94, orange 0.97. A single run of the recipe captures all six in about one seed of six."""
    from vlmscope.experiments import grounded

    torch.set_num_threads(1)
    vlm = zoo.load("shapes-llava")
    _, colour, _, scores = grounded.sae_concepts(vlm, site="connector.out", k=6, n=20000, steps=6000, whiten=0.1,
                                                 restarts=8, seed=0)
    assert colour.uncaptured == () and float(colour.best_f1.min()) >= 0.9
    assert scores["held-out FVU of the kept restart"] < scores["held-out FVU, worst restart"]
    assert len(set(colour.best_feature.tolist())) == 6  # a latent of its own for each colour
