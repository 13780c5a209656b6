"""Domain-specific neurons on shapes-clip (skipped when no shapes-clip is shipped).

Unlike shapes-llava, which is never asked about the background and has no plain-specific neuron,
shapes-clip's texts name the background, and its vision tower has neurons for every style. Measured
(seeds 0-2, 60-120 scenes): plain neurons sit in blocks 1-2 (entropy 0.03-0.15) and hit plain
43-59x harder than the other styles at the last block (nothing in block 0: NaN there); textured
23-27x at the first block, noisy 2.4-3.7x."""

import math

import pytest
import torch

import vlmscope.zoo
from vlmscope.methods.explain.zoo import zoo_domain_neurons

pytestmark = pytest.mark.skipif("shapes-clip" not in vlmscope.zoo.names(), reason="no shapes-clip in the zoo")


def test_every_background_style_has_neurons_that_hit_it_hardest():
    torch.set_num_threads(1)
    dn, effects, scores = zoo_domain_neurons(vlmscope.zoo.load("shapes-clip"), n=60, seed=0)
    assert set(effects) == {"first block", "last block"}  # a dual encoder: no answer to score
    for d in ("plain", "textured", "noisy"):
        assert scores[f"{d} neurons"] == 8 and scores[f"{d} neurons: lowest entropy"] < 0.8
        assert scores[f"{d} neurons: own/other hit, the block where it is largest"] >= 2.0
    assert scores["plain neurons: own/other last block hit"] > 10
    assert math.isnan(scores["plain neurons: own/other first block hit"])  # none of them in block 0
    plain = dn.selected_domain == 0
    assert not bool((dn.selected_site[plain] == 0).any())
    assert scores["textured neurons: own/other first block hit"] > 10
