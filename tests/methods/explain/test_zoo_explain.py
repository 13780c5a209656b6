"""The grounded experiments and the CLI on the zoo model (skipped when no zoo model is shipped)."""

import argparse
import json

import numpy as np
import pytest
import torch

import vlmscope.zoo
from vlmscope.errors import InputError
from vlmscope.methods import sae as S
from vlmscope.methods.explain.cli import add_parser
from vlmscope.methods.explain.compose import parse_formula
from vlmscope.methods.explain.zoo import zoo_domain_neurons, zoo_modality_neurons
from vlmscope.methods.explain.zoo_features import explain_sae_features, patch_maps, refine_explained
from vlmscope.methods.explain.zoo_patchscope import PatchscopeAccuracy, zoo_patchscope
from vlmscope.results import Result

pytestmark = pytest.mark.skipif("shapes-llava" not in vlmscope.zoo.names(), reason="no shapes-llava in the zoo")


@pytest.fixture(scope="module")
def zoo():
    torch.set_num_threads(1)
    return vlmscope.zoo.load("shapes-llava")


def test_explain_sae_features_runs_end_to_end(zoo):
    d = zoo.model.config.text_config.hidden_size
    sae = S.build_sae(S.SAEConfig("topk", d, 32, k=4, site="connector.out"))
    sae.init_weights(torch.Generator().manual_seed(0))
    res, scores = explain_sae_features(zoo, sae.eval(), "connector.out", n_features=8, n=30, n_bases=4)
    assert scores["features examined"] <= 8 and len(res.verdicts) == len(res.labels)
    assert all(lab and parse_formula(lab) for lab in res.labels)  # each a formula of the vocabulary's concepts
    assert 0.0 <= res.agreement <= 1.0


