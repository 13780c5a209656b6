"""SAE files in SAELens's layout: a folder with `cfg.json` and `sae_weights.safetensors`.

Tensors carry SAELens's names and shapes: W_enc (d_in, d_sae), W_dec (d_sae, d_in), b_enc (d_sae,),
b_dec (d_in,), and `threshold` (d_sae,) for JumpReLU. `cfg.json` holds SAELens's keys (d_in, d_sae,
dtype, device, apply_b_dec_to_input, normalize_activations, reshape_activations, architecture, and
k / rescale_acts_by_decoder_norm for TopK) and vlmscope's own description under
metadata["vlmscope"] (format, architecture, site, positions, model, k, and matryoshka widths when
trained so). Architectures map to SAELens's: relu → "standard", topk → "topk", jumprelu →
"jumprelu", batchtopk → "jumprelu" with its inference threshold (which is how SAELens itself saves
BatchTopK and Matryoshka BatchTopK SAEs); a Matryoshka SAE is saved as its base architecture.

Loading is strict about what changes the function: an unknown tensor, a missing one, a wrong
shape or a config value we do not implement is an error. Descriptive SAELens keys (dataset,
context size, ...) are ignored.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from vlmscope.methods.sae.base import SAE, SAEConfig, build_sae
from vlmscope.model.store import _atomic_write_bytes

FORMAT = 1
CFG, WEIGHTS = "cfg.json", "sae_weights.safetensors"
TO_SAELENS = {"relu": "standard", "topk": "topk", "batchtopk": "jumprelu", "jumprelu": "jumprelu"}
FROM_SAELENS = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu", "batchtopk": "batchtopk",
                "matryoshka_batchtopk": "batchtopk"}  # SAELens training files; its inference files are jumprelu
_OURS = ("format", "architecture", "site", "positions", "model", "k")
_OPTIONAL = ("matryoshka",)  # training-only descriptions, written when set


def sae_config_dict(sae: SAE) -> dict:
    """The cfg.json document of an SAE (SAELens keys + metadata["vlmscope"])."""
    c = sae.cfg
    doc = {"d_in": c.d_in, "d_sae": c.d_sae, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": c.apply_b_dec_to_input, "normalize_activations": "none",
           "reshape_activations": "none", "architecture": TO_SAELENS[c.architecture],
           "metadata": {"hook_name": c.site, "model_name": c.model,
                        "vlmscope": {"format": FORMAT, "architecture": c.architecture, "site": c.site,
                                     "positions": c.positions, "model": c.model, "k": c.k}}}
    if c.matryoshka:
        doc["metadata"]["vlmscope"]["matryoshka"] = list(c.matryoshka)
    if c.architecture == "topk":
        doc.update(k=c.k, rescale_acts_by_decoder_norm=c.rescale_acts_by_decoder_norm)
    return doc


def save_sae(sae: SAE, path: str | Path) -> Path:
    """Write `sae` to the folder `path` (created) in SAELens's layout; each file atomically."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    names = ["W_enc", "W_dec", "b_enc", "b_dec"] + (["threshold"] if hasattr(sae, "threshold") else [])
    tensors = {n: getattr(sae, n).detach().float().cpu().contiguous() for n in names}
    _atomic_write_bytes(path / WEIGHTS, lambda p: save_file(tensors, p))
    _atomic_write_bytes(path / CFG, lambda p: Path(p).write_text(json.dumps(sae_config_dict(sae), indent=1)))
    return path


def load_sae(path: str | Path) -> SAE:
    """An SAE from a folder written by `save_sae` or by SAELens (standard, topk, jumprelu or
    batchtopk architectures), in float32 on the CPU."""
    path = Path(path)
    for f in (CFG, WEIGHTS):
        if not (path / f).exists():
            raise FileNotFoundError(f"{path} has no {f}: not an SAE folder ({CFG} + {WEIGHTS})")
    doc = json.loads((path / CFG).read_text())
    ours = (doc.get("metadata") or {}).get("vlmscope")
    cfg = _our_config(doc, ours, path) if ours is not None else _saelens_config(doc, path)
    tensors = _weights(load_file(str(path / WEIGHTS)), cfg, path)
    sae = build_sae(cfg)
    sae.load_state_dict(tensors, strict=True)
    return sae.eval()


