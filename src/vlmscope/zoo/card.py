"""Model cards: what a zoo model is, how it was trained, how well it does and where it fails.
card.json is the machine-readable source; card.md is rendered from it."""

from __future__ import annotations

from vlmscope.data.scene import CELL, IMAGE_SIZE
from vlmscope.data.vocab import COLOURS, DOMAINS, FAMILIES, SHAPES, SIZES
from vlmscope.zoo.recipes import replan_pairs
from vlmscope.zoo.shapes_llava import NAME, PARTS

CARD_VERSION = 1
WORLD_ONLY = ("Trained and evaluated only on the synthetic shapes world (72-px images, 3x3 grid, 1-4 objects); it"
              " knows nothing else, and questions outside the six templates are out of distribution.")
ONE_TOKEN = "Answers are single tokens read at the last prompt position; generation beyond one token is untrained."
ONE_CELL_PER_TOKEN = ("The image must be 72 x 72 with one object per 24-px cell: the 9 image tokens are the 9 cells,"
                      " so an object straddling cells or a finer layout is out of distribution.")
FP16_SNAPSHOTS = ("Intermediate checkpoints are fp16 and store only the parts their stage changed; the final"
                  " weights are fp32.")
KNOWN_LIMITS = [  # shapes-llava's
    WORLD_ONLY, ONE_TOKEN, ONE_CELL_PER_TOKEN,
    "The vision tower is trained only with per-patch attribute heads (no captions, no contrastive loss).",
    FP16_SNAPSHOTS,
]
# the other question-answering zoo models'
LIMITS_BY_NAME = {
    "shapes-blip2": [
        WORLD_ONLY, ONE_TOKEN,
        "The image must be 72 x 72 with one object per 24-px cell: the tower's 9 patches are the 9 cells; the"
        " LM sees 12 query tokens, which no single cell owns.",
        "The Q-Former's representation learning uses the scene's ground truth (every cell's colour, shape and"
        " size read from all queries together) in place of BLIP-2's caption objectives (ITC, ITM, ITG); the"
        " Q-Former is then frozen and the LM trained from scratch (BLIP-2 freezes its pretrained LLM instead).",
        FP16_SNAPSHOTS,
    ],
    "shapes-llava-contrastive": [
        WORLD_ONLY, ONE_TOKEN, ONE_CELL_PER_TOKEN,
        "A variant of shapes-llava: the vision tower is pre-trained contrastively against shapes-clip's captions"
        " (pooled CLS, one-attribute hard negatives) instead of per-patch attribute heads; instruction tuning"
        " stops at 7,000 steps so that it can be compared with shapes-llava's checkpoint of that step.",
        FP16_SNAPSHOTS,
    ],
}


