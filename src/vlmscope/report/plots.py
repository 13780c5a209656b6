"""Figures for results. Every function returns a matplotlib Figure and never shows it."""

from __future__ import annotations

from collections.abc import Callable

import matplotlib

matplotlib.use("Agg", force=False)
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

_PLOTTERS: dict[str, Callable] = {}


def plotter(kind: str):
    def register(fn):
        _PLOTTERS[kind] = fn
        return fn
    return register


def plot(result, **kwargs):
    try:
        fn = _PLOTTERS[result.kind]
    except KeyError:
        raise ValueError(f"no plot for results of kind {result.kind!r}; plottable: {', '.join(sorted(_PLOTTERS))}") \
            from None
    return fn(result, **kwargs)


@plotter("probes")
def probes(r, ax=None, title: str | None = None):
    """Test score per probe, with the control task's score beneath it (selectivity is the gap)."""
    fig, ax = _axes(ax, (max(4, 0.35 * len(r.names)), 3))
    x = np.arange(len(r.names))
    ax.plot(x, r.score.numpy(), "o-", label=f"{r.target} ({r.probe_kind})")
    if not r.control_score.isnan().all():
        ax.plot(x, r.control_score.numpy(), "x--", color="grey", label="control task")
    ax.set_xticks(x, r.names, rotation=70, fontsize=7)
    ax.set_ylabel("test accuracy" if r.probe_kind == "logistic" else "test R²")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8)
    ax.set_title(title or f"probe decodability of {r.target}")
    fig.tight_layout()
    return fig


@plotter("lens")
def lens(r, ax=None, example: int = 0, what: str = "entropy"):
    """Entropy per layer and role (the three-stage curve), or the top-1 probability map."""
    fig, ax = _axes(ax, (5, 3))
    if what == "entropy":
        curve = r.entropy_curve()
        for role, sub in curve.groupby("role"):
            ax.plot(sub.layer, sub.entropy, "o-", label=role)
        ax.set_xlabel("layer")
        ax.set_ylabel("entropy (nats)")
        ax.legend(fontsize=8)
        ax.set_title(f"{r.lens} lens: entropy across layers" + (" (approximate)" if r.approximate else ""))
    else:
        im = ax.imshow(r.top_probs[:, example, :, 0].numpy(), aspect="auto", cmap="viridis")
        ax.set_xlabel("position")
        ax.set_ylabel("layer")
        fig.colorbar(im, ax=ax, label="top-1 probability")
    fig.tight_layout()
    return fig


def patch_words(image: np.ndarray | None, words: list[list[str]], probs=None, ax=None, title: str = ""):
    """Words drawn over the image's patch grid (the per-patch lens), shaded by probability."""
    rows, cols = len(words), len(words[0])
    fig, ax = _axes(ax, (4, 4))
    if image is not None:
        ax.imshow(image, extent=(0, cols, rows, 0))
    if probs is not None:
        ax.imshow(np.asarray(probs), extent=(0, cols, rows, 0), cmap="magma", alpha=0.35 if image is not None else 1)
    for r in range(rows):
        for c in range(cols):
            ax.text(c + 0.5, r + 0.5, words[r][c], ha="center", va="center", fontsize=8, color="white",
                    bbox=dict(facecolor="black", alpha=0.5, pad=1, linewidth=0))
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title)
    return fig


def heatmap_over_image(image: np.ndarray | None, values, ax=None, title: str = "", cmap: str = "viridis",
                       vmin=None, vmax=None):
    """A (rows x cols) patch heatmap drawn over the image."""
    values = np.asarray(values)
    rows, cols = values.shape
    fig, ax = _axes(ax, (4, 4))
    if image is not None:
        ax.imshow(image, extent=(0, cols, rows, 0))
    im = ax.imshow(values, extent=(0, cols, rows, 0), cmap=cmap, alpha=0.6 if image is not None else 1,
                   vmin=vmin, vmax=vmax)
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title)
    return fig


def _axes(ax, size):
    if ax is not None:
        return ax.figure, ax
    fig, ax = plt.subplots(figsize=size)
    return fig, ax
