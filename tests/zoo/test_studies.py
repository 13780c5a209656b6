"""Studies across models: the scene probe (what is at each cell, from all image tokens), task
accuracy as a result, and the micro-to-macro statements, against ground truth and closed form."""

import numpy as np
import pytest
import torch

from vlmscope import zoo
from vlmscope.data import COLOURS, place
from vlmscope.experiments.accuracy import TaskAccuracy, task_accuracy
from vlmscope.experiments.micro_macro import MicroMacro, explain
from vlmscope.experiments.scene_probe import cell_labels, scene_trace
from vlmscope.results import Result

pytestmark = pytest.mark.skipif("shapes-llava" not in zoo.names(), reason="shapes-llava is not exported")


@pytest.fixture(scope="module")
def llava():
    return zoo.load("shapes-llava")


def test_cell_labels_name_the_object_at_each_cell_or_empty():
    scene = place(np.random.default_rng(0), [("circle", "red"), ("square", "blue")])
    col = cell_labels([scene], "colour")[:, 0]
    obj = cell_labels([scene], "object")[:, 0]
    cells = {o.cell: o for o in scene.objects}
    assert [int(obj[c]) for c in range(9)] == [int(c in cells) for c in range(9)]
    assert [int(col[c]) for c in sorted(cells)] == [COLOURS.index(cells[c].colour) for c in sorted(cells)]
    assert all(int(col[c]) == len(COLOURS) for c in range(9) if c not in cells)
    with pytest.raises(ValueError, match="valid: colour"):
        cell_labels([scene], "texture")


def test_scene_probe_keeps_the_layout_through_the_mlp_projector(llava):
    trace, scores = scene_trace(llava, "colour", n=500, seed=3)
    assert scores["scene colour at connector.out"] >= 0.9  # one token per cell: nothing lost
    assert trace.parts == tuple(s.split(".")[0] for s in trace.sites)
    assert float(trace.control_score.mean()) < float(trace.score.mean()) - 0.1  # shuffled labels do worse


def test_task_accuracy_matches_the_zoo_evaluation_and_round_trips(llava, tmp_path):
    result, scores = task_accuracy(llava, n=120, seed=4, name="shapes-llava")
    assert scores == {f"accuracy {k}": v for k, v in zoo.evaluate(llava, seed=4, n=120).items()}
    back = Result.load(result.save(tmp_path / "acc"))
    assert isinstance(back, TaskAccuracy) and back.families == result.families
    assert torch.equal(back.accuracy, result.accuracy) and back["where"] == result["where"]


def test_micro_macro_statements_tie_accuracy_gaps_to_decodability_gaps(tmp_path):
    fams = ("colour", "where", "count")
    acc = torch.tensor([[1.0, 0.95, 0.90], [0.99, 0.40, 0.70]])
    # (model, concept colour/shape/object, part vision/connector/lm)
    dec = torch.tensor([[[0.97, 0.96, 0.95], [0.95, 0.95, 0.94], [1.0, 1.0, 1.0]],
                        [[0.97, 0.55, 0.50], [0.95, 0.60, 0.58], [1.0, 1.0, 1.0]]])
    lines = explain(("a", "b"), fams, acc, dec)
    assert len(lines) == 2  # colour differs by 0.01 < margin: no statement
    assert lines[0].startswith("where: a 0.95 vs b 0.40") and "colour at each cell is less decodable in b at the " \
        "lm" in lines[0] and "consistent" in lines[0]
    assert lines[1].startswith("count: a 0.90 vs b 0.70") and "not explained" in lines[1]
    r = MicroMacro(models=("a", "b"), families=fams, accuracy=acc, concepts=("colour", "shape", "object"),
                   parts=("vision", "connector", "lm"), decodability=dec, statements=tuple(lines))
    df = r.to_dataframe()
    assert len(df) == 2 * 3 + 2 * 3 * 3 and set(df.level) == {"macro", "micro"}
    back = Result.load(r.save(tmp_path / "mm"))
    assert back.statements == r.statements and torch.equal(back.decodability, dec)
    assert r.plot() is not None


def test_study_report_has_the_section_and_no_scorecard(tmp_path):
    from vlmscope.report.html import write_study

    fams = ("colour", "where")
    r = MicroMacro(models=("a", "b"), families=fams, accuracy=torch.tensor([[1.0, 0.9], [1.0, 0.4]]),
                   concepts=("colour", "shape", "object"), parts=("vision", "connector", "lm"),
                   decodability=torch.rand(2, 3, 3), statements=("where: a 0.90 vs b 0.40 -- consistent",))
    r.save(tmp_path / "micro-macro")
    r.plot().savefig(tmp_path / "micro-macro" / "figure.png")
    page = write_study(tmp_path, "a vs b", [{"key": "micro-macro", "title": "Micro to macro",
                                             "reading": " ".join(r.statements)}]).read_text()
    assert "Micro to macro" in page and "where: a 0.90 vs b 0.40" in page and "data:image/png;base64" in page
    assert "Ground-truth scorecard" not in page
