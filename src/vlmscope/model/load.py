"""`load`: wrap a model the user loaded (the main path), a local checkpoint folder, or a zoo model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from vlmscope.errors import UnsupportedModelError
from vlmscope.model.vlm import VLM


def load(model: nn.Module | str | Path, processor: Any = None, *, local_files_only: bool = True,
         trust_remote_code: bool = False, **from_pretrained_kwargs) -> VLM:
    """A `VLM` view of `model`.

    model: a loaded transformers model (used as is, never copied or changed); a local folder
    written by `save_pretrained` (loaded with safetensors, offline unless local_files_only=False);
    or "zoo:NAME" for a built-in zoo model. Extra keywords (dtype, device_map, ...) go to
    `from_pretrained`.
    """
    if isinstance(model, nn.Module):
        return VLM(model, processor)
    name = str(model)
    if name.startswith("zoo:"):
        from vlmscope import zoo

        return zoo.load(name[4:])
    return _load_dir(Path(name), processor, local_files_only, trust_remote_code, from_pretrained_kwargs)


def _load_dir(path: Path, processor, local_files_only, trust_remote_code, kwargs) -> VLM:
    import transformers

    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a folder; give a loaded model, a local checkpoint folder or "
                                "'zoo:NAME' (see vlmscope.zoo.names())")
    config = transformers.AutoConfig.from_pretrained(path, local_files_only=local_files_only,
                                                     trust_remote_code=trust_remote_code)
    archs = getattr(config, "architectures", None) or []
    cls = next((getattr(transformers, a) for a in archs if hasattr(transformers, a)), None)
    if cls is None:
        raise UnsupportedModelError(f"{path}/config.json names architectures {archs}, none of which transformers "
                                    "provides")
    model = cls.from_pretrained(path, local_files_only=local_files_only, trust_remote_code=trust_remote_code,
                                use_safetensors=True, **kwargs)
    model.eval()
    if processor is None and any((path / f).exists() for f in ("processor_config.json", "preprocessor_config.json")):
        processor = transformers.AutoProcessor.from_pretrained(path, local_files_only=local_files_only,
                                                               trust_remote_code=trust_remote_code)
    return VLM(model, processor)
