"""Figures for studies across models: micro (what parts represent) against macro (task accuracy)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from vlmscope.report.plots import plotter


@plotter("micro_macro")
def micro_macro(r):
    """Left: accuracy per family, one bar per model. Right: scene decodability per concept at the end
    of each part (vision -> connector -> LM), one line style per model."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.4), gridspec_kw={"width_ratios": [1.3, 1]})
    width = 0.8 / len(r.models)
    x = np.arange(len(r.families))
    for i, m in enumerate(r.models):
        left.bar(x + i * width, r.accuracy[i].numpy(), width, label=m)
    left.set_xticks(x + width * (len(r.models) - 1) / 2, list(r.families), fontsize=8)
    left.set_ylim(0, 1.05)
    left.set_ylabel("accuracy")
    left.legend(fontsize=7, loc="lower left")
    left.set_title("macro: accuracy per family", fontsize=9)
    styles = ["o-", "s--", "^:", "d-."]
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, m in enumerate(r.models):
        for k, c in enumerate(r.concepts):
            right.plot(range(len(r.parts)), r.decodability[i, k].numpy(), styles[i % len(styles)],
                       color=colours[k % len(colours)], label=f"{m}: {c}")
    right.set_xticks(range(len(r.parts)), list(r.parts))
    right.set_ylim(0, 1.05)
    right.set_ylabel("scene probe accuracy")
    right.legend(fontsize=6, loc="lower left")
    right.set_title("micro: what is at each cell, end of each part", fontsize=9)
    fig.tight_layout()
    return fig
