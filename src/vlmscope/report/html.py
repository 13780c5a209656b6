"""The report: one self-contained HTML page (figures inlined, no network) built from a results
folder alone — a section per method family, a reading of what its numbers show, and a
ground-truth scorecard saying which methods can be trusted on this model."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from jinja2 import Environment

from vlmscope import __version__

TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>vlmscope report — {{ model }}</title>
<style>
body { font-family: system-ui, sans-serif; max-width: 980px; margin: 2em auto; color: #222; line-height: 1.45 }
h1 { margin-bottom: 0 } .sub { color: #666; margin-top: .2em }
table { border-collapse: collapse; width: 100%; margin: 1em 0 } td, th { border-bottom: 1px solid #ddd; padding: 4px 8px; text-align: left }
td.num { text-align: right; font-variant-numeric: tabular-nums } .ok { color: #1a7f37 } .weak { color: #b35900 } .bad { color: #c62828 }
figure { display: inline-block; margin: .5em; vertical-align: top } figure img { max-width: 440px; border: 1px solid #eee }
figcaption { font-size: .85em; color: #555; max-width: 440px } section { margin-top: 2.2em }
.reading { background: #f6f8fa; padding: .8em 1em; border-left: 3px solid #888 }
</style></head><body>
<h1>vlmscope report</h1>
<p class="sub">model <b>{{ model }}</b> · seed {{ seed }} · {{ seconds }} s · vlmscope {{ version }}</p>
{% if scorecard %}<h2 id="scorecard">Ground-truth scorecard</h2>
<p>Each method is checked against what the shapes world knows to be true. A method that passes its
check on this model can be trusted to localise or decode this kind of fact; one that fails cannot.</p>
<table><tr><th>family</th><th>check</th><th>score</th><th>bar</th><th>verdict</th></tr>
{% for row in scorecard %}<tr><td>{{ row.family }}</td><td>{{ row.check }}</td><td class="num">{{ row.value }}</td>
<td class="num">{{ row.bar }}</td><td class="{{ row.css }}">{{ row.verdict }}</td></tr>
{% endfor %}</table>{% endif %}
{% for s in sections %}<section id="{{ s.key }}"><h2>{{ s.title }}</h2>
<p class="reading">{{ s.reading }}</p>
{% for f in s.figures %}<figure><img alt="{{ f.caption }}" src="data:image/png;base64,{{ f.data }}"><figcaption>{{ f.caption }}</figcaption></figure>{% endfor %}
</section>{% endfor %}
</body></html>
"""

CAPTIONS = {
    "figure-trace.png": "Probe accuracy at every site, vision → connector → LM (image tokens); grey: control task.",
    "figure-patch-grid.png": "Per-patch probes at the last vision block: test accuracy at each patch location.",
    "figure-entropy.png": "Entropy of the logit lens per layer and token role.",
    "figure-patch-words.png": "The logit lens's top word at each image patch, drawn over the image.",
    "figure-sweep.png": "Effect of patching each (layer, image patch); clean = 1, corrupt = 0.",
    "figure-windows.png": "Change in the answer's logit when image→last attention is blocked in a layer window.",
    "figure-tuned-kl.png": "KL divergence from the final layer's distribution, logit lens vs tuned lens (held-out "
                           "scenes).",
    "figure-verification.png": "SAE features labelled by dissection (IoU with concept masks) and the verdict of the "
                               "verification loop on controlled scenes.",
    "figure-tuning.png": "Tuning curves of SAE features no dissection label explains but whose curves hold: the mean "
                         "response to each value of each attribute around the scenes the feature prefers; titles give "
                         "the attribute's share of the variance.",
    "figure-tuning-grid.png": "The first of them as images: its preferred scene varied one attribute at a time, the "
                              "feature's activation at each patch drawn over each image.",
    "figure-word-match.png": "Answer words each MLP neuron of the last LM block writes, by cosine with the unembedding.",
    "figure-textspan-ablation.png": "shapes-clip: share of each attribute's zero-shot evidence removed by mean-ablating "
                                    "each attribute's TEXTSPAN heads, directly and in total.",
    "figure-domain-deactivation.png": "Relative hidden change at background patches (first vision block) on each "
                                      "domain with each domain's neurons held below their firing threshold.",
    "figure-modality-deactivation.png": "Relative hidden change at image and text tokens (first LM block) with the "
                                        "image- or text-specific neurons zeroed.",
    "figure-patchscope.png": "Answer accuracy with an object's image-token state (read at each LM site) written "
                             "into a blank image at another patch; dashed: chance.",
    "figure-feature-grid.png": "The most frequent SAE features (rows) on their top 4 scenes (columns): the "
                               "feature's activation at each patch drawn over the scene (dark: 0).",
    "figure-concept-f1.png": "For each colour and shape, the F1 of the single SAE feature that best detects "
                             "patches of objects with it.",
}