def test_dissection_and_verification_on_the_experiments_sae(zoo, tmp_path):
    """The issue's check on the demo's SAE (grounded.sae_concepts, last vision block, seed 0), top 50
    features by frequency (41 alive on 300 scenes), formulas of up to 3 concepts. Each feature is
    dissected at the share of its peak (LEVELS) where its label fits best and verified at that share:
    31 labelled at IoU >= 0.5, 19 hold (0.61 of the labelled, 0.46 of all examined): the 80 % bar is
    not met. At the top 20 % of patches instead (Bau et al.'s quantile): 28 labelled, 19 hold. Single
    concepts (length 1) give 20 labelled, 10 holding: the formulas name what single concepts could
    not (a row or column's background; a row but its middle; blue or purple)."""
    from vlmscope.experiments import grounded
    from vlmscope.methods.explain.zoo_features import LEVELS

    sae, _, _, s = grounded.sae_concepts(zoo, seed=0)
    res, scores = explain_sae_features(zoo, sae, s["site"], n_features=50)
    assert scores["features examined"] == 41 and 28 <= scores["features labelled"] <= 34
    assert scores["largest chance IoU of a label (random map, same firing rate)"] < 0.45 < 0.5 <= float(res.iou.min())
    assert 0.5 <= res.agreement <= 0.75 and 0.38 <= res.agreement_examined <= 0.55
    assert set(res.ratio.tolist()) <= set(LEVELS) and len(set(res.ratio.tolist())) >= 3  # features differ
    assert scores["mean best IoU"] > scores["mean best single-concept IoU"] + 0.1
    held = {lab for lab, v in zip(res.labels, res.verdicts) if v == "holds"}
    assert {"patch=1", "patch=6", "patch=7", "colour=green", "colour=purple OR colour=blue", "colour=red",
            "column=2 AND background", "patch=4 AND background"} <= held
    red = res.labels.index("colour=red")
    assert float(res.ratio[red]) > 0.25 and float(res.iou[red]) > 0.95  # graded: red above 0.4 of its peak
    back = Result.load(res.save(tmp_path / "ef"))
    assert back.examined == 41 and back.agreement == res.agreement and back.labels == res.labels
    assert torch.equal(back.ratio, res.ratio)
    _, scq = explain_sae_features(zoo, sae, s["site"], n_features=50, ratio=None)
    assert 25 <= scq["features labelled"] <= 31 and 16 <= scq["verdict: holds"] <= 22
    single, sc1 = explain_sae_features(zoo, sae, s["site"], n_features=50, length=1)
    assert (sc1["features labelled"], sc1["verdict: holds"]) == (20, 10) and sc1["labels naming cell"] == 0
    narrow = [d for lab, v, d in zip(single.labels, single.verdicts, single.details) if lab.startswith("patch=") and
              v == "too narrow"]
    assert narrow and all(d == "only when the patch shows background" for d in narrow)
    # the refinement loop on the 12 labels that do not hold: 4 become explanations that hold on fresh
    # scenes ("row=1 AND NOT patch=4 AND NOT size=large" -> "patch=3 OR patch=5"; a purple cross
    # feature that also fires on blue ones: "... AND (colour=blue OR colour=purple) ..."); most of
    # the rest would need more than 6 concepts
    refined, more = refine_explained(zoo, sae, res, rounds=2)
    failed = [(lab, v) for lab, v in zip(res.labels, res.verdicts) if v != "holds"]
    assert len(refined) == more["labels refined"] == len(failed) == 12
    assert [(r.explanations[0], r.verdicts[0]) for r in refined] == failed  # the same seed: round 0 repeats it
    finals = {r.final: r.ratios[-1] for r in refined if r.holds}
    assert finals["patch=3 OR patch=5"] == 0.25
    assert finals["shape=cross AND (colour=blue OR colour=purple) AND size=large"] == 0.55
    assert 3 <= more["refined labels that hold"] <= 5 and more["agreement after refinement"] >= 0.7
    assert more["labels that hold after refinement"] == len(res.labels) - 12 + more["refined labels that hold"]
    assert sum("more than 6 concepts" in r.stopped for r in refined) >= 3


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
    """shapes-llava barely encodes its background. Under MMNeuron's rule the lowest-entropy neurons
    (first vision block, at background patches) are specific to textured *and* noisy alike (9) or to
    noisy (3), and none to plain. Held below their firing threshold, each group hits its own domains'
    hidden states >= 2x as hard as the others' in the first block; the difference is gone by the
    tower's last block. Plain has no specific neurons (docs/explain.md): its most specific is near
    uniform (entropy 1.04 on 60 scenes, ln 3 = 1.10), and the per-domain rule, which forces a
    selection for every domain, picks plain "neurons" that fire on textured too and hit plain no harder."""
    dn, effects, scores = zoo_domain_neurons(zoo, n=60, top_fraction=0.01)
    assert set(effects) == {"first block", "last block", "answer"} and len(dn.domains) == 3
    assert all(s.startswith("vision.blocks.") for s in dn.sites) and dn.selection == "mmneuron"
    assert {g: sum(map(len, ns.values())) for g, ns in dn.groups().items()} == {"textured+noisy": 9, "noisy": 3}
    assert scores["neurons specific to plain"] == 0 and scores["neurons specific to noisy"] == 12
    assert 0.5 < scores["lowest domain entropy (uniform: ln 3 = 1.10)"] < 1.0
    assert scores["lowest entropy of a neuron firing most on plain"] > 1.0 > 0.8 > \
        scores["lowest entropy of a neuron firing most on noisy"]
    assert scores["textured+noisy neurons: firing probability on plain"] < 0.05
    assert scores["textured+noisy neurons: own/other first block hit"] > 20
    assert scores["textured+noisy neurons: own/other last block hit"] < 1.5
    assert scores["noisy neurons: own/other first block hit"] > 3 and scores["noisy neurons: own/other answer hit"] > 3
    assert scores["weakest own/other hit over the neuron groups, the block where it is largest"] >= 2.0
    _, _, per = zoo_domain_neurons(zoo, n=60, top_fraction=0.01, select="per-domain")
    assert per["plain neurons: firing probability on textured"] > 0.04
    assert per["plain neurons: own/other first block hit"] < 1.6 and per["plain neurons: own/other answer hit"] < 0.5
    ref = dn.reference("clamp")
    assert set(ref) == set(dn.sites) and ref[dn.sites[0]].shape == (dn.prob.shape[1],)
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["explain", "neurons", "--examples", "12"])
    assert args.func.__name__ == "cmd_neurons" and args.top_fraction == 0.01 and args.where == "background"
    assert args.select == "mmneuron" and args.bar == 0.95