def _our_config(doc: dict, ours: dict, path: Path) -> SAEConfig:
    unknown, missing = set(ours) - set(_OURS) - set(_OPTIONAL), set(_OURS) - set(ours)
    if unknown or missing:
        raise ValueError(f"{path / CFG}: metadata.vlmscope keys {sorted(unknown)} are unknown and "
                         f"{sorted(missing)} missing (expected {', '.join(_OURS)})")
    if ours["format"] != FORMAT:
        raise ValueError(f"{path / CFG}: SAE format {ours['format']!r}; this vlmscope reads format {FORMAT}")
    return SAEConfig(ours["architecture"], int(doc["d_in"]), int(doc["d_sae"]), k=int(ours["k"]),
                     site=ours["site"], positions=ours["positions"], model=ours["model"],
                     apply_b_dec_to_input=bool(doc.get("apply_b_dec_to_input", True)),
                     rescale_acts_by_decoder_norm=bool(doc.get("rescale_acts_by_decoder_norm", False)),
                     matryoshka=tuple(ours.get("matryoshka", ())))


def _saelens_config(doc: dict, path: Path) -> SAEConfig:
    arch = doc.get("architecture")
    fn = doc.get("activation_fn", doc.get("activation_fn_str"))
    if arch is None:  # SAELens < 6 wrote no architecture for standard / topk SAEs
        arch = "topk" if fn == "topk" else "standard"
    if arch not in FROM_SAELENS:
        raise ValueError(f"{path / CFG}: SAELens architecture {arch!r} is not supported; supported: "
                         f"{', '.join(FROM_SAELENS)}")
    if doc.get("reshape_activations", "none") not in ("none", None):
        raise ValueError(f"{path / CFG}: reshape_activations={doc['reshape_activations']!r} (hook_z SAEs) "
                         "is not supported; supported: 'none'")
    norm = doc.get("normalize_activations", "none")
    norm = {False: "none", True: "expected_average_only_in", None: "none"}.get(norm, norm)
    if norm not in ("none", "expected_average_only_in"):
        raise ValueError(f"{path / CFG}: normalize_activations={norm!r} is not supported; supported: 'none', "
                         "'expected_average_only_in' (a training-time scaling SAELens ignores at inference)")
    k = doc.get("k", (doc.get("activation_fn_kwargs") or {}).get("k", 32))
    meta = doc.get("metadata") or {}
    return SAEConfig(FROM_SAELENS[arch], int(doc["d_in"]), int(doc["d_sae"]), k=int(round(float(k))),
                     site=str(meta.get("hook_name") or doc.get("hook_name") or doc.get("hook_point") or ""),
                     model=str(meta.get("model_name") or doc.get("model_name") or ""),
                     apply_b_dec_to_input=bool(doc.get("apply_b_dec_to_input", True)),
                     rescale_acts_by_decoder_norm=bool(doc.get("rescale_acts_by_decoder_norm", False)))


def _weights(raw: dict[str, torch.Tensor], cfg: SAEConfig, path: Path) -> dict[str, torch.Tensor]:
    raw = dict(raw)
    if "log_threshold" in raw:  # older SAELens JumpReLU training files
        raw["threshold"] = raw.pop("log_threshold").exp()
    if "topk_threshold" in raw:  # SAELens BatchTopK training files: one scalar threshold
        raw["threshold"] = raw.pop("topk_threshold").reshape(()).expand(cfg.d_sae)
    shapes = {"W_enc": (cfg.d_in, cfg.d_sae), "W_dec": (cfg.d_sae, cfg.d_in), "b_enc": (cfg.d_sae,),
              "b_dec": (cfg.d_in,)}
    if cfg.architecture in ("jumprelu", "batchtopk"):
        shapes["threshold"] = (cfg.d_sae,)
    unknown, missing = set(raw) - set(shapes), set(shapes) - set(raw)
    if unknown or missing:
        raise ValueError(f"{path / WEIGHTS}: tensors {sorted(unknown)} are unknown and {sorted(missing)} "
                         f"missing for a {cfg.architecture!r} SAE (expected {', '.join(shapes)})")
    for name, shape in shapes.items():
        if tuple(raw[name].shape) != shape:
            raise ValueError(f"{path / WEIGHTS}: {name} has shape {tuple(raw[name].shape)}, expected {shape}")
    return {k: v.float().contiguous() for k, v in raw.items()}
