"""Where a model runs when accelerate split it over devices or offloads it to CPU or disk.

A model loaded with `device_map=...` (or wrapped by `accelerate.dispatch_model`, `cpu_offload`,
`disk_offload`) keeps offloaded weights on the `meta` device and moves them in for each forward
(accelerate's AlignDevicesHook), so the first parameter's device says nothing about where inputs
belong. accelerate's own rule does: inputs go to the main device, the first accelerator the map
names (CPU when it names none); each module's hook then moves what it reads to its own device.
"""

from __future__ import annotations

import torch
from torch import nn

OFFLOAD = ("cpu", "disk")


def _as_device(d) -> torch.device:
    return torch.device(f"cuda:{d}" if isinstance(d, int) else d)


def _hook_device(hook) -> torch.device | None:
    """The execution device of an accelerate hook (or of the first in a SequentialHook)."""
    for h in getattr(hook, "hooks", (hook,)):
        d = getattr(h, "execution_device", None)
        if d is not None:
            return _as_device(d)
    return None


def input_device(model: nn.Module) -> torch.device:
    """The device a model's inputs go to: accelerate's main device for a dispatched model, else
    the device of its first parameter not on `meta` (a model built on `meta` answers `meta`)."""
    device_map = model.__dict__.get("hf_device_map")  # __dict__: no nn.Module.__getattr__ per run
    if device_map:
        main = [d for d in device_map.values() if d not in OFFLOAD]
        return _as_device(main[0]) if main else torch.device("cpu")
    first = next(model.parameters(), None)
    if first is not None and first.device.type != "meta" and "_hf_hook" not in model.__dict__:
        return first.device  # the common case: one device, no accelerate hooks
    for mod in model.modules():
        hook = mod.__dict__.get("_hf_hook")
        d = _hook_device(hook) if hook is not None else None
        if d is not None:
            return d
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return first.device if first is not None else torch.device("cpu")
