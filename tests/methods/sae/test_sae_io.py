"""SAE files: SAELens's layout and names; strict loading; SAELens's own files loaded by us and
ours by SAELens (when the sae-lens package is installed) with identical encodings; result
round trips."""

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from vlmscope.methods import sae as S
from vlmscope.methods.sae.evaluate import SAEComparison, SAEEval
from vlmscope.methods.sae.features import ConceptF1, FeatureViews, concept_f1
from vlmscope.results import Result

ARCHS = ("relu", "topk", "batchtopk", "jumprelu")


def _sae(arch, d_in=8, d_sae=20, seed=0, **kw):
    sae = S.build_sae(S.SAEConfig(arch, d_in, d_sae, k=3, site="connector.out", positions="image",
                                  model="tiny-llava", **kw))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.state_dict().values():
            p.copy_(0.5 * torch.randn(p.shape, generator=g))
        if hasattr(sae, "threshold"):
            sae.threshold.copy_(torch.rand(d_sae, generator=g) * 0.3)
    return sae.eval()


X = torch.randn(64, 8, generator=torch.Generator().manual_seed(9))


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_round_trip_in_saelens_layout(tmp_path, arch):
    sae = _sae(arch)
    S.save_sae(sae, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["architecture"] == {"relu": "standard", "batchtopk": "jumprelu"}.get(arch, arch)
    assert (cfg["d_in"], cfg["d_sae"], cfg["apply_b_dec_to_input"]) == (8, 20, True)
    assert cfg["metadata"]["vlmscope"]["architecture"] == arch
    w = load_file(str(tmp_path / "sae_weights.safetensors"))
    names = {"W_enc": (8, 20), "W_dec": (20, 8), "b_enc": (20,), "b_dec": (8,)}
    if arch in ("jumprelu", "batchtopk"):
        names["threshold"] = (20,)
    assert {k: tuple(v.shape) for k, v in w.items()} == names
    back = S.load_sae(tmp_path)
    assert type(back) is type(sae) and back.cfg == sae.cfg
    for (k, a), (k2, b) in zip(sae.state_dict().items(), back.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b)
    assert torch.equal(back.encode(X), sae.encode(X)) and torch.equal(back(X), sae(X))


def test_loading_is_strict(tmp_path):
    sae = _sae("jumprelu")
    S.save_sae(sae, tmp_path)
    w = load_file(str(tmp_path / "sae_weights.safetensors"))
    save_file({k: v for k, v in w.items() if k != "threshold"}, str(tmp_path / "sae_weights.safetensors"))
    with pytest.raises(ValueError, match=r"\['threshold'\] missing"):
        S.load_sae(tmp_path)
    save_file({**w, "extra": torch.zeros(1)}, str(tmp_path / "sae_weights.safetensors"))
    with pytest.raises(ValueError, match=r"\['extra'\] are unknown"):
        S.load_sae(tmp_path)
    save_file(w, str(tmp_path / "sae_weights.safetensors"))
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    cfg["metadata"]["vlmscope"]["colour"] = "red"
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"\['colour'\] are unknown"):
        S.load_sae(tmp_path)
    with pytest.raises(FileNotFoundError, match="cfg.json"):
        S.load_sae(tmp_path / "nowhere")


def _write_saelens(path, cfg, tensors):
    path.mkdir(parents=True, exist_ok=True)
    (path / "cfg.json").write_text(json.dumps(cfg))
    save_file(tensors, str(path / "sae_weights.safetensors"))


# what SAELens 6.54.12's save_model writes (copied from its output), and a pre-6.0 TopK config
V6 = {"d_in": 8, "d_sae": 20, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
      "normalize_activations": "none", "reshape_activations": "none",
      "metadata": {"sae_lens_version": "6.54.12", "sae_lens_training_version": "6.54.12",
                   "hook_name": "blocks.0.hook_resid_post"}}
PRE6 = {"d_in": 8, "d_sae": 20, "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 3},
        "hook_point": "blocks.0.hook_resid_post", "model_name": "gpt2", "normalize_activations": False,
        "apply_b_dec_to_input": True, "dataset_path": "Skylion007/openwebtext", "context_size": 128}


