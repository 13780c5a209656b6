"""Errors vlmscope raises. Each names the bad value and what would have been valid."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class VlmscopeError(ValueError):
    """Base class: every vlmscope error is also a ValueError, so callers may catch either."""


class SiteError(VlmscopeError, KeyError):
    """A hook site that the model does not have."""

    def __str__(self) -> str:  # KeyError would repr() the message; keep it readable
        return str(self.args[0]) if self.args else ""


class UnsupportedModelError(VlmscopeError):
    """A model whose class no adapter describes."""


class InputError(VlmscopeError):
    """Model inputs that are inconsistent (image count, missing ids, bad shapes)."""


class InterventionError(VlmscopeError):
    """An intervention that cannot apply to this run (shape, batch, dtype, positions)."""


def nearest(name: str, valid: Iterable[str], n: int = 5) -> list[str]:
    """The valid names closest to `name`, best first (difflib ratio)."""
    valid = list(valid)
    close = difflib.get_close_matches(name, valid, n=n, cutoff=0.5)
    if close:
        return close
    # fall back to names sharing the longest dotted prefix
    parts = name.split(".")
    for k in range(len(parts), 0, -1):
        prefix = ".".join(parts[:k])
        hits = [v for v in valid if v.startswith(prefix)]
        if hits:
            return hits[:n]
    return valid[:n]
