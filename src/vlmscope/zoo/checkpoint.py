"""Checkpoints, safetensors only: the resumable training state (written atomically: tmp file, then
os.replace) and the fp16 snapshots along training that store only the parts a stage changed, with
an index json; a snapshot is composed at load time by overlaying every snapshot up to its step."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

INDEX = "index.json"


def save_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    """Write a safetensors file so that a reader (or a resumed run) never sees half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    meta = {"json": json.dumps(metadata)} if metadata is not None else None
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
    os.replace(tmp, path)


def write_json_atomic(obj: object, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def read_metadata(path: Path) -> dict:
    """The JSON metadata that save_atomic stored in a safetensors file."""
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["json"])


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """An optimizer's state as flat tensors plus its param_groups (JSON-able)."""
    sd = opt.state_dict()
    flat = {f"{i}.{k}": v for i, st in sd["state"].items() for k, v in st.items()}
    return flat, sd["param_groups"]


def load_optimizer(opt: torch.optim.Optimizer, flat: dict[str, torch.Tensor], groups: list[dict]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in flat.items():
        i, name = key.split(".", 1)
        state.setdefault(int(i), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": groups})


def split_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Entries under `prefix.` with the prefix removed."""
    n = len(prefix) + 1
    return {k[n:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


def write_snapshot(directory: Path, step: int, stage: str, state: dict[str, torch.Tensor],
                   keys: list[str]) -> None:
    """Store `keys` of a model state dict in fp16 as step_<step>.safetensors and list it in index.json."""
    name = f"step_{step:05d}.safetensors"
    save_atomic({k: state[k].to(torch.float16) for k in keys}, directory / name)
    index = read_index(directory)
    index = [e for e in index if e["step"] != step] + [{"step": step, "stage": stage, "file": name}]
    write_json_atomic(sorted(index, key=lambda e: e["step"]), directory / INDEX)


def read_index(directory: Path) -> list[dict]:
    path = directory / INDEX
    return json.loads(path.read_text()) if path.exists() else []


def compose_snapshot(directory: Path, step: int) -> dict[str, torch.Tensor]:
    """The full fp32 state dict at a snapshot step: every snapshot up to it, overlaid in order."""
    index = read_index(directory)
    steps = [e["step"] for e in index]
    if step not in steps:
        raise ValueError(f"no checkpoint at step {step}; available: {steps}")
    state: dict[str, torch.Tensor] = {}
    for entry in index:
        if entry["step"] <= step:
            state.update({k: v.float() for k, v in load_file(str(directory / entry["file"])).items()})
    return state