def test_saelens_written_files_load_with_their_semantics(tmp_path):
    g = torch.Generator().manual_seed(4)
    base = {"W_enc": torch.randn(8, 20, generator=g), "W_dec": torch.randn(20, 8, generator=g),
            "b_enc": torch.randn(20, generator=g), "b_dec": torch.randn(8, generator=g)}
    pre = (X - base["b_dec"]) @ base["W_enc"] + base["b_enc"]
    top3 = torch.zeros_like(pre).scatter(-1, pre.topk(3).indices, pre.topk(3).values.relu())
    cases = {
        "standard": ({**V6, "architecture": "standard"}, base, pre.relu()),
        "topk": ({**V6, "architecture": "topk", "k": 3, "rescale_acts_by_decoder_norm": False}, base, top3),
        "pre6": (PRE6, base, top3),
        "jumprelu_log": ({**V6, "architecture": "jumprelu"},
                         {**base, "log_threshold": torch.full((20,), -1.0)},
                         pre.relu() * (pre > torch.exp(torch.tensor(-1.0)))),
        "batchtopk_train": ({**V6, "architecture": "batchtopk", "k": 3.0},
                            {**base, "topk_threshold": torch.tensor(0.4)}, pre.relu() * (pre > 0.4)),
    }
    for name, (cfg, tensors, expected) in cases.items():
        _write_saelens(tmp_path / name, cfg, tensors)
        sae = S.load_sae(tmp_path / name)
        torch.testing.assert_close(sae.encode(X), expected, msg=name)
        assert sae.cfg.site == "blocks.0.hook_resid_post"
    _write_saelens(tmp_path / "z", {**V6, "architecture": "standard", "reshape_activations": "hook_z"}, base)
    with pytest.raises(ValueError, match="hook_z"):
        S.load_sae(tmp_path / "z")
    _write_saelens(tmp_path / "g", {**V6, "architecture": "gated"}, base)
    with pytest.raises(ValueError, match="'gated' is not supported"):
        S.load_sae(tmp_path / "g")


@pytest.mark.parametrize("arch", ARCHS)
def test_saelens_reads_our_files_and_we_read_theirs(tmp_path, arch):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sae_lens = pytest.importorskip("sae_lens")
    ours = _sae(arch)
    S.save_sae(ours, tmp_path / "ours")
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "ours"))
    with torch.no_grad():
        assert torch.equal(theirs.encode(X), ours.encode(X))
        assert torch.equal(theirs.decode(theirs.encode(X)), ours(X))
    theirs.save_model(str(tmp_path / "theirs"))
    back = S.load_sae(tmp_path / "theirs")
    with torch.no_grad():
        assert torch.equal(back.encode(X), theirs.encode(X))


def test_results_round_trip_and_plot(tmp_path):
    import matplotlib.pyplot as plt

    ev = SAEEval(site="connector.out", architecture="topk", positions="image", n_rows=10, l0=3.0,
                 explained_variance=0.9, mse=0.1, dead_fraction=0.1, dense_fraction=0.0,
                 frequency=torch.rand(20), ce_clean=1.0, ce_sae=1.1, ce_zero=2.0, loss_recovered=0.9)
    cmp_ = SAEComparison(architectures=("relu", "topk"), target_l0=4.0, knob=torch.tensor([3.0, 4.0]),
                         l0=torch.tensor([4.2, 4.0]), explained_variance=torch.tensor([0.7, 0.9]),
                         mse=torch.tensor([0.3, 0.1]), dead_fraction=torch.zeros(2),
                         loss_recovered=torch.full((2,), float("nan")),
                         accuracy_recovered=torch.full((2,), float("nan")))
    top = torch.tensor([[0, 1], [2, -1]])
    fv = FeatureViews(site="lm.blocks.0.resid_post", features=torch.tensor([0, 5]), top_rows=top,
                      top_examples=top + 10, top_values=torch.rand(2, 2),
                      patch_maps=torch.rand(2, 2, 3, 3), hist_counts=torch.rand(2, 4),
                      hist_edges=torch.linspace(0, 1, 5).expand(2, 5).clone(), frequency=torch.rand(2),
                      logit_top_ids=torch.zeros(2, 3, dtype=torch.long), logit_top_values=torch.rand(2, 3),
                      logit_bottom_ids=torch.zeros(2, 3, dtype=torch.long),
                      logit_bottom_values=torch.rand(2, 3), n_positions=9)
    cf = concept_f1(torch.tensor([0, 1, 1, 2]), torch.rand(4, 3), ["a", "b", "c"])
    for r in (ev, cmp_, fv, cf):
        back = Result.load(r.save(tmp_path / r.kind))
        assert type(back) is type(r)
        for k, v in vars(r).items():
            w = getattr(back, k)
            if isinstance(v, torch.Tensor):
                torch.testing.assert_close(v, w, rtol=0, atol=0, equal_nan=True)
            else:
                assert v == w or (v != v and w != w), k  # NaN reads back as NaN
        assert len(r.to_dataframe()) > 0
        plt.close(r.plot())
    assert isinstance(cf, ConceptF1) and repr(ev).startswith("SAEEval(topk")