def _architecture(model) -> dict:
    """The card's architecture block, by class (LLaVA: MLP projector; BLIP-2: Q-Former)."""
    cfg = model.config
    blocks = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    arch = {
        "vision": {k: getattr(cfg.vision_config, k) for k in (*blocks, "image_size", "patch_size")},
        "lm": {k: getattr(cfg.text_config, k) for k in (*blocks, "head_dim", "vocab_size")},
        "image_token_id": cfg.image_token_id,
    }
    if type(model).__name__.startswith("Blip2"):
        q = cfg.qformer_config
        arch["qformer"] = {k: getattr(q, k) for k in (*blocks, "cross_attention_frequency")}
        arch |= {"num_query_tokens": cfg.num_query_tokens, "image_tokens": cfg.num_query_tokens,
                 "prompt": f"<image>x{cfg.num_query_tokens} <s> QUESTION  (answer read from the logits at the"
                           " last prompt token)"}
        return arch
    return arch | {
        "projector": {"type": "mlp2x_gelu", "hidden_act": cfg.projector_hidden_act},
        "image_tokens": (IMAGE_SIZE // CELL) ** 2,
        "vision_feature_layer": cfg.vision_feature_layer,
        "vision_feature_select_strategy": cfg.vision_feature_select_strategy,
        "prompt": "<s> <image>x9 QUESTION  (answer read from the logits at the last prompt token)",
    }


def generative_card(model, training: dict, config: dict, accuracy: dict[str, float], seed: int, n: int,
                    final_step: int, snapshot_steps: list[int], name: str = NAME,
                    parts: dict[str, tuple[str, ...]] = PARTS) -> dict:
    """The card of a trained question-answering zoo model (shapes-llava, shapes-blip2, ...) as a dict."""
    params = {part: sum(p.numel() for k, p in model.named_parameters() if k.startswith(prefixes))
              for part, prefixes in parts.items()}
    return {
        "card_version": CARD_VERSION,
        "name": name,
        "class": type(model).__name__,
        "parameters": sum(params.values()),
        "parameters_by_part": params,
        "architecture": _architecture(model),
        "data": {
            "world": "vlmscope.data shapes world",
            "image_size": IMAGE_SIZE, "grid": "3x3", "objects": "1-4", "shapes": list(SHAPES),
            "colours": list(COLOURS), "sizes": list(SIZES), "domains": list(DOMAINS),
            "families": list(FAMILIES),
            "training_mix": f"{config['hard_fraction']:.0%} binding curriculum (reached linearly over the"
                            f" first {config['hard_ramp']} instruction steps), rest standard; family weights"
                            " 0.05 + max(1 - val acc, 0.02)",
        },
        "recipe": {"seed": config["seed"], "stages": config["stages"], "optimizer": "AdamW",
                   "betas": config["betas"], "weight_decay": config["weight_decay"],
                   "grad_clip": config["grad_clip"], "stop_at": config["stop_at"],
                   "eval_every": config["eval_every"], "command":
                   f"vlmscope zoo train {name} --out runs/{name} --seed {config['seed']}"},
        "training": {"final_step": final_step, "seconds": round(training["elapsed_s"], 1),
                     "seconds_by_stage": {k: round(v, 1) for k, v in training["stage_seconds"].items()},
                     "hardware": "1 CPU thread (shared 2-core machine)", "validation": training["history"],
                     "validation_n": config["eval_n"]},
        "accuracy": {"seed": seed, "n": n, "per_family": accuracy},
        "checkpoints": {"steps": snapshot_steps + [final_step], "format": "fp16 snapshots of changed parts"
                        " (checkpoints/index.json), composed at load; final step = model.safetensors"},
        "known_limits": LIMITS_BY_NAME.get(name, KNOWN_LIMITS),
        "size_mb": None,
    }


def render_card_md(card: dict) -> str:
    """card.md from card.json."""
    a, t = card["architecture"], card["training"]
    acc = card["accuracy"]["per_family"]
    lines = [
        f"# {card['name']}", "",
        f"`{card['class']}`, {card['parameters']:,} parameters "
        f"({', '.join(f'{k} {v:,}' for k, v in card['parameters_by_part'].items())}), "
        f"{card['size_mb']} MB on disk"
        " with its checkpoints.", "",
        "## Architecture",
        *_connector_lines(a),
        f"- LM: Llama, {a['lm']['hidden_size']} wide, {a['lm']['num_hidden_layers']} layers, "
        f"{a['lm']['num_attention_heads']} heads x {a['lm']['head_dim']}, "
        f"vocabulary {a['lm']['vocab_size']} words.",
        f"- Prompt: `{a['prompt']}`.", "",
        "## Data",
        f"The shapes world: {card['data']['objects']} objects on a {card['data']['grid']} grid, "
        f"{len(card['data']['shapes'])} shapes, {len(card['data']['colours'])} colours, 2 sizes, backgrounds "
        f"{', '.join(card['data']['domains'])}. Training mix: {card['data']['training_mix']}.", "",
        f"## Recipe ({'BLIP-2' if 'qformer' in a else 'LLaVA'}'s stages)",
    ]
    for s in card["recipe"]["stages"]:
        lines.append(f"- {s['name']}: trains {' + '.join(s['parts'])}, up to {s['steps']} steps, batch "
                     f"{s['batch_size']}, lr {s['lr']} (warm-up {s['warmup']}, "
                     f"cosine to {s['floor']} x peak)")
    lines += [
        f"- Early stop when every family reaches {card['recipe']['stop_at']} on validation "
        f"(every {card['recipe']['eval_every']} steps).",
        f"- Train from scratch: `{card['recipe']['command']}` (see the note for how this checkpoint ran).",
        *([f"- Note: {card['recipe']['note']}"] if card["recipe"].get("note") else []), "",
        "## Training",
        f"{t['final_step']} steps in {t['seconds'] / 60:.1f} min on {t['hardware']} "
        f"({', '.join(f'{k} {v / 60:.1f} min' for k, v in t['seconds_by_stage'].items())}).", "",
        f"## Accuracy ({card['accuracy']['n']} fresh examples, seed {card['accuracy']['seed']})", "",
        *_table(list(acc), [[f"{v:.3f}" for v in acc.values()]]),
        "", f"Validation during training ({t['validation_n']} standard examples):", "",
        *_table(["step", *FAMILIES], [[h["step"], *(f"{h['accuracy'][f]:.2f}" for f in FAMILIES)]
                                      for h in t["validation"]]),
        *_tail(card),
    ]
    return "\n".join(lines)


def _table(header: list[str], rows: list[list]) -> list[str]:
    """A markdown table's lines."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(str(x) for x in row) + " |" for row in rows)]


def _tail(card: dict) -> list[str]:
    """Checkpoints, findings (if any) and known limits: the end of every card."""
    return ["", "## Checkpoints", f"Steps {card['checkpoints']['steps']}: {card['checkpoints']['format']}.",
            *(["", "## Findings", *[f"- {x}" for x in card["findings"]]] if card.get("findings") else []),
            "", "## Known limits", *[f"- {x}" for x in card["known_limits"]], ""]


def _connector_lines(a: dict) -> list[str]:
    v = a["vision"]
    tower = (f"{v['hidden_size']} wide, {v['num_hidden_layers']} layers, {v['num_attention_heads']} heads, "
             f"{v['image_size']}-px images, {v['patch_size']}-px patches")
    if "qformer" in a:
        q = a["qformer"]
        return [f"- Vision: BLIP-2 ViT, {tower}: CLS + 9 patch features, one patch per grid cell.",
                f"- Q-Former: {q['hidden_size']} wide, {q['num_hidden_layers']} layers (cross-attention every"
                f" {q['cross_attention_frequency']}), {a['num_query_tokens']} learned queries, then a linear"
                f" projection: {a['image_tokens']} image tokens for the LM."]
    return [f"- Vision: CLIP, {tower}: {a['image_tokens']} image tokens, one per grid cell.",
            f"- Projector: 2-layer MLP (GELU); LLaVA reads vision layer {a['vision_feature_layer']}, CLS dropped."]




CLIP_LIMITS = [
    "Trained and evaluated only on the synthetic shapes world (72-px images, 3x3 grid, 1-4 objects); it"
    " knows only the world's words, and any other word is <unk>.",
    "Zero-shot prompts are in the training distribution: one-object scenes were described by random"
    " attribute subsets and backgrounds (\"a red object\", \"a circle\", \"a small blue square at center\","
    " \"a object on a noisy background .\"), so \"zero-shot\""
    " means classification by text prompts, not transfer to unseen phrasings.",
    "Texts must end with <|endoftext|> (the processor appends it): CLIP pools the text at that token.",
    "The image must be 72 x 72 with one object per 24-px cell: the 9 patches are the 9 cells.",
    "Intermediate checkpoints are fp16; the final weights are fp32.",
]


def _clip_mix_extras(config: dict) -> str:
    """The shapes-clip recipe's departures from its first version (absent from older configs)."""
    keep, swaps = config.get("keep_p", [0.5] * 4), config.get("swaps", [1] * 6)
    names = ("size", "colour", "shape", "position", "background")
    out = ["mentioned in partial texts with P = " + ", ".join(f"{k} {p}" for k, p in zip(names, keep, strict=False))]
    if len(set(swaps)) > 1:
        out.append("hard-negative weights " + ", ".join(f"{k} {w}" for k, w in zip(
            ("colour", "shape", "size", "position", "background", "binding"), swaps, strict=True)))
    if config.get("twins"):
        out.append(f"{config['twins']:.0%} of one-object scenes followed by a twin with the object moved or the"
                   " background changed")
    if config.get("pos_std") is not None:
        out.append(f"vision position embeddings initialised with std {config['pos_std']}")
    return "; " + "; ".join(out)


def shapes_clip_card(model, training: dict, config: dict, metrics: dict[str, float], seed: int, n: int,
                     final_step: int, snapshot_steps: list[int]) -> dict:
    """The card of a trained shapes-clip as a JSON-able dict."""
    from vlmscope.zoo.shapes_clip import NAME as CLIP_NAME
    from vlmscope.zoo.shapes_clip import PARTS as CLIP_PARTS

    cfg = model.config
    params = {part: sum(p.numel() for k, p in model.named_parameters() if k.startswith(prefixes))
              for part, prefixes in CLIP_PARTS.items()}
    keys = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    return {
        "card_version": CARD_VERSION,
        "name": CLIP_NAME,
        "class": type(model).__name__,
        "parameters": sum(params.values()),
        "parameters_by_part": params,
        "architecture": {
            "vision": {k: getattr(cfg.vision_config, k) for k in (*keys, "image_size", "patch_size")},
            "text": {k: getattr(cfg.text_config, k) for k in (*keys, "vocab_size", "max_position_embeddings",
                                                               "eos_token_id")},
            "projection_dim": cfg.projection_dim,
            "image_tokens": (IMAGE_SIZE // CELL) ** 2 + 1,
            "text_format": "<s> WORDS <|endoftext|>, right-padded with <pad>; pooled at <|endoftext|>",
        },
        "data": {
            "world": "vlmscope.data shapes world",
            "image_size": IMAGE_SIZE, "grid": "3x3", "objects": "1-4", "shapes": list(SHAPES),
            "colours": list(COLOURS), "sizes": list(SIZES), "domains": list(DOMAINS),
            "training_mix": f"{config['single']:.0%} one-object scenes described by a random attribute subset"
                            f" ({config['full_p']:.0%} by the full caption), the rest 2-4 objects with full"
                            " captions; every text has a hard negative changing one attribute (colour, shape,"
                            " size, position, background, or two objects' colours swapped); soft targets over"
                            " every matching (image, text) pair" + _clip_mix_extras(config),
        },
        "recipe": {"seed": config["seed"], "steps": config["steps"], "batch_size": config["batch_size"],
                   "lr": config["lr"], "warmup": config["warmup"], "floor": config["floor"],
                   "replan": config.get("replan"), "optimizer": "AdamW", "betas": config["betas"],
                   "weight_decay": config["weight_decay"],
                   "grad_clip": config["grad_clip"], "eval_every": config["eval_every"],
                   "command": f"vlmscope zoo train {CLIP_NAME} --out runs/{CLIP_NAME} --seed {config['seed']}"},
        "training": {"final_step": final_step, "seconds": round(training["elapsed_s"], 1),
                     "hardware": "1 CPU thread (shared 2-core machine)", "validation": training["history"],
                     "validation_n": config["eval_n"]},
        "accuracy": {"seed": seed, "n": n, "metrics": metrics},
        "checkpoints": {"steps": snapshot_steps + [final_step], "format": "fp16 full snapshots"
                        " (checkpoints/index.json); final step = model.safetensors (fp32)"},
        "known_limits": CLIP_LIMITS,
        "size_mb": None,
    }


def render_clip_card_md(card: dict) -> str:
    """card.md of shapes-clip from its card.json."""
    a, t, r = card["architecture"], card["training"], card["recipe"]
    m = card["accuracy"]["metrics"]
    v, x = a["vision"], a["text"]
    lines = [
        f"# {card['name']}", "",
        f"`{card['class']}`, {card['parameters']:,} parameters "
        f"({', '.join(f'{k} {n:,}' for k, n in card['parameters_by_part'].items())}), "
        f"{card['size_mb']} MB on disk with its checkpoints.", "",
        "## Architecture",
        f"- Vision: CLIP, {v['hidden_size']} wide, {v['num_hidden_layers']} layers, {v['num_attention_heads']}"
        f" heads, {v['image_size']}-px images, {v['patch_size']}-px patches: CLS + 9 patches, one per cell.",
        f"- Text: CLIP, {x['hidden_size']} wide, {x['num_hidden_layers']} layers, {x['num_attention_heads']}"
        f" heads, vocabulary {x['vocab_size']} words; {a['text_format']} (eos id {x['eos_token_id']}).",
        f"- Projections to {a['projection_dim']}; learned temperature.", "",
        "## Data",
        f"The shapes world: {card['data']['objects']} objects on a {card['data']['grid']} grid. "
        f"Training mix: {card['data']['training_mix']}.", "",
        "## Recipe (contrastive, one stage)",
        f"- {r['steps']} steps, batch {r['batch_size']} images (+ {r['batch_size']} hard-negative texts), "
        f"AdamW lr {r['lr']} (warm-up {r['warmup']}, cosine to {r['floor']} x peak"
        + "".join(f"; from step {at} re-planned to end at {total}" for at, total in replan_pairs(r.get("replan")))
        + f"), betas {r['betas']}, "
        f"weight decay {r['weight_decay']}, grad-clip {r['grad_clip']}.",
        f"- Train from scratch: `{r['command']}`.",
        *([f"- Note: {r['note']}"] if r.get("note") else []), "",
        "## Training",
        f"{t['final_step']} steps in {t['seconds'] / 60:.1f} min on {t['hardware']}.", "",
        f"## Accuracy ({card['accuracy']['n']} fresh scenes per metric, seed {card['accuracy']['seed']})", "",
        "Zero-shot: one-object scenes, arg-max over \"a {colour} object\" / \"a {shape}\" / \"a object at"
        " {position}\" / \"a object on a {background} background .\" prompts (chance 1/6, 1/5, 1/9, 1/3). Retrieval:"
        " 2-4-object scenes, top-1 within pools of 100 captions; hard_negative: the true caption beats a"
        " one-attribute swap.", "",
        *_table(list(m), [[f"{val:.3f}" for val in m.values()]]),
        "", f"Validation during training ({t['validation_n']} scenes):", "",
        *_table(["step", *m], [[h["step"], *(f"{h['accuracy'][k]:.3f}" for k in m)] for h in t["validation"]]),
        *_tail(card),
    ]
    return "\n".join(lines)