def _fmt(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) else html.escape(str(v))


def _figures(folder: Path) -> list[dict]:
    out = []
    for png in sorted(folder.glob("*.png")):
        caption = f"{folder.name}: " + CAPTIONS.get(png.name, png.stem.replace("-", " "))
        out.append({"caption": caption, "data": base64.b64encode(png.read_bytes()).decode()})
    return out


ALIASES = {"patching": ("patching", "patch")}  # demo folder names, then experiment-file names


def _scores(root: Path, name: str) -> dict:
    for folder in ALIASES.get(name, (name,)):
        f = root / folder / "scores.json"
        if f.exists():
            return json.loads(f.read_text())
    return {}


def _row(family, check, value, bar, higher=True):
    if value is None or value != value:
        return {"family": family, "check": check, "value": "n/a", "bar": _fmt(bar), "verdict": "not run",
                "css": "weak"}
    ok = value >= bar if higher else value <= bar
    return {"family": family, "check": check, "value": _fmt(float(value)), "bar": ("≥ " if higher else "≤ ") + _fmt(bar),
            "verdict": "trustworthy here" if ok else "fails its check", "css": "ok" if ok else "bad"}


def scorecard(root: Path) -> list[dict]:
    rows = []
    colour = _scores(root, "probe-colour")
    vision = next((v for k, v in colour.items() if k.startswith("probe colour at vision")), None)
    rows.append(_row("probing", "colour of the object at a patch, last vision block", vision, 0.95))
    cell = _scores(root, "probe-cell")
    conn = cell.get("probe cell at connector.out")
    rows.append(_row("probing", "object's grid cell at the connector output", conn, 0.9))
    lens = _scores(root, "lens")
    hit = lens.get("lens: object patch names its object (best layer)")
    base = lens.get("lens: background baseline at that layer")
    rows.append(_row("logit lens", "object patches name their object's word, above the background rate",
                     None if hit is None else hit - (base or 0), 0.05))
    patch = _scores(root, "patching")
    rows.append(_row("activation patching", "SIP: top patches at the first LM layer are the changed object's",
                     patch.get("SIP top-patch precision, first layer"), 0.8))
    atp = _scores(root, "atp")
    rows.append(_row("activation patching", "attribution patching agrees with exact patching (Pearson r)",
                     atp.get("AtP vs exact, Pearson r"), 0.9))
    ko = _scores(root, "knockout")
    gap = ko.get("accuracy, image->text blocked in the window", float("nan")) - \
        ko.get("chance (majority answer per family)", float("nan"))
    rows.append(_row("attention knockout", "blocking image→text in the flow window drops accuracy to chance "
                     "(accuracy − chance)", gap if ko else None, 0.05, higher=False))
    for key, family, label, bar in (
            ("sae", "sparse autoencoders", "best SAE feature F1 for colour concepts (mean)", 0.8),
            ("explain", "automated explanation", "dissection labels that the verification loop confirms", 0.8)):
        s = _scores(root, key)
        if s:
            rows.append(_row(family, label, s.get("score"), bar))
    sp = _scores(root, "explain")
    if "SpLiCE precision (colour and shape words)" in sp:
        rows.append(_row("automated explanation", "SpLiCE on shapes-clip: precision of colour/shape words",
                         sp["SpLiCE precision (colour and shape words)"], 0.9))
        rows.append(_row("automated explanation", "SpLiCE on shapes-clip: recall of colour/shape words",
                         sp["SpLiCE recall (colour and shape words)"], 0.9))
    rows += _explain_rows(sp)
    return rows


def _domains_without_neurons(sc: dict, prefix: str = "") -> list[str]:
    """The domains `zoo_domain_neurons` found no neuron specific to (keys prefixed `prefix`)."""
    lead = f"{prefix}neurons specific to "
    return [k[len(lead):] for k, v in sc.items() if k.startswith(lead) and v == 0]


