"""Figures for sparse-autoencoder and explanation results (registered in plots.py's table)."""

from __future__ import annotations

import textwrap

import numpy as np

from vlmscope.report.plots import _axes, heatmap_over_image, plotter, plt

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


@plotter("sae_restarts")
def sae_restarts(r, ax=None):
    """Held-out FVU per restart; the kept one (the lowest) highlighted."""
    fig, ax = _axes(ax, (max(4, 0.5 * len(r.names)), 3))
    x = np.arange(len(r.names))
    ax.bar(x, r.fvu.numpy(), color=["tab:green" if i == r.chosen else "tab:grey" for i in x])
    ax.set_xticks(x, [n.rsplit("-", 1)[-1] for n in r.names], fontsize=8)
    ax.set_ylabel("held-out FVU")
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


@plotter("attribute_heads")
def attribute_heads(r, ax=None):
    """Share of each named attribute's zero-shot evidence removed by ablating each attribute's TEXTSPAN
    heads, directly (left) and in total (right); attributes the text tower cannot tell apart have no
    evidence to remove and are left out."""
    fig, axes = plt.subplots(1, len(r.modes), figsize=(3.6 * len(r.modes) + 1, 2.8), squeeze=False)
    cols = [r.attributes.index(a) for a in r.named]
    drop = r.evidence_drop[:, 1:][..., cols]  # (mode, group, named)
    for m, (mode, a) in enumerate(zip(r.modes, axes[0])):
        im = a.imshow(drop[m].numpy(), cmap="Reds", vmin=0, vmax=1, aspect="auto")
        for (i, j), v in np.ndenumerate(drop[m].numpy()):
            a.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8)
        a.set_yticks(range(len(r.groups) - 1), [f"{g} heads" for g in r.groups[1:]] if m == 0 else [], fontsize=8)
        a.set_xticks(range(len(cols)), list(r.named), fontsize=8)
        a.set_title(f"{mode} ablation: evidence removed", fontsize=9)
    fig.colorbar(im, ax=axes[0].tolist())
    return fig


