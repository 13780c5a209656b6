"""SpLiCE on shapes-clip against the world's ground truth (skipped when no shapes-clip is shipped):
the issue's check, precision and recall >= 0.9 for the colour and shape words of one-object scenes.
Measured on the shipped model (v3): precision 0.97-0.99, recall 0.995-1.00 (seeds 0-2)."""

import pytest
import torch

import vlmscope.zoo
from vlmscope.experiments import grounded

pytestmark = pytest.mark.skipif("shapes-clip" not in vlmscope.zoo.names(), reason="no shapes-clip in the zoo")


@pytest.mark.parametrize("seed", [0, 1])
def test_splice_recovers_each_objects_colour_and_shape(seed):
    torch.set_num_threads(1)
    _, scores = grounded.splice_recovery(vlmscope.zoo.load("shapes-clip"), seed=seed)
    assert scores["SpLiCE precision (colour and shape words)"] >= 0.95
    assert scores["SpLiCE recall (colour and shape words)"] >= 0.99
    assert 3 < scores["SpLiCE mean concepts per image"] < 6  # sparse: the object's words and a few more
