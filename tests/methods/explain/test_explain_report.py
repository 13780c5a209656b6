"""The report's explanation rows and reading, built from a scores.json alone."""

import json

from vlmscope.report.html import build_report, scorecard

SCORES = {
    "score": 0.1, "TEXTSPAN: colour, shape, position with confirmed heads": 2, "TEXTSPAN: colour heads": "L0.H3",
    "TEXTSPAN: shape heads": "L1.H1", "TEXTSPAN: size heads": "none",
    "TEXTSPAN colour heads, direct ablation: own evidence drop": 0.6,
    "TEXTSPAN colour heads, direct ablation: other evidence drop": 0.3,
    "TEXTSPAN shape heads, total ablation: own evidence drop": 0.4,
    "TEXTSPAN shape heads, total ablation: other evidence drop": 0.15,
    "TEXTSPAN: position texts, smallest 1 - cos": 1e-6, "TEXTSPAN: zero-shot position accuracy": 0.1,
    "lowest domain entropy (uniform: ln 3 = 1.10)": 0.72, "neurons specific to plain": 0,
    "neurons specific to textured": 9, "neurons specific to noisy": 12,
    "lowest entropy of a neuron firing most on plain": 1.04,
    "textured+noisy neurons": 9, "textured+noisy neurons: own/other hit, the block where it is largest": 46.0,
    "noisy neurons": 3, "noisy neurons: own/other hit, the block where it is largest": 1.8,
    "weakest own/other hit over the neuron groups, the block where it is largest": 1.8,
    "shapes-clip: lowest domain entropy (uniform: ln 3 = 1.10)": 0.09, "shapes-clip: neurons specific to plain": 0,
    "shapes-clip: textured neurons": 2,
    "shapes-clip: textured neurons: own/other hit, the block where it is largest": 59.6,
    "shapes-clip: weakest own/other hit over the neuron groups, the block where it is largest": 59.6,
    "image neurons: own/other hit, first block": 4.1, "text neurons: own/other hit, first block": 199.0,
    "image neurons: own/other hit, last block": 0.55, "text neurons: own/other hit, last block": 44.0,
    "patchscope colour: accuracy at lm.blocks.0.resid_post": 1.0,
    "patchscope shape: accuracy at lm.blocks.0.resid_post": 0.975,
    "patchscope colour: accuracy at lm.blocks.3.resid_post": 0.18, "patchscope colour: blank image": 0.18,
    "LM image tokens: site": "lm.blocks.2.resid_post", "LM image tokens: features examined": 32,
    "LM image tokens: features labelled": 22, "LM image tokens: verdict: holds": 15,
    "LM image tokens: agreement over all examined features": 0.47,
    "LM image tokens: labels naming what earlier image tokens show": 5,
    "LM image tokens: of those, labels that hold": 2,
    "LM image tokens: best-fitting such label that holds": "seen=none AND NOT column=0 AND background (IoU 1.00)",
    "features tuned": 41, "tuning explanations that hold": 24, "examined: tuning curves hold where no label does": 8,
    "share of examined explained either way": 0.66, "median simulation correlation (tuning)": 0.88,
}


def test_explain_rows_and_reading(tmp_path):
    (tmp_path / "explain").mkdir()
    (tmp_path / "explain" / "scores.json").write_text(json.dumps(SCORES))
    (tmp_path / "manifest.json").write_text(json.dumps({"model": "m", "stages": [
        {"key": "explain", "title": "Automated explanation", "seconds": 1, "scores": {}}]}))
    rows = {r["check"].split(":")[0]: r for r in scorecard(tmp_path) if r["family"] == "automated explanation"}
    assert rows["TEXTSPAN on shapes-clip"]["verdict"] == "fails its check"  # 2 of 3 attributes
    dom = rows["domain-specific neurons (MMNeuron) of shapes-llava"]
    assert dom["value"] == "1.800" and dom["verdict"] == "fails its check"  # the weakest group
    assert "no neuron is specific to plain" in dom["check"]
    assert rows["modality-specific neurons (MINER)"]["verdict"] == "trustworthy here"
    assert rows["Patchscopes"]["value"] == "0.975"
    page = build_report(tmp_path).read_text()
    assert "L0.H3" in page and "textured+noisy (9 neurons) 46.0×; noisy (3 neurons) 1.8×" in page
    assert "No neuron is specific to plain: the most plain-specific has entropy 1.04" in page
    assert "the neurons specific to textured (2 neurons) 59.6× hit" in page  # shapes-clip's, apart
    assert rows["domain-specific neurons (MMNeuron) of shapes-clip"]["verdict"] == "trustworthy here"
    assert "accuracy 1.00 from the first LM block and 0.18" in page
    assert ("(lm.blocks.2.resid_post), an SAE of the same recipe: 22 of 32 latents labelled, 15 hold (0.47 of all "
            "examined). 5 labels need the concepts of what earlier image tokens show") in page
    assert "2 of them hold, e.g. seen=none AND NOT column=0 AND background (IoU 1.00)" in page
    assert ("24 of 41 replicate on fresh scenes, 8 of them where no label holds: a label or the curves explain 0.66 "
            "of the examined latents (simulation correlation, median 0.88)") in page