def _domain_groups_text(sc: dict, prefix: str = "") -> str:
    """One sentence on `zoo_domain_neurons`' scores (keys prefixed `prefix`): the neuron groups, the
    hit on their own domains vs the others, and the domains no neuron is specific to."""
    end = " neurons: own/other hit, the block where it is largest"
    groups = [g for k in sc if k.startswith(prefix) and k.endswith(end)
              and ":" not in (g := k[len(prefix):-len(end)])]  # not another model's (prefixed) groups
    parts = [f"{g} ({sc.get(f'{prefix}{g} neurons', 0)} neurons) {sc[f'{prefix}{g}{end}']:.1f}×" for g in groups]
    none = _domains_without_neurons(sc, prefix)
    text = (f"the lowest entropy over domains is {sc[f'{prefix}lowest domain entropy (uniform: ln 3 = 1.10)']:.2f} "
            "(uniform 1.10). Held below their firing threshold, the neurons specific to "
            + ("; ".join(parts) or "no domain") + " hit their own domains vs the others by that much (at the "
            "vision block where the effect is largest).")
    if none:
        text += (f" No neuron is specific to {', '.join(none)}: the most {none[0]}-specific has entropy "
                 f"{sc.get(f'{prefix}lowest entropy of a neuron firing most on {none[0]}', float('nan')):.2f}.")
    return text


def _explain_rows(sp: dict) -> list[dict]:
    """Scorecard rows of TEXTSPAN, domain and modality neurons and Patchscopes (where they ran)."""
    rows = []
    if "TEXTSPAN: colour, shape, position with confirmed heads" in sp:
        rows.append(_row("automated explanation", "TEXTSPAN on shapes-clip: colour, shape and position each have "
                         "heads whose ablation takes ≥ 1.5× more of their own attribute (count)",
                         sp["TEXTSPAN: colour, shape, position with confirmed heads"], 3))
    weakest = "weakest own/other hit over the neuron groups, the block where it is largest"
    for prefix, model in (("", "shapes-llava"), ("shapes-clip: ", "shapes-clip")):
        if prefix + weakest in sp:
            none = _domains_without_neurons(sp, prefix)
            rows.append(_row("automated explanation", f"domain-specific neurons (MMNeuron) of {model}: deactivating "
                             "each group hits its own domains ≥ 2× the others (vision block where largest, weakest "
                             "group" + (f"; no neuron is specific to {', '.join(none)}" if none else "") + ")",
                             sp[prefix + weakest], 2.0))
    mod = [sp.get(f"{m} neurons: own/other hit, first block") for m in ("image", "text")]
    if all(h is not None for h in mod):
        rows.append(_row("automated explanation", "modality-specific neurons (MINER): deactivation hits the "
                         "targeted modality ≥ 2× the other (first LM block, weaker modality)", min(mod), 2.0))
    ps = [sp.get(f"patchscope {q}: accuracy at lm.blocks.0.resid_post") for q in ("colour", "shape")]
    if all(v is not None for v in ps):
        rows.append(_row("automated explanation", "Patchscopes: an image token's first-block state, moved into "
                         "a blank image, answers its object's colour and shape (lower accuracy)", min(ps), 0.9))
    return rows


