"""Across training checkpoints and across models on the zoo: phase changes (closed form), the
over-training curves of shapes-llava (accuracy from chance to >= 95%, a probe change lined up
before it), the same run on a user's checkpoint folders, and the cross-model comparison table."""

import pytest
import torch

from vlmscope import zoo
from vlmscope.errors import InputError
from vlmscope.experiments.across import checkpoint_step, compare, over_training, phase_changes
from vlmscope.experiments.spec import Experiment, method

pytestmark = pytest.mark.skipif("shapes-llava" not in zoo.names(), reason="shapes-llava is not exported")
PROBE = Experiment(model="shapes-llava", methods=(method("probe", attribute="cell", n=200),))


def test_phase_changes_find_jumps_and_merge_runs():
    steps = [0, 10, 20, 30, 40, 50]
    values = torch.tensor([[0.0, 0.05, 0.3, 0.6, 0.62, 0.61],   # one rise over two intervals -> merged
                           [0.9, 0.9, 0.9, 0.5, 0.5, 0.9],      # a fall, then a rise
                           [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]], dtype=torch.float64)  # steady: 0.1 < threshold
    found = phase_changes(steps, values, ["a", "b", "c"], threshold=0.2)
    assert found == [{"metric": "a", "step": 20, "before": 0.05, "after": 0.6},
                     {"metric": "b", "step": 30, "before": 0.9, "after": 0.5},
                     {"metric": "b", "step": 50, "before": 0.5, "after": 0.9}]


@pytest.fixture(scope="module")
def curves():
    return over_training("shapes-llava", PROBE, steps=[0, 100, 800, 1800, 21800], n_eval=300)


def test_accuracy_rises_from_chance_and_a_probe_change_comes_first(curves):
    acc = {m: curves.values[i] for i, m in enumerate(curves.metrics) if m.startswith("accuracy ")}
    first, last = torch.stack([v[0] for v in acc.values()]), torch.stack([v[-1] for v in acc.values()])
    assert len(acc) == 6 and float(first.max()) <= 0.1  # chance: the untrained LM names no answer word
    assert float(last.mean()) >= 0.95 and float(last.min()) >= 0.9  # 50 examples per family
    steps = {c["metric"]: c["step"] for c in curves.changes}
    assert steps["cell decodable, last vision block"] == 100  # the tower learns the cell in stage 1 ...
    assert steps["accuracy where"] == 1800  # ... the answers come with instruction tuning
    lines = curves.alignments()
    assert any(line.startswith("accuracy where") and "cell decodable" in line for line in lines)


def test_user_checkpoint_folders_give_the_zoo_curves(curves, tmp_path):
    folders = []
    for step in (0, 21800):
        model, processor = zoo.load_hf("shapes-llava", step=step)
        folder = tmp_path / f"checkpoint-{step}"
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        folders.append(folder)
    mine = over_training(folders[::-1], PROBE, n_eval=300)
    assert mine.steps == (0, 21800) and mine.metrics == curves.metrics
    ref = curves.values[:, [0, -1]]
    torch.testing.assert_close(mine.values, ref, atol=1e-6, rtol=0, equal_nan=True)
    with pytest.raises(InputError, match="step"):
        checkpoint_step(tmp_path / "final")


def test_compare_aligns_every_model_and_part():
    names = [n for n in ("shapes-llava", "shapes-blip2", "shapes-llava-contrastive") if n in zoo.names()]
    exp = Experiment(methods=(method("scene", attribute="colour", n=300), method("accuracy", n=120)))
    result = compare(names, exp)
    df = result.to_dataframe()
    assert set(df.model) == set(names)
    traced = df[df.part.notna()]
    for name in names:
        parts = set(traced[traced.model == name].part)
        assert parts == {"vision", "connector", "lm"}, (name, parts)
        depth = traced[traced.model == name].depth
        assert depth.min() >= 0 and depth.max() == 1.0
    accuracy = df[df.metric.str.startswith("accuracy ")]
    assert len(accuracy) == 6 * len(names)
    assert result.plot() is not None
