"""The grounded experiments and the CLI on the zoo model (skipped when no zoo model is shipped)."""

import argparse

import pytest
import torch

import vlmscope.zoo
from vlmscope.methods import sae as S
from vlmscope.methods.explain.cli import add_parser
from vlmscope.methods.explain.zoo import explain_sae_features, patch_maps, zoo_domain_neurons

pytestmark = pytest.mark.skipif("shapes-llava" not in vlmscope.zoo.names(), reason="no shapes-llava in the zoo")


@pytest.fixture(scope="module")
def zoo():
    return vlmscope.zoo.load("shapes-llava")


def test_explain_sae_features_runs_end_to_end(zoo):
    d = zoo.model.config.text_config.hidden_size
    sae = S.build_sae(S.SAEConfig("topk", d, 32, k=4, site="connector.out"))
    sae.init_weights(torch.Generator().manual_seed(0))
    res, scores = explain_sae_features(zoo, sae.eval(), "connector.out", n_features=8, n=30, n_bases=4)
    assert scores["features examined"] <= 8 and len(res.verdicts) == len(res.labels)
    assert all(lab and "=" in lab for lab in res.labels)
    assert 0.0 <= res.agreement <= 1.0


def test_patch_maps_place_each_patch(zoo):
    from vlmscope.data import render
    from vlmscope.zoo import truth

    scenes = [e.scene for e in truth.examples(0, 3)]
    maps = patch_maps(zoo, [render(s) for s in scenes], "connector.out", lambda x: x[:, :2])
    x = zoo.prepare([render(s) for s in scenes], ["what colour is the circle ?"] * 3)
    _, cache = zoo.run_with_cache(x, "connector.out")
    assert maps.shape == (3, 3, 3, 2)
    assert torch.allclose(maps[1, 0, 2], cache["connector.out"][1, 2, :2].float())  # raster order


def test_zoo_domain_neurons_and_cli(zoo):
    dn, effects, scores = zoo_domain_neurons(zoo, n=24, top_fraction=0.005)
    assert set(effects) == {"answer", "hidden"} and len(dn.domains) == 3
    assert all(f"{d} neurons" in scores for d in dn.domains)
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["explain", "neurons", "--examples", "12"])
    assert args.func.__name__ == "cmd_neurons" and args.top_fraction == 0.01