def _reading(key: str, root: Path) -> str:
    key = {"patch": "patching", "knockout": "patching"}.get(key, "probing" if key.startswith("probe") else key)
    if key == "probing":
        c, s, cell = _scores(root, "probe-colour"), _scores(root, "probe-shape"), _scores(root, "probe-cell")
        parts = []
        for name, sc in (("colour", c), ("shape", s), ("grid cell", cell)):
            vis = next((v for k, v in sc.items() if k.startswith("probe") and "vision" in k), float("nan"))
            con = next((v for k, v in sc.items() if k.endswith("connector.out")), float("nan"))
            drop = next((v for k, v in sc.items() if k.startswith("largest drop")), float("nan"))
            parts.append(f"{name} is decodable at {vis:.0%} from the last vision block and {con:.0%} at the "
                         f"connector output (largest fall along the way: {drop:.0%})")
        return "Linear probes on image-patch activations: " + "; ".join(parts) + ". A fall at the connector " \
            "would mean the projector discards what the tower saw; a flat curve means the fact reaches the LM."
    if key == "lens":
        sc = _scores(root, "lens")
        hit, base = sc.get("object patch names its object", []), sc.get("background patch names a scene object", [])
        by_layer = ", ".join(f"L{i}: {h:.0%} vs {b:.0%}" for i, (h, b) in enumerate(zip(hit, base)))
        return ("The logit lens read at image tokens: how often an object's patch names that object's colour or "
                f"shape, against how often a background patch names any object of its scene — {by_layer}. "
                "Where the first number clearly exceeds the second, image tokens already carry words for what "
                f"they show (Neo et al. 2024). The tuned lens (Belrose et al. 2023) lowers the mean KL to the final "
                f"layer from {sc.get('logit lens: mean KL to the final layer', float('nan')):.2f} to "
                f"{sc.get('tuned lens: mean KL to the final layer', float('nan')):.2f} nats.")
    if key == "patching":
        sc, ko, atp = _scores(root, "patching"), _scores(root, "knockout"), _scores(root, "atp")
        prec = {k.split(" at ")[-1]: v for k, v in sc.items() if k.startswith("SIP top-patch precision at")}
        text = ", ".join(f"{k.replace('.resid_post', '')}: {v:.0%}" for k, v in prec.items())
        windows = {k.split("layers ")[-1]: v for k, v in ko.items() if "blocked in layers" in k}
        wtext = ", ".join(f"layers {k}: {v:.0%}" for k, v in windows.items())
        return (f"Semantic image pairs change one object. Denoising each (layer, patch) shows where the answer's "
                f"information sits: the share of the top patches that belong to the changed object is {text} "
                f"(chance {sc.get('changed-patch fraction (chance)', float('nan')):.0%}). Attribution patching tracks "
                f"the exact sweep with r = {atp.get('AtP vs exact, Pearson r', float('nan')):.2f}. Blocking attention "
                f"from the image to the last token: accuracy {ko.get('accuracy', float('nan')):.0%} normally, "
                f"{ko.get('accuracy, image->last blocked in all layers', float('nan')):.0%} with every layer blocked, "
                f"and per single layer {wtext} — the layers whose blocking hurts are where the image flows into "
                f"the answer. Blocking image→text attention in layers {ko.get('flow window start', '?')}–"
                f"{ko.get('flow window end', '?')} alone drops accuracy to "
                f"{ko.get('accuracy, image->text blocked in the window', float('nan')):.0%} (chance "
                f"{ko.get('chance (majority answer per family)', float('nan')):.0%}); blocking it everywhere else "
                f"leaves {ko.get('accuracy, image->text blocked outside the window', float('nan')):.0%}.")
    if key == "explain":
        sc = _scores(root, "explain")
        return (f"SAE features explained three ways. Dissection (Bau et al. 2017) labels each frequent feature with the "
                f"formula of up to {int(sc.get('longest formula (concepts)', 1))} concepts (Mu & Andreas 2020: AND, "
                f"OR, AND NOT) whose patch mask its activation map overlaps most "
                f"({int(sc.get('features examined', 0))} examined, {int(sc.get('features labelled', 0))} labelled at "
                f"IoU ≥ {sc.get('labelling bar (IoU)', float('nan')):.2f}, "
                f"{int(sc.get('labels joining several concepts', 0))} of them formulas; mean best IoU "
                f"{sc.get('mean best IoU', float('nan')):.2f} against "
                f"{sc.get('mean best single-concept IoU', float('nan')):.2f} for one concept); simulation (Bills et al. 2023) predicts activations "
                f"from the label alone (mean correlation {sc.get('mean simulation correlation', float('nan')):.2f}); "
                f"the verification loop then renders controlled scenes varying the attributes a label names "
                f"(a formula is read patch by patch): "
                f"{int(sc.get('verdict: holds', 0))} labels hold, {int(sc.get('verdict: too broad', 0))} too "
                f"broad, {int(sc.get('verdict: too narrow', 0))} too narrow, "
                f"{int(sc.get('verdict: does not hold', 0))} do not hold — agreement "
                f"{sc.get('dissection / verification agreement', float('nan')):.2f} over labelled features, "
                f"{sc.get('agreement over all examined features', float('nan')):.2f} over all examined; "
                f"{int(sc.get('labels naming a position (patch, row or column)', 0))} labels name a patch, row or "
                "column, which many features track whatever the patch shows). Word matching reads which "
                "answer words the last block's neurons write into the unembedding. SpLiCE (Bhalla et al. 2024) on "
                "shapes-clip decomposes single-object images over the world's words plus distractors: precision "
                f"{sc.get('SpLiCE precision (colour and shape words)', float('nan')):.2f} and recall "
                f"{sc.get('SpLiCE recall (colour and shape words)', float('nan')):.2f} for the object's colour and "
                "shape." + _explain_reading(sc))
    if key == "sae":
        sc = _scores(root, "sae")
        return (f"A TopK sparse autoencoder trained on {sc.get('site', 'the vision tower')} at image patches. For each "
                f"colour, the "
                f"best single feature detects the patches of objects of that colour with mean F1 "
                f"{sc.get('mean best-feature F1, colours', float('nan')):.2f} ({sc.get('colours with F1 >= 0.8', 0)} of 6 "
                f"colours at F1 ≥ 0.8); for shapes the mean is {sc.get('mean best-feature F1, shapes', float('nan')):.2f} "
                f"({sc.get('shapes with F1 >= 0.8', 0)} of 5). No single feature captures: "
                f"{sc.get('concepts no feature captures (F1 < 0.8)', '?') or 'none'}. This is the demo's quick SAE "
                "(top-k 4, 1,500 scenes, 800 steps). A longer recipe captures all six colours on 4 of 6 seeds with 64 "
                "latents and 5 of 6 with 48: connector.out, whitened, top-k 6, the best of 8 restarts by held-out error "
                "(grounded.sae_concepts(..., restarts=8); docs/sae.md).")
    return ""


