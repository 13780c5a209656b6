import pytest
import torch

import vlmscope as vs
from vlmscope import testing as T
from vlmscope.methods.similarity import cka_matrix, site_representations


def _feature_space_linear_cka(x, y):
    """The closed form ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F) on centred features."""
    x, y = x.double() - x.double().mean(0), y.double() - y.double().mean(0)
    return float((y.T @ x).norm() ** 2 / ((x.T @ x).norm() * (y.T @ y).norm()))


def test_linear_cka_equals_the_feature_space_formula():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(50, 8, generator=g), torch.randn(50, 5, generator=g)
    y = y + 0.5 * x[:, :5]
    r = cka_matrix({"x": x}, {"y": y})
    assert float(r.values[0, 0]) == pytest.approx(_feature_space_linear_cka(x, y), abs=1e-6)


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_cka_is_one_with_itself_and_invariant_to_rotation_and_scale(kernel):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 6, generator=g)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g))
    r = cka_matrix({"x": x, "rot": 3.0 * x @ q, "noise": torch.randn(40, 6, generator=g)}, kernel=kernel)
    assert float(r.values[0, 0]) == pytest.approx(1.0, abs=1e-5)
    assert float(r.values[0, 1]) == pytest.approx(1.0, abs=1e-5)
    assert float(r.values[0, 2]) < 0.6
    torch.testing.assert_close(r.values, r.values.T)


def test_cka_between_sites_of_a_model():
    model = T.tiny_llava()
    m = vs.load(model)
    x = T.llava_inputs(model, batch=12)
    reps = site_representations(m, x, m.sites("lm.blocks.*.resid_post"))
    r = cka_matrix(reps)
    assert r.values.shape == (2, 2) and abs(float(r.values[1, 1]) - 1) < 1e-5
    mean = site_representations(m, x, ["lm.blocks.0.resid_post"], positions="mean:image")
    assert mean["lm.blocks.0.resid_post"].shape == (12, 64)
    with pytest.raises(ValueError, match="row counts differ"):
        cka_matrix({"a": torch.randn(5, 2)}, {"b": torch.randn(6, 2)})
