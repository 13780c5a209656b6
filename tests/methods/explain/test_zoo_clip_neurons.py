"""Domain-specific neurons on shapes-clip (skipped when no shapes-clip is shipped).

shapes-clip's texts name the background. On the shipped model (v3), under MMNeuron's rule, textured
and noisy backgrounds have neurons of their own (1-2 and 3-4, entropy 0.18-0.60) that hit their
style 42-125x and 43-255x as hard as the others (seeds 0-2, 60-120 scenes). No neuron is specific
to plain: the most plain-specific has entropy 0.77-0.91, and the per-domain rule's forced "plain
neurons" hit plain 1.7-2.6x as hard (v2 had plain neurons in blocks 1-2 at 43-59x; docs/explain.md)."""

import pytest
import torch

import vlmscope.zoo
from vlmscope.methods.explain.zoo import zoo_domain_neurons

pytestmark = pytest.mark.skipif("shapes-clip" not in vlmscope.zoo.names(), reason="no shapes-clip in the zoo")


def test_textured_and_noisy_have_neurons_that_hit_them_hardest_plain_has_none():
    torch.set_num_threads(1)
    clip = vlmscope.zoo.load("shapes-clip")
    dn, effects, scores = zoo_domain_neurons(clip, n=60, seed=0)
    assert set(effects) == {"first block", "last block"}  # a dual encoder: no answer to score
    assert dn.sites == tuple(f"vision.blocks.{i}.mlp.post" for i in range(4))
    assert {g: sum(map(len, ns.values())) for g, ns in dn.groups().items()} == {"textured": 2, "noisy": 3}
    for d in ("textured", "noisy"):
        assert scores[f"lowest entropy of a neuron firing most on {d}"] < 0.5
        assert scores[f"{d} neurons: own/other first block hit"] > 20
    assert scores["neurons specific to plain"] == 0
    assert scores["lowest entropy of a neuron firing most on plain"] > 0.7
    assert scores["weakest own/other hit over the neuron groups, the block where it is largest"] > 20
    _, _, per = zoo_domain_neurons(clip, n=60, seed=0, select="per-domain")
    assert 1.2 < per["plain neurons: own/other hit, the block where it is largest"] < 2.0
