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


# --- sparse autoencoders (vlmscope.methods.sae) -----------------------------------------------------


@plotter("sae_eval")
def sae_eval(r, ax=None):
    """Histogram of log10 latent firing frequency (dead latents counted at the left edge)."""
    fig, ax = _axes(ax, (5, 3))
    freq = r.frequency.double().numpy()
    floor = 1.0 / max(r.n_rows, 1)
    ax.hist(np.log10(np.clip(freq, floor / 10, None)), bins=40, color="tab:blue")
    ax.axvline(np.log10(floor / 10), color="grey", ls=":", label=f"dead ({r.dead_fraction:.1%})")
    ax.set_xlabel("log10 firing frequency")
    ax.set_ylabel("latents")
    ax.legend(fontsize=8)
    ax.set_title(f"{r.architecture} at {r.site}: L0 {r.l0:.1f}, EV {r.explained_variance:.3f}, "
                 f"loss rec. {r.loss_recovered:.3f}", fontsize=9)
    fig.tight_layout()
    return fig


@plotter("sae_comparison")
def sae_comparison(r, ax=None):
    """Explained variance and loss recovered per architecture, at (about) the same L0."""
    fig, ax = _axes(ax, (5, 3))
    x = np.arange(len(r.architectures))
    ax.bar(x - 0.2, r.explained_variance.numpy(), 0.4, label="explained variance")
    if not np.isnan(r.loss_recovered.numpy()).all():
        ax.bar(x + 0.2, r.loss_recovered.numpy(), 0.4, label="loss recovered")
    labels = [f"{a}\nL0 {l0:.1f}" for a, l0 in zip(r.architectures, r.l0.tolist(), strict=True)]
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8)
    ax.set_title(f"architectures at L0 ≈ {r.target_l0:g}")
    fig.tight_layout()
    return fig


@plotter("sae_features")
def sae_features(r, feature: int = 0, images=None):
    """One feature's page: its top examples' patch maps (over `images[row]` where given), its
    activation histogram, and the tokens its decoder direction promotes (LM sites)."""
    i = r.features.tolist().index(feature) if feature in r.features.tolist() else feature
    n = int((r.top_rows[i] >= 0).sum())
    fig, axes = plt.subplots(1, max(n, 1) + 1, figsize=(2.2 * (max(n, 1) + 1), 2.6))
    vmax = float(np.nanmax(r.patch_maps[i, :max(n, 1)].numpy())) if n else 1.0
    for j in range(n):
        image = images[int(r.top_rows[i, j])] if images is not None else None
        heatmap_over_image(image, r.patch_maps[i, j].numpy(), ax=axes[j], vmin=0, vmax=vmax or 1.0,
                           title=f"ex {int(r.top_examples[i, j])}: {float(r.top_values[i, j]):.2f}")
    ax = axes[-1]
    edges = r.hist_edges[i].numpy()
    ax.bar(edges[:-1], r.hist_counts[i].numpy(), width=np.diff(edges), align="edge")
    ax.set_xlabel("activation")
    title = f"feature {int(r.features[i])}, freq {float(r.frequency[i]):.2%}"
    if r.has_logit_effect:
        title += "\n+" + " ".join(str(int(t)) for t in r.logit_top_ids[i, :5])
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    return fig


def feature_grid(views, images, n_features: int = 8, top: int = 4):
    """A feature grid from `FeatureViews`: the n most frequent features (rows), each over its top
    examples (columns) with its activation at every patch drawn over `images[example]`; one
    colour scale per feature, from 0 to its largest activation shown."""
    order = views.frequency.argsort(descending=True, stable=True)[:n_features].tolist()
    top = min(top, views.top_values.shape[1])
    fig, axes = plt.subplots(len(order), top, figsize=(1.7 * top + 0.6, 1.7 * len(order)), squeeze=False)
    for r, i in enumerate(order):
        maps = views.patch_maps[i, :top].numpy()  # (top, grid_row, grid_col)
        vmax = float(np.nanmax(maps)) if np.isfinite(maps).any() else 0.0
        for j, ax in enumerate(axes[r]):
            example = int(views.top_examples[i, j])
            if example < 0:  # the feature fired in fewer than `top` examples
                ax.axis("off")
                continue
            heatmap_over_image(images[example], maps[j], ax=ax, cmap="inferno", vmin=0, vmax=vmax or 1.0,
                               colorbar=False, title=f"max {float(views.top_values[i, j]):.2f}")
            ax.title.set_fontsize(7)
        axes[r, 0].set_ylabel(f"feature {int(views.features[i])}\nfires {float(views.frequency[i]):.0%}",
                              fontsize=8)
    fig.suptitle(f"top scenes of the {len(order)} most frequent SAE features at {views.site}", fontsize=9)
    fig.tight_layout()
    return fig


@plotter("concept_f1")
def concept_f1(r, ax=None):
    """Best single-feature F1 per concept, with the goal line."""
    fig, ax = _axes(ax, (max(4, 0.5 * len(r.concepts)), 3))
    x = np.arange(len(r.concepts))
    colours = ["tab:green" if f >= r.goal else "tab:red" for f in r.best_f1.tolist()]
    ax.bar(x, r.best_f1.numpy(), color=colours)
    ax.axhline(r.goal, color="grey", ls="--", lw=1)
    ax.set_xticks(x, r.concepts, rotation=60, fontsize=8)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("best feature F1")
    fig.tight_layout()
    return fig