@plotter("patchscope_accuracy")
def patchscope_accuracy(r, ax=None):
    """Answer accuracy per site with an image token's state written into a blank image; dashed: chance."""
    fig, ax = _axes(ax, (5, 3))
    for i, q in enumerate(r.questions):
        line = ax.plot(range(len(r.sites)), r.accuracy[i].numpy(), "o-", label=f"{q} question")[0]
        ax.axhline(float(r.chance[i]), ls="--", color=line.get_color(), lw=0.8)
    ax.set_xticks(range(len(r.sites)), [s.replace(".resid_post", "") for s in r.sites], rotation=30, fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("answer accuracy")
    ax.legend(fontsize=8)
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
    """Firing rate per value of the varied attribute (per group of patches for a formula); the values
    the explanation names in orange."""
    fig, ax = _axes(ax, (max(4, 0.5 * len(r.values)), 3))
    ax.bar(range(len(r.values)), r.fire_rate.numpy(),
           color=["tab:orange" if e else "tab:blue" for e in r.explained.tolist()])
    ax.set_xticks(range(len(r.values)), r.values, rotation=45, fontsize=8)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("fires")
    ax.set_title(f"{r.feature}: {r.explanation} {r.verdict}", fontsize=9)
    fig.tight_layout()
    return fig


VERDICT_COLOURS = {"holds": "tab:green", "too broad": "tab:orange", "too narrow": "tab:purple",
                   "does not hold": "tab:red"}


@plotter("refinement")
def refinement(r, ax=None):
    """The explanation of each round, top to bottom, coloured by its verdict on fresh scenes."""
    fig, ax = _axes(ax, (8, 0.8 + 0.45 * len(r.explanations)))
    ax.axis("off")
    n = len(r.explanations)
    for i, (e, v, q) in enumerate(zip(r.explanations, r.verdicts, r.ratios)):
        text = textwrap.shorten(e, 110, placeholder=" ...")
        ax.text(0, 1 - (i + 0.5) / n, f"{i}. {text}  [{v}, above {q:g} of its peak]",
                color=VERDICT_COLOURS.get(v, "black"), fontsize=8, va="center", transform=ax.transAxes)
    ax.set_title(f"{r.feature}: {r.stopped}", fontsize=9)
    fig.tight_layout()
    return fig


@plotter("explained_features")
def explained_features(r, ax=None):
    """Best dissection IoU against simulation correlation, coloured by verdict."""
    fig, ax = _axes(ax, (4.5, 3.5))
    for v, c in VERDICT_COLOURS.items():
        idx = [i for i, x in enumerate(r.verdicts) if x == v]
        if idx:
            ax.scatter(r.iou[idx].numpy(), r.correlation[idx].numpy(), color=c, label=v, s=14)
    ax.set_xlabel("best IoU")
    ax.set_ylabel("simulation correlation")
    ax.legend(fontsize=7)
    ax.set_title(f"{r.site}: agreement {r.agreement:.2f}", fontsize=9)
    fig.tight_layout()
    return fig


@plotter("tuning_curves")
def tuning_curves(r, features=None, ax=None):
    """One row of bar charts per feature (`features`: their indices, default all), one panel per
    attribute: the mean response to each value, titled with the attribute's share of the variance."""
    from vlmscope.methods.explain.concepts import VALUES

    rows = list(range(len(r.features))) if features is None else list(features)
    fig, axes = plt.subplots(len(rows), len(r.attributes), squeeze=False,
                             figsize=(2.2 * len(r.attributes), 1.8 * len(rows)))
    for k, i in enumerate(rows):
        for j, a in enumerate(r.attributes):
            ax = axes[k, j]
            ax.bar(range(len(VALUES[a])), r.curve(i, a).numpy(), color="tab:blue")
            ax.set_xticks(range(len(VALUES[a])), VALUES[a], rotation=90, fontsize=6)
            ax.set_title(f"{a} {float(r.share[i, j]):.0%}", fontsize=7)
            ax.tick_params(axis="y", labelsize=6)
        axes[k, 0].set_ylabel(r.features[i], fontsize=7)
    fig.tight_layout()
    return fig


@plotter("tuning_verification")
def tuning_verification(r, ax=None):
    """Each tuning explanation, coloured by its verdict on fresh scenes."""
    fig, ax = _axes(ax, (9, 0.8 + 0.3 * len(r.features)))
    ax.axis("off")
    n = max(len(r.features), 1)
    colours = {"holds": "tab:green", "incomplete": "tab:purple", "does not hold": "tab:red"}
    for i, (f, e, v) in enumerate(zip(r.features, r.explanations, r.verdicts)):
        text = textwrap.shorten(e or "(no attribute matters)", 120, placeholder=" ...")
        ax.text(0, 1 - (i + 0.5) / n, f"{f}: {text}  [{v}]", color=colours.get(v, "black"), fontsize=7,
                va="center", transform=ax.transAxes)
    held = sum(v == "holds" for v in r.verdicts)
    ax.set_title(f"tuning curves: {held} of {len(r.verdicts)} hold on fresh scenes", fontsize=9)
    fig.tight_layout()
    return fig


def tuning_grid(views: dict, feature: str = "feature"):
    """`tuning.tuning_views` drawn: one row per attribute, one column per value, the feature's map over
    each controlled image on one colour scale, titled with the value and the feature's largest response."""
    from vlmscope.data import render
    from vlmscope.methods.explain.verdicts import trait

    cols = max(len(scenes) for scenes, _ in views.values())
    vmax = max(float(maps.max()) for _, maps in views.values()) or 1.0
    fig, axes = plt.subplots(len(views), cols, squeeze=False, figsize=(1.6 * cols, 1.75 * len(views)))
    for r, (a, (scenes, maps)) in enumerate(views.items()):
        for j, ax in enumerate(axes[r]):
            if j >= len(scenes):
                ax.axis("off")
                continue
            heatmap_over_image(render(scenes[j]), maps[j].numpy(), ax=ax, cmap="inferno", vmin=0, vmax=vmax,
                               colorbar=False, title=f"{trait(scenes[j], a)} {float(maps[j].max()):.2f}")
            ax.title.set_fontsize(7)
        axes[r, 0].set_ylabel(a, fontsize=8)
    fig.suptitle(f"{feature}: its preferred scene, one attribute varied at a time", fontsize=9)
    fig.tight_layout()
    return fig
