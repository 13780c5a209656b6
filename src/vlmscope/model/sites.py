"""Hook sites: the one naming scheme shared by every model, and how names map to modules.

A site name reads part.blocks.{i}.component (see docs/sites.md). Each adapter turns its table of
module paths into `SiteSpec`s; everything else in vlmscope speaks only in site names.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vlmscope.errors import SiteError, nearest

if TYPE_CHECKING:
    from torch import nn

    from vlmscope.model.positions import Positions

# How a site's value is read from (and written back into) the module it lives on.
#   output:       the module's output (first element when it returns a tuple)
#   input:        an argument of the module's forward (kwarg `arg`, else positional 0)
#   pattern:      attention probabilities inside the attention function (B, heads, q, k)
#   resid_mid:    the residual between attention and MLP (input of the MLP's norm); writes also
#                 carry the change into the block's output, so the residual stream really changes
#   model_output: an attribute of the whole model's output (dual encoders' similarity logits)
HOOK_KINDS = ("output", "input", "pattern", "resid_mid", "model_output")


@dataclass(frozen=True)
class SiteSpec:
    """Where one named site lives in a transformers model."""

    name: str
    module: str  # dotted path from the model root ("" is the root)
    hook: str  # one of HOOK_KINDS
    stream: str  # token stream its positions index: "lm", "vision", "connector" or "text"
    arg: str | None = None  # input kwarg name / model-output attribute
    layer: int | None = None
    heads: int | None = None  # split the last dim into (heads, d_head) for attn.z
    block: str | None = None  # the enclosing block, for resid_mid writes and flat sites
    pooled: bool = False  # one vector per row, no position axis (a pooled embedding)
    # How the module holds the tensor, when not as (batch, pos, ...); hooks show (batch, pos, ...):
    #   packed: no batch axis, every row's tokens packed into one sequence (shown with batch 1)
    #   flat:   batch and pos merged into one axis (unflattened with the enclosing block's input shape)
    packed: bool = False
    flat: bool = False
    width: str | None = None  # "param.path:dim": the parameter dimension that sizes the last axis
    key_stream: str | None = None  # attn.pattern of a cross-attention: the stream its keys index

    @property
    def part(self) -> str:
        return self.name.split(".", 1)[0]

    @property
    def layout(self) -> str:
        """Axis names of the cached tensor."""
        if self.hook == "pattern":
            return "batch head query key"
        if self.heads:
            return "batch pos head d_head"
        if self.hook == "model_output":
            return "image text"
        if self.pooled:
            return "batch d"
        return "batch pos d"


_GLOB = re.compile(r"[*?\[]")


def is_pattern(name: str) -> bool:
    return bool(_GLOB.search(name))


def resolve(request: str | Sequence[str] | None, table: dict[str, SiteSpec]) -> list[str]:
    """Expand site names and glob patterns into concrete site names, in model order.

    `None` means every site. An unknown name or a pattern matching nothing raises SiteError
    naming the nearest valid sites.
    """
    if request is None:
        return list(table)
    items = [request] if isinstance(request, str) else list(request)
    chosen: set[str] = set()
    for item in items:
        if not isinstance(item, str):
            raise SiteError(f"site names are strings, got {item!r} ({type(item).__name__})")
        if is_pattern(item):
            hits = [s for s in table if fnmatch.fnmatchcase(s, item)]
            if not hits:
                raise SiteError(
                    f"site pattern {item!r} matches no site of this model; "
                    f"nearest sites: {', '.join(nearest(item.replace('*', '0'), table))}"
                )
            chosen.update(hits)
        elif item in table:
            chosen.add(item)
        else:
            raise SiteError(
                f"unknown site {item!r}; nearest valid sites: {', '.join(nearest(item, table))}. "
                "List them all with VLM.sites()."
            )
    return [s for s in table if s in chosen]


def filter_names(names: Iterable[str], pattern: str | None) -> list[str]:
    if pattern is None:
        return list(names)
    return [n for n in names if fnmatch.fnmatchcase(n, pattern)]


def site_shape(spec: SiteSpec, positions: Mapping[str, Positions],
               model: nn.Module) -> tuple[int, ...] | None:
    """The shape `spec` takes in a run whose token streams have these positions, by arithmetic on
    the positions and the model's parameter shapes (no forward: a model on the meta device works).
    None when the run lacks the site's stream (e.g. a dual encoder given only images)."""
    if spec.hook == "model_output":
        if "vision" not in positions or "text" not in positions:
            return None
        return positions["vision"].shape[0], positions["text"].shape[0]
    keys = spec.key_stream or spec.stream
    if spec.stream not in positions or keys not in positions:
        return None
    rows, length = positions[spec.stream].shape
    if spec.hook == "pattern":
        return rows, spec.heads, length, positions[keys].shape[1]
    path, dim = spec.width.rsplit(":", 1)
    width = model.get_parameter(path).shape[int(dim)]
    if spec.pooled:
        return rows, width
    if spec.heads:
        return rows, length, spec.heads, width // spec.heads
    return rows, length, width