# --- automated explanation (vlmscope.methods.explain) -----------------------------------------------


@plotter("word_match")
def word_match(r, direction: int = 0, ax=None):
    """One direction's most aligned words by cosine."""
    fig, ax = _axes(ax, (4, 3))
    words = list(r.top_words[direction])[::-1]
    ax.barh(range(len(words)), r.top_cosine[direction].numpy()[::-1])
    ax.set_yticks(range(len(words)), words, fontsize=8)
    ax.set_xlabel(f"cosine with {r.matrix} embeddings")
    ax.set_title(r.labels[direction], fontsize=9)
    fig.tight_layout()
    return fig


@plotter("splice")
def splice(r, image: int = 0, k: int = 8, ax=None):
    """One image's largest SpLiCE concept weights."""
    fig, ax = _axes(ax, (4, 3))
    top = r.top(image, k)[::-1]
    ax.barh(range(len(top)), [w for _, w in top])
    ax.set_yticks(range(len(top)), [c for c, _ in top], fontsize=8)
    ax.set_xlabel("weight")
    ax.set_title(f"image {image}: cosine {float(r.cosine[image]):.2f}", fontsize=9)
    fig.tight_layout()
    return fig


@plotter("textspan")
def textspan(r, ax=None):
    """Cumulative explained variance per head, its first text as the label."""
    fig, ax = _axes(ax, (5, max(2.5, 0.3 * len(r.heads))))
    ax.imshow(r.explained.numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.set_yticks(range(len(r.heads)), [f"{h}: {t[0]}" for h, t in zip(r.heads, r.texts)], fontsize=7)
    ax.set_xlabel("texts chosen")
    ax.set_title("TEXTSPAN: explained variance per head", fontsize=9)
    fig.tight_layout()
    return fig


@plotter("head_ablation")
def head_ablation(r, ax=None):
    """Zero-shot accuracy drop per attribute for each group of mean-ablated heads."""
    fig, ax = _axes(ax, (5, 3))
    x = np.arange(len(r.attributes))
    groups = r.groups[1:]
    for i, g in enumerate(groups):
        ax.bar(x + (i - len(groups) / 2 + 0.5) * 0.8 / max(len(groups), 1), r.drop[i + 1].numpy(),
               0.8 / max(len(groups), 1), label=g)
    ax.set_xticks(x, r.attributes)
    ax.set_ylabel("accuracy drop")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


@plotter("deactivation")
def deactivation(r, ax=None):
    """Hit per (ablated target, evaluated group)."""
    fig, ax = _axes(ax, (4, 3))
    im = ax.imshow(r.hit.numpy(), cmap="Reds")
    ax.set_yticks(range(len(r.targets)), [f"{t} ({n})" for t, n in zip(r.targets, r.n_neurons)], fontsize=8)
    ax.set_xticks(range(len(r.groups)), r.groups, fontsize=8)
    ax.set_ylabel("neurons ablated")
    ax.set_xlabel("evaluated on")
    fig.colorbar(im, ax=ax, label=r.metric)
    fig.tight_layout()
    return fig


@plotter("dissection")
def dissection(r, ax=None):
    """IoU of each feature with each concept."""
    fig, ax = _axes(ax, (max(5, 0.25 * len(r.concepts)), max(2.5, 0.25 * len(r.features))))
    im = ax.imshow(r.iou.numpy(), aspect="auto", cmap="magma", vmin=0)
    ax.set_xticks(range(len(r.concepts)), r.concepts, rotation=70, fontsize=7)
    ax.set_yticks(range(len(r.features)), r.features, fontsize=7)
    fig.colorbar(im, ax=ax, label="IoU")
    fig.tight_layout()
    return fig


@plotter("verification")
def verification(r, ax=None):
    """Firing rate per value of the varied attribute; the explained value in orange."""
    fig, ax = _axes(ax, (max(4, 0.5 * len(r.values)), 3))
    explained = r.explanation.split("=")[1]
    ax.bar(range(len(r.values)), r.fire_rate.numpy(),
           color=["tab:orange" if v == explained else "tab:blue" for v in r.values])
    ax.set_xticks(range(len(r.values)), r.values, rotation=45, fontsize=8)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("fires")
    ax.set_title(f"{r.feature}: {r.explanation} {r.verdict}", fontsize=9)
    fig.tight_layout()
    return fig


@plotter("explained_features")
def explained_features(r, ax=None):
    """Best dissection IoU against simulation correlation, coloured by verdict."""
    fig, ax = _axes(ax, (4.5, 3.5))
    colours = {"holds": "tab:green", "too broad": "tab:orange", "too narrow": "tab:purple", "does not hold": "tab:red"}
    for v, c in colours.items():
        idx = [i for i, x in enumerate(r.verdicts) if x == v]
        if idx:
            ax.scatter(r.iou[idx].numpy(), r.correlation[idx].numpy(), color=c, label=v, s=14)
    ax.set_xlabel("best IoU")
    ax.set_ylabel("simulation correlation")
    ax.legend(fontsize=7)
    ax.set_title(f"{r.site}: agreement {r.agreement:.2f}", fontsize=9)
    fig.tight_layout()
    return fig
