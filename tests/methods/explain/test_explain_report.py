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
    "lowest domain entropy (uniform: ln 3 = 1.10)": 0.72,
    **{f"{d} neurons: own/other {b} block hit": v for d, v in (("plain", 1.2), ("textured", 2.2), ("noisy", 2.7))
       for b in ("first", "last")},
    "image neurons: own/other hit, first block": 4.1, "text neurons: own/other hit, first block": 199.0,
    "image neurons: own/other hit, last block": 0.55, "text neurons: own/other hit, last block": 44.0,
    "patchscope colour: accuracy at lm.blocks.0.resid_post": 1.0,
    "patchscope shape: accuracy at lm.blocks.0.resid_post": 0.975,
    "patchscope colour: accuracy at lm.blocks.3.resid_post": 0.18, "patchscope colour: blank image": 0.18,
}


def test_explain_rows_and_reading(tmp_path):
    (tmp_path / "explain").mkdir()
    (tmp_path / "explain" / "scores.json").write_text(json.dumps(SCORES))
    (tmp_path / "manifest.json").write_text(json.dumps({"model": "m", "stages": [
        {"key": "explain", "title": "Automated explanation", "seconds": 1, "scores": {}}]}))
    rows = {r["check"].split(":")[0]: r for r in scorecard(tmp_path) if r["family"] == "automated explanation"}
    assert rows["TEXTSPAN on shapes-clip"]["verdict"] == "fails its check"  # 2 of 3 attributes
    assert rows["domain-specific neurons (MMNeuron)"]["value"] == "1.200"  # the weakest domain
    assert rows["modality-specific neurons (MINER)"]["verdict"] == "trustworthy here"
    assert rows["Patchscopes"]["value"] == "0.975"
    page = build_report(tmp_path).read_text()
    assert "L0.H3" in page and "textured 2.2× / 2.2×" in page and "accuracy 1.00 from the first LM block and 0.18" \
        in page
