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
    from vlmscope.report import plots_features, plots_studies  # noqa: F401  (register their plots)

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


@plotter("concept_trace")
def concept_trace(r, ax=None):
    """Decodability through vision -> connector -> LM, parts shaded, the largest fall marked."""
    fig, ax = _axes(ax, (max(5, 0.3 * len(r.sites)), 3))
    x = np.arange(len(r.sites))
    colours = {"vision": "tab:blue", "connector": "tab:orange", "lm": "tab:green"}
    for part in dict.fromkeys(r.parts):
        idx = [i for i, p in enumerate(r.parts) if p == part]
        ax.axvspan(idx[0] - 0.5, idx[-1] + 0.5, color=colours.get(part, "grey"), alpha=0.08)
        ax.text(np.mean(idx), 1.03, part, ha="center", fontsize=8)
    ax.plot(x, r.score.numpy(), "o-", color="black", label=f"{r.target} probe")
    ax.plot(x, r.control_score.numpy(), "x--", color="grey", label="control task")
    k = r.sites.index(r.drop_after)
    if r.drop > 0:
        ax.annotate(f"-{r.drop:.2f}", (k + 0.5, float(r.score[k + 1])), color="red", fontsize=8)
    ax.set_xticks(x, [s.replace(".resid_post", "").replace("blocks.", "") for s in r.sites], rotation=70, fontsize=7)
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("test accuracy")
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    return fig


@plotter("patching")
def patching(r, ax=None):
    """Effect per component (rows) and position group (columns); clean = 1, corrupt = 0."""
    fig, ax = _axes(ax, (max(4, 0.25 * len(r.groups) + 2), max(2.5, 0.25 * len(r.components) + 1)))
    vals = r.effect.numpy()
    lim = max(1.0, float(np.nanmax(np.abs(vals)))) if np.isfinite(vals).any() else 1.0
    im = ax.imshow(vals, aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim)
    ax.set_yticks(range(len(r.components)), r.components, fontsize=7)
    step = max(1, len(r.groups) // 30)
    ax.set_xticks(range(0, len(r.groups), step), r.groups[::step], rotation=70, fontsize=7)
    fig.colorbar(im, ax=ax, label=f"normalised {r.metric}")
    ax.set_title(f"{'attribution' if r.approximate else 'activation'} patching ({r.direction})")
    fig.tight_layout()
    return fig


@plotter("knockout")
def knockout(r, ax=None):
    """Relative change of the metric when src->dst attention is blocked in each layer window."""
    fig, ax = _axes(ax, (5, 3))
    ax.bar(r.starts, r.relative.numpy(), color="tab:purple")
    ax.axhline(0, color="black", linewidth=0.5)
    ax.set_xlabel(f"first layer of the {r.window}-layer window")
    ax.set_ylabel(f"relative change in {r.metric}")
    ax.set_title(f"knockout {r.src} -> {r.dst}")
    fig.tight_layout()
    return fig


@plotter("over_training")
def over_training(r, ax=None, metrics=None):
    """Metrics against training step (log-spaced steps shown evenly), phase changes marked."""
    fig, ax = _axes(ax, (7, 3.5))
    names = list(metrics or r.metrics)
    x = np.arange(len(r.steps))
    for name in names:
        ax.plot(x, r.values[r.metrics.index(name)].numpy(), "o-", ms=3, label=name)
    for c in r.changes:
        if c["metric"] in names:
            ax.axvline(r.steps.index(c["step"]), color="grey", lw=0.5, ls=":")
    ax.set_xticks(x, [str(s) for s in r.steps], rotation=60, fontsize=7)
    ax.set_xlabel("training step")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=6, loc="lower right")
    ax.set_title(f"{r.model} over training (dotted: phase changes, jump >= {r.threshold})")
    fig.tight_layout()
    return fig


@plotter("task_accuracy")
def task_accuracy(r, ax=None):
    """Accuracy per question family."""
    fig, ax = _axes(ax, (5, 2.6))
    ax.bar(range(len(r.families)), r.accuracy.numpy(), color="tab:blue")
    ax.set_xticks(range(len(r.families)), list(r.families), fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy")
    ax.set_title(f"{r.model}: accuracy per family (n = {r.n})")
    fig.tight_layout()
    return fig


@plotter("comparison")
def comparison(r, ax=None):
    """Decodability by relative depth within each part, one line per model."""
    import pandas as pd

    fig, ax = _axes(ax, (7, 3))
    df = pd.DataFrame(list(r.records))
    df = df[df.part.notna()]
    offset = {"vision": 0.0, "connector": 1.1, "lm": 1.6}
    for (model, metric), sub in df.groupby(["model", "metric"]):
        xs = [offset.get(p, 0) + d for p, d in zip(sub.part, sub.depth)]
        ax.plot(xs, sub.value, "o-", label=f"{model}: {metric}")
    for part, x0 in offset.items():
        ax.text(x0 + 0.3, 1.03, part, fontsize=8)
    ax.set_xticks([])
    ax.set_ylim(0, 1.1)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def side_by_side(*results, size=(4, 3)):
    """Each result's own plot, in one row of panels."""
    fig, axes = plt.subplots(1, len(results), figsize=(size[0] * len(results), size[1]), squeeze=False)
    for r, ax in zip(results, axes[0]):
        r.plot(ax=ax)
    fig.tight_layout()
    return fig


def lens_kl(layers, curves: dict, ax=None):
    """KL(final || lens) per layer, one line per lens (e.g. logit vs tuned)."""
    fig, ax = _axes(ax, (5, 3))
    for (name, kl), style in zip(curves.items(), ("o-", "s-", "^-", "d-")):
        ax.plot(list(layers), np.asarray(kl), style, label=name)
    ax.set_xlabel("layer")
    ax.set_ylabel("KL(final || lens), nats")
    ax.legend()
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
                       vmin=None, vmax=None, colorbar: bool = True):
    """A (rows x cols) patch heatmap drawn over the image."""
    values = np.asarray(values)
    rows, cols = values.shape
    fig, ax = _axes(ax, (4, 4))
    if image is not None:
        ax.imshow(image, extent=(0, cols, rows, 0))
    im = ax.imshow(values, extent=(0, cols, rows, 0), cmap=cmap, alpha=0.6 if image is not None else 1,
                   vmin=vmin, vmax=vmax)
    if colorbar:
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