def test_zoo_modality_neurons_hit_their_modality_where_they_live(zoo):
    """MINER on shapes-llava: image-specific neurons sit in the first LM block and hit image tokens
    ~4x harder there; by the last block the image information has flowed into the text tokens,
    which then change more. Text-specific neurons hit text tokens far harder at both."""
    res, effects, scores = zoo_modality_neurons(zoo, n=60)
    assert scores["image neurons in the first block"] > 0.8
    assert scores["image neurons: own/other hit, first block"] > 2
    assert scores["image neurons: own/other hit, last block"] < 1
    assert scores["text neurons: own/other hit, first block"] > 10
    assert scores["text neurons: own/other hit, last block"] > 10
    assert set(effects) == {"first block", "last block"}


def test_zoo_patchscope_decodes_an_image_token_in_a_blank_image(zoo, tmp_path):
    """The object's patch state from lm.embed or the first block, written at another patch of a
    blank image, answers its colour and shape; from the last block it no longer does (the LM has
    read the image by then)."""
    res, scores = zoo_patchscope(zoo, n=60)
    for q in ("colour", "shape"):
        i = res.questions.index(q)
        assert float(res.accuracy[i, res.sites.index("lm.blocks.0.resid_post")]) >= 0.9
        assert float(res.accuracy[i, -1]) < 0.4 and float(res.blank[i]) < 0.4
        assert float(res.clean[i]) >= 0.9
    back = Result.load(res.save(tmp_path / "ps"))
    assert isinstance(back, PatchscopeAccuracy) and torch.equal(back.accuracy, res.accuracy)
    assert back.plot().axes


def test_verify_cli_tests_a_formula_on_one_feature(tmp_path, capsys):
    """`vlmscope explain verify` on a saved SAE: the verdict of a formula for one latent, the firing
    rate per group of patches, and the saved result; a bad formula fails before the model loads."""
    from vlmscope.experiments import grounded
    from vlmscope.methods.explain.refine import Refinement
    from vlmscope.methods.explain.verdicts import Verification

    zoo_model = vlmscope.zoo.load("shapes-llava")
    grounded.sae_concepts(zoo_model, seed=0, out_dir=tmp_path / "sae")
    folder = next((tmp_path / "sae").glob("*/cfg.json")).parent
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    argv = ["explain", "verify", "--sae", str(folder), "--feature", "53", "--explanation",
            "colour=purple OR colour=blue", "--out", str(tmp_path / "v")]
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "latent 53: 'colour=purple OR colour=blue' holds" in out and "colour=purple" in out
    res = Result.load(tmp_path / "v" / "verification")
    assert isinstance(res, Verification) and res.verdict == "holds"
    assert set(np.array(res.values)[res.explained.numpy()]) == {"colour=purple", "colour=blue"}
    bad = parser.parse_args(argv[:7] + ["colour=pink"])
    with pytest.raises(InputError, match="colour=red"):
        bad.func(bad)
    # --refine: a label that misses part of its row is read again and narrowed to the patch it fires at
    args = parser.parse_args(["explain", "verify", "--sae", str(folder), "--feature", "1", "--explanation",
                              "row=2 AND background", "--seed", "1", "--refine", "2", "--out", str(tmp_path / "r")])
    assert args.func(args) == 0
    ref = Result.load(tmp_path / "r" / "refinement")
    assert isinstance(ref, Refinement) and ref.verdicts == ("too narrow", "holds")
    assert ref.final == "patch=6 AND background" and ref.read[0] == "patch, object"
    assert "'row=2 AND background' (too narrow) -> 'patch=6 AND background' (holds)" in capsys.readouterr().out
    bad = parser.parse_args(["explain", "verify", "--sae", str(folder), "--feature", "1", "--explanation", "row=2",
                             "--refine", "1", "--ratios", "0.25,high"])
    with pytest.raises(SystemExit, match="0.25,0.4,0.55"):
        bad.func(bad)


