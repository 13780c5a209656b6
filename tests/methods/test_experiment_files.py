"""Experiment files: parsing with clear errors, and runs on zoo data and on the user's own images."""

import json
from pathlib import Path

import pytest

from vlmscope import zoo
from vlmscope.errors import InputError
from vlmscope.experiments.run import run_experiment
from vlmscope.experiments.spec import load_experiment, parse

EXAMPLES = Path(__file__).parents[2] / "examples"


def test_parse_errors_name_the_valid_keys(tmp_path):
    with pytest.raises(InputError, match="valid: .*model"):
        parse({"modle": "x"})
    with pytest.raises(InputError, match="unknown method kind 'probes'"):
        parse({"method": [{"kind": "probes"}]})
    with pytest.raises(InputError, match="unknown option"):
        parse({"method": [{"kind": "lens", "window": 3}]})
    with pytest.raises(InputError, match="one question per image"):
        parse({"data": {"images": ["a.png"], "questions": []}})
    bad = tmp_path / "bad.toml"
    bad.write_text("model = [")
    with pytest.raises(InputError, match="not valid TOML"):
        load_experiment(bad)


def test_example_files_parse():
    exp = load_experiment(EXAMPLES / "your-images.toml")
    assert exp.data is not None and len(exp.data.images) == 2 and exp.data.labels == (0, 1)
    assert [m.kind for m in exp.methods] == ["lens", "knockout", "patch"]
    exp = load_experiment(EXAMPLES / "where-is-position-lost.toml")
    assert exp.data is None and exp.methods[0].options == {"attribute": "cell", "n": 300}
    exp = load_experiment(EXAMPLES / "across-models.toml")
    assert [m.name for m in exp.methods] == ["accuracy", "scene-colour", "scene-shape", "knockout"]
    assert [m.traces for m in exp.methods] == [False, True, True, False]


@pytest.mark.skipif("shapes-llava" not in zoo.names(), reason="shapes-llava not exported")
def test_run_on_the_users_images(tmp_path):
    exp = load_experiment(EXAMPLES / "your-images.toml")
    out = run_experiment(exp, tmp_path / "run", progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["key"] for s in manifest["stages"]] == ["lens", "knockout", "patch"]
    for name in ("lens", "knockout", "patch"):
        assert (out / name / "result.json").exists() and (out / name / "figure.png").exists()
    assert (out / "index.html").exists()
    # the model answers these two colour questions; the final layer's lens reads that answer
    lens = json.loads((out / "lens" / "scores.json").read_text())
    assert lens["layer 3: last-token top word of example 0"] == "orange"