def _explain_reading(sc: dict) -> str:
    """The TEXTSPAN, neuron and Patchscopes part of the explanation stage's reading."""
    nan = float("nan")
    text = ""
    if "TEXTSPAN: colour heads" in sc:
        from vlmscope.methods.explain.zoo_textspan import VALUES

        attrs = tuple(VALUES)
        named = "; ".join(f"{a} {sc[f'TEXTSPAN: {a} heads']}" for a in attrs if f"TEXTSPAN: {a} heads" in sc)

        def drop(a: str, mode: str) -> str | None:
            own, other = (sc.get(f"TEXTSPAN {a} heads, {mode} ablation: {w} evidence drop") for w in ("own", "other"))
            return None if own is None or other is None else f"{a} {own:.0%} vs {other:.0%} ({mode})"

        drops = [d for a in attrs if (d := drop(a, "direct") or drop(a, "total"))]
        unnamed = [a for a in attrs if sc.get(f"TEXTSPAN: {a} heads") == "none"
                   and sc.get(f"TEXTSPAN: zero-shot {a} accuracy", 0) > 0.5]
        text += (f" TEXTSPAN (Gandelsman et al. 2024) names shapes-clip's vision heads by the texts that explain "
                 f"their variance: {named}. Mean-ablating each attribute's heads removes this share of its own "
                 f"zero-shot evidence vs the other attributes': {', '.join(drops) or 'no head named'}.")
        if unnamed:
            text += (f" {', '.join(unnamed).capitalize()} {'is' if len(unnamed) == 1 else 'are'} answered zero-shot "
                     f"(≥ {min(sc[f'TEXTSPAN: zero-shot {a} accuracy'] for a in unnamed):.2f}) but no single head "
                     "is named for it.")
            where = [f"{a} {sc[k]:.0%}, its largest writer {sc.get(f'TEXTSPAN: {a} evidence, largest direct writer')}"
                     for a in unnamed if (k := f"TEXTSPAN: {a} evidence written directly by MLPs") in sc]
            if where:
                text += (" The share of its direct zero-shot evidence that the MLPs write, not the heads: "
                         + ", ".join(where) + ".")
            causal = [f"{a}: {sc[k]}" for a in unnamed
                      if (k := f"TEXTSPAN: {a}, the head whose ablation alone removes most evidence") in sc]
            if causal:
                text += (" Ablating one head at a time, the head it depends on most (share of its evidence removed; "
                         "what TEXTSPAN names it): " + "; ".join(causal) + ".")
    for prefix, lead in (("", " Domain-specific neurons (MMNeuron, Huo et al. 2024) at background patches of the "
                              "vision tower"), ("shapes-clip: ", " On shapes-clip, whose texts name the background")):
        if f"{prefix}lowest domain entropy (uniform: ln 3 = 1.10)" in sc:
            text += lead + ": " + _domain_groups_text(sc, prefix)
    if "image neurons: own/other hit, first block" in sc:
        text += (" Modality-specific LM neurons (MINER, Huang et al. 2024): "
                 f"{sc.get('image neurons in the first block', nan):.0%} of the image neurons sit in the first "
                 f"block; zeroing them changes image tokens {sc['image neurons: own/other hit, first block']:.1f}× "
                 f"as much as text tokens there, but "
                 f"{sc.get('image neurons: own/other hit, last block', nan):.1f}× by the last block, once the image "
                 f"has flowed into the text; text neurons: "
                 f"{sc.get('text neurons: own/other hit, first block', nan):.0f}× and "
                 f"{sc.get('text neurons: own/other hit, last block', nan):.0f}×.")
    if "tuning explanations that hold" in sc:
        text += (" Tuning curves describe the same latents by degree, as a neuron's tuning: around the scenes each "
                 "prefers, one attribute varied at a time, the attributes that move it and each value's level "
                 "(\"colour: red 1.00 > orange 0.82 > ...\"). "
                 f"{int(sc['tuning explanations that hold'])} of {int(sc.get('features tuned', 0))} replicate on "
                 f"fresh scenes, {int(sc.get('examined: tuning curves hold where no label does', 0))} of them where "
                 "no label holds: a label or the curves explain "
                 f"{sc.get('share of examined explained either way', nan):.2f} of the examined latents (simulation "
                 f"correlation, median {sc.get('median simulation correlation (tuning)', nan):.2f}).")
    if "LM image tokens: labels naming what earlier image tokens show" in sc:
        lm = {k.removeprefix("LM image tokens: "): v for k, v in sc.items() if k.startswith("LM image tokens: ")}
        text += (f" At the language model's image tokens ({lm.get('site', '?')}), an SAE of the same recipe: "
                 f"{int(lm.get('features labelled', 0))} of {int(lm.get('features examined', 0))} latents labelled, "
                 f"{int(lm.get('verdict: holds', 0))} hold ({lm.get('agreement over all examined features', nan):.2f} "
                 f"of all examined). {int(lm['labels naming what earlier image tokens show'])} labels need the "
                 "concepts of what earlier image tokens show (the LM reads the image row by row, each token "
                 f"attending to those before it), and {int(lm.get('of those, labels that hold', 0))} of them hold"
                 + (f", e.g. {lm['best-fitting such label that holds']}" if "best-fitting such label that holds" in lm
                    else "") + ": the LM's state at a patch carries the objects read before it.")
    if "patchscope colour: blank image" in sc:
        last = [k for k in sc if k.startswith("patchscope colour: accuracy at lm.blocks.")][-1]
        text += (" Patchscopes (Ghandeharioun et al. 2024): an object's image-token state moved into a blank image "
                 "at another patch answers its colour with accuracy "
                 f"{sc.get('patchscope colour: accuracy at lm.blocks.0.resid_post', nan):.2f} from the first LM "
                 f"block and {sc[last]:.2f} from the last "
                 f"(blank image {sc['patchscope colour: blank image']:.2f}, chance "
                 f"{sc.get('patchscope colour: chance', nan):.2f}); shape "
                 f"{sc.get('patchscope shape: accuracy at lm.blocks.0.resid_post', nan):.2f}.")
    return text


