"""`vlmscope sae train | eval` on the tiny LLaVA: trains, resumes (a rerun is a no-op), evaluates."""

import argparse
import json

from vlmscope.methods import sae as S
from vlmscope.methods.sae import cli


def _main(argv):
    p = argparse.ArgumentParser()
    cli.add_parser(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(argv)
    return args.func(args)


def test_train_then_eval(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["sae", "train", "--model", "tiny-llava", "--site", "connector.out", "--arch", "topk",
            "--arch", "relu", "--k", "4", "--expansion", "2", "--examples", "32", "--steps", "12",
            "--batch-size", "32", "--chunk-examples", "16", "--checkpoint-every", "5", "--out", str(out),
            "--quiet"]
    assert _main(argv) == 0
    names = sorted(p.parent.name for p in out.glob("*/cfg.json"))
    assert names == ["connector.out-relu-x2-s3", "connector.out-topk-x2-k4"]
    sae = S.load_sae(out / "connector.out-topk-x2-k4")
    assert (sae.cfg.site, sae.cfg.positions, sae.cfg.model) == ("connector.out", "image", "tiny-llava")
    before = (out / "connector.out-topk-x2-k4" / "sae_weights.safetensors").read_bytes()
    assert _main(argv) == 0  # finished runs resume at their last step: the same files again
    assert (out / "connector.out-topk-x2-k4" / "sae_weights.safetensors").read_bytes() == before
    capsys.readouterr()
    assert _main(["sae", "eval", str(out), "--examples", "8", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["sae"] for r in rows] == names
    for r in rows:
        assert r["n_rows"] == 8 * 4 and 0 < r["l0"] and r["explained_variance"] < 1
        assert r["ce_clean"] > 0 and r["ce_zero"] > 0
    assert (out / "connector.out-topk-x2-k4" / "eval" / "result.json").exists()


def test_zoo_data_carries_answers():
    dataset, collate, with_answers = cli._data("shapes-llava", None, None, 4, seed=0)
    inputs, answers = with_answers(dataset[:3])
    assert set(inputs) == {"input_ids", "attention_mask", "pixel_values"}
    assert answers.shape == (3,) and inputs["input_ids"].shape[0] == 3
    assert collate(dataset[:2])["pixel_values"].shape[0] == 2


def test_train_whitened(tmp_path):
    """--whiten reaches the trainer: the run's config records it and the saved decoder rows, which
    whitening folds with its inverse, no longer share one norm."""
    out = tmp_path / "run"
    argv = ["sae", "train", "--model", "tiny-llava", "--site", "connector.out", "--k", "4", "--expansion", "2",
            "--examples", "32", "--steps", "6", "--batch-size", "32", "--chunk-examples", "16", "--whiten", "0.1",
            "--out", str(out), "--quiet"]
    assert _main(argv) == 0
    assert json.loads((out / "training.json").read_text())["config"]["train"]["whiten"] == 0.1
    norms = S.load_sae(out / "connector.out-topk-x2-k4").W_dec.detach().norm(dim=-1)
    assert float(norms.max() / norms.min()) > 1.01


def test_train_matryoshka(tmp_path):
    """--matryoshka reaches the SAE: its folder name and saved config carry the prefix widths."""
    out = tmp_path / "run"
    argv = ["sae", "train", "--model", "tiny-llava", "--site", "connector.out", "--k", "4", "--expansion", "2",
            "--examples", "32", "--steps", "6", "--batch-size", "32", "--chunk-examples", "16", "--matryoshka", "8,16",
            "--out", str(out), "--quiet"]
    assert _main(argv) == 0
    sae = S.load_sae(out / "connector.out-topk-x2-k4-m8.16")
    assert sae.cfg.matryoshka == (8, 16)


def test_train_restarts_keeps_the_lowest_held_out_error(tmp_path, capsys):
    """--restarts 3: three initialisations per SAE, their held-out FVU saved as a Restarts result,
    and the kept one (the lowest) copied to the plain name, which `sae eval` and `serve --sae` read."""
    import torch

    from vlmscope.methods.sae.restarts import Restarts, held_out_fvu
    from vlmscope.methods.sae.sources import site_rows

    out = tmp_path / "run"
    argv = ["sae", "train", "--model", "tiny-llava", "--site", "connector.out", "--k", "4", "--expansion", "2",
            "--examples", "32", "--steps", "8", "--batch-size", "32", "--chunk-examples", "16", "--restarts", "3",
            "--held-out-examples", "16", "--out", str(out), "--quiet"]
    assert _main(argv) == 0
    label = "connector.out-topk-x2-k4"
    restarts = Restarts.load(out / f"{label}-restarts")
    assert restarts.names == tuple(f"{label}-r{r}" for r in range(3)) and restarts.chosen == int(restarts.fvu.argmin())
    kept = out / label
    assert (kept / "sae_weights.safetensors").read_bytes() == \
        (out / restarts.names[restarts.chosen] / "sae_weights.safetensors").read_bytes()
    assert f"{label}: kept {restarts.names[restarts.chosen]}" in capsys.readouterr().out
    # the scores are the FVU on the held-out examples (seed + 1), recomputed here
    from vlmscope.cli import _load

    m, builder = _load("tiny-llava")
    dataset, collate, _ = cli._data("tiny-llava", m, builder, 16, seed=1)
    rows = site_rows(m, collate(dataset), ["connector.out"], "image")["connector.out"]
    fvu = [held_out_fvu(S.load_sae(out / n), rows) for n in restarts.names]
    assert torch.allclose(torch.tensor(fvu), restarts.fvu, rtol=1e-4)


def test_restarts_from_a_store_need_the_model(tmp_path):
    import pytest

    argv = ["sae", "train", "--store", str(tmp_path / "nowhere"), "--site", "connector.out", "--restarts", "2",
            "--out", str(tmp_path / "run"), "--quiet"]
    with pytest.raises(SystemExit, match="give --model with --store"):
        _main(argv)