def test_features_cli_labels_verifies_and_refines(tmp_path, capsys):
    """`vlmscope explain features --refine 1` on a saved SAE: the table of labels and verdicts, the
    scores (with the refinement's), and every result saved and loadable."""
    from vlmscope.experiments import grounded
    from vlmscope.methods.explain.refine import Refinement

    grounded.sae_concepts(vlmscope.zoo.load("shapes-llava"), seed=0, out_dir=tmp_path / "sae")
    folder = next((tmp_path / "sae").glob("*/cfg.json")).parent
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["explain", "features", "--sae", str(folder), "--n-features", "12", "--examples", "100",
                              "--refine", "1", "--out", str(tmp_path / "out")])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    scores = json.JSONDecoder().raw_decode(out[out.index("\n{\n") + 1:])[0]  # then the "saved" lines
    res = Result.load(tmp_path / "out" / "explained_features")
    assert scores["features examined"] == res.examined == 12 and len(res.labels) == scores["features labelled"]
    failed = sum(v != "holds" for v in res.verdicts)
    assert failed >= 1 and scores["labels refined"] == failed
    refined = [Result.load(p) for p in sorted((tmp_path / "out").glob("refinement-*"))]
    assert len(refined) == failed and all(isinstance(r, Refinement) for r in refined)
    assert scores["labels that hold after refinement"] == len(res.labels) - failed + sum(r.holds for r in refined)
    assert set(res.ratio.tolist()) <= {0.1, 0.25, 0.4, 0.55}  # each label's share of its peak (--levels default)
    bad = parser.parse_args(["explain", "features", "--sae", str(folder), "--levels", "a,b"])
    with pytest.raises(SystemExit, match="--levels takes comma-separated numbers"):
        bad.func(bad)


def test_lm_image_tokens_carry_what_was_read_before_them(zoo):
    """At the language model's image tokens (block 2), an SAE (the demo's recipe) has latents firing on
    background read before any object: only the concepts of what earlier tokens show name them
    (concepts.SEEN, on by default at LM sites; read row by row as the LM reads them), and the
    verification loop, with an object moved through every cell and one read after it, says they hold.
    Measured: latent 0 is `seen=none AND NOT column=0 AND background` (IoU 1.00, holds) where the
    patch concepts found `(patch=1 OR patch=2) AND background` (0.52, does not hold); 22 of 32
    labelled and 15 hold, against 21 and 13."""
    from vlmscope.experiments import grounded
    from vlmscope.methods.explain.zoo_features import reading_order

    site = "lm.blocks.2.resid_post"
    assert reading_order(zoo, site) == list(range(9))
    sae, _, _, _ = grounded.sae_concepts(zoo, site=site, seed=0)
    res, scores = explain_sae_features(zoo, sae, site, n_features=50)
    seen = {lab: (float(res.iou[i]), res.verdicts[i]) for i, lab in enumerate(res.labels) if "seen" in lab}
    held = {lab: iou for lab, (iou, v) in seen.items() if v == "holds"}
    assert len(held) >= 2 and max(held.values()) >= 0.99, seen
    assert any("seen=none" in lab for lab in held)
    assert scores["labels naming what earlier image tokens show"] == len(seen)
    assert scores["of those, labels that hold"] == len(held)
    assert scores["best-fitting such label that holds"].endswith(f"(IoU {max(held.values()):.2f})")
    plain, plain_scores = explain_sae_features(zoo, sae, site, n_features=50, seen=False)  # patch concepts only
    assert not any("seen" in lab for lab in plain.labels)
    assert plain_scores["features labelled"] < scores["features labelled"]
    assert plain_scores["verdict: holds"] < scores["verdict: holds"]
    best = {int(f): float(v) for f, v in zip(plain.features, plain.iou)}
    for i, lab in enumerate(res.labels):  # those the seen concepts name best, the patch concepts name worse or not
        if lab in held:
            assert best.get(int(res.features[i]), 0.0) < float(res.iou[i]) - 0.1, (lab, best.get(int(res.features[i])))


def test_seen_concepts_need_a_row_by_row_reader(zoo, monkeypatch):
    """The verification loop's scenes for what earlier tokens show put the later object in the last
    cell of a row-by-row reading: another reading order is refused, naming it and the way out."""
    import vlmscope.methods.explain.zoo_features as Z

    monkeypatch.setattr(Z, "reading_order", lambda vlm, site: list(range(8, -1, -1)))
    sae = S.build_sae(S.SAEConfig("topk", zoo.model.config.text_config.hidden_size, 8, k=2, site="x"))
    with pytest.raises(InputError, match=r"order \[8, 7, .*pass seen=False"):
        explain_sae_features(zoo, sae, "lm.blocks.1.resid_post", n_features=4, n=10)
    with pytest.raises(InputError, match="no latent of the SAE fires at lm.blocks.1.resid_post"):  # all-zero weights
        explain_sae_features(zoo, sae, "lm.blocks.1.resid_post", n_features=4, n=10, seen=False)
    sae.init_weights(torch.Generator().manual_seed(0))
    res, _ = explain_sae_features(zoo, sae.eval(), "lm.blocks.1.resid_post", n_features=4, n=10, n_bases=4,
                                  seen=False)
    assert res.examined == 4