def write_study(root: str | Path, label: str, sections: list[dict], seed: int = 0) -> Path:
    """A report for a study across models or checkpoints: `sections` are {"key" (the result's folder
    under root), "title", "reading"}; no scorecard (each model's own report has one)."""
    root = Path(root)
    manifest = {"model": label, "seed": seed, "study": True, "stages": sections}
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return build_report(root)


def build_report(root: str | Path, out: str | Path | None = None) -> Path:
    """Write `index.html` for a results folder (as written by `vlmscope demo` / `vlmscope run`)."""
    root = Path(root)
    manifest_path = root / "manifest.json"
    if not manifest_path.exists():
        raise FileNotFoundError(f"{root} has no manifest.json: not a vlmscope results folder")
    manifest = json.loads(manifest_path.read_text())
    groups = {"probing": ["probe-colour", "probe-shape", "probe-cell"], "lens": ["lens"],
              "patching": ["patching", "atp", "knockout"], "sae": ["sae"], "explain": ["explain"]}
    sections = []
    for stage in manifest["stages"]:
        figures = [f for name in groups.get(stage["key"], [stage["key"]]) if (root / name).exists()
                   for f in _figures(root / name)]
        sections.append({"key": stage["key"], "title": stage["title"], "figures": figures,
                         "reading": _reading(stage["key"], root) or stage.get("reading", "")})
    page = Environment(autoescape=True).from_string(TEMPLATE).render(
        model=manifest["model"], seed=manifest.get("seed", 0), seconds=manifest.get("seconds", "?"),
        version=__version__, scorecard=[] if manifest.get("study") else scorecard(root), sections=sections,
    )
    path = Path(out) if out else root / "index.html"
    path.write_text(page)
    return path
