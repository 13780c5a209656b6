"""shapes-clip: a ~0.4M-parameter CLIPModel (Radford et al., 2021) for the shapes world, the zoo's
dual encoder: a CLIP vision tower 64 x 3 layers on 72-px images with 24-px patches (one patch per grid
cell, as in shapes-llava), a CLIP text tower 64 x 2 layers over the world's words, projections to 64.

Training is contrastive on fresh scenes every step. Each image gets one text: a full caption
("a large red circle at top-left and ... on a plain background .") or, for one-object scenes, a
partial description ("a red object", "a circle", "a small blue square at center", and with `keep_p`
for background "a object on a noisy background ."); each text also gets a hard negative that changes
one attribute (colour, shape, size, position, background, or swaps two objects' colours; `swaps`
weighs the kinds).
Because partial descriptions are true of many images, the loss uses soft targets over every (image,
text) pair that matches by ground truth, not only the diagonal.

Position needs more than texts, at initialisation: with transformers' position embeddings (std 0.02,
small beside a patch's content) the CLS cannot tell which patch holds the object, the text tower
erases the position words in the first few hundred steps, and neither side recovers (the shipped
model). `build_model(seed, pos_std=0.5)` draws them at a patch's scale (`train_clip.POSITION_RECIPE`).

Text: the world's word-level tokenizer plus one end token `<|endoftext|>` with the highest id, as in
CLIP: `CLIPTextModel` pools at the first `eos_token_id`, and the world's `</s>` has id 2, which
transformers treats as "legacy: pool at the arg-max id". With the end token last, both agree.

Training: train_clip.py (`vlmscope zoo train shapes-clip --out runs/shapes-clip`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPProcessor,
    CLIPTextConfig,
    CLIPVisionConfig,
    PreTrainedTokenizerFast,
)

from vlmscope.data.questions import caption
from vlmscope.data.render import render
from vlmscope.data.scene import CELL, IMAGE_SIZE, Scene, place, random_attrs
from vlmscope.data.tokenizer import IMAGE_MEAN, IMAGE_STD, pad_right, pixel_values, vocabulary
from vlmscope.data.vocab import COLOURS, DOMAINS, GRID, POSITIONS, SHAPES, SIZES

NAME = "shapes-clip"
EOT = "<|endoftext|>"
MAX_TEXT = 40  # longest caption: <s> + 4 objects x 6 words + 3 "and" + 4 + <eot> = 33
PARTS: dict[str, tuple[str, ...]] = {
    "vision": ("vision_model.", "visual_projection."),
    "text": ("text_model.", "text_projection."),
    "scale": ("logit_scale",),
}


def clip_vocabulary() -> dict[str, int]:
    """The world's vocabulary with the end token appended (highest id)."""
    vocab = vocabulary()
    return {**vocab, EOT: len(vocab)}


def build_config(heads: int = 4, layers: int = 3, mlp: int = 256) -> CLIPConfig:
    """shapes-clip's architecture; the vision tower's `heads`, `layers` and MLP width `mlp` (v1 and v2: 4,
    3, 256; v3: 4, 4, 128)."""
    vocab = clip_vocabulary()
    text = CLIPTextConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=MAX_TEXT, projection_dim=64,
                          bos_token_id=vocab["<s>"], eos_token_id=vocab[EOT], pad_token_id=vocab["<pad>"])
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=mlp, num_hidden_layers=layers,
                              num_attention_heads=heads, image_size=IMAGE_SIZE, patch_size=CELL, projection_dim=64)
    return CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=64)


def build_model(seed: int, pos_std: float | None = None, heads: int = 4, layers: int = 3, mlp: int = 256) -> CLIPModel:
    """A freshly initialised shapes-clip (deterministic for the seed); `pos_std` re-draws the vision
    tower's position embeddings with that standard deviation (transformers' default is 0.02)."""
    torch.manual_seed(seed)
    model = CLIPModel(build_config(heads, layers, mlp)).eval()
    if pos_std is not None:
        torch.nn.init.normal_(model.vision_model.embeddings.position_embedding.weight, std=pos_std)
    return model


def build_clip_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level, whitespace split, `<s> ... <|endoftext|>`, right padding with `<pad>`."""
    vocab = clip_vocabulary()
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single=f"<s> $A {EOT}", pair=f"<s> $A $B {EOT}", special_tokens=[("<s>", vocab["<s>"]), (EOT, vocab[EOT])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token=EOT, unk_token="<unk>",
                                   pad_token="<pad>", padding_side="right", model_max_length=MAX_TEXT)


def build_processor() -> CLIPProcessor:
    """A real CLIPProcessor for 72-px images and the world's words (works offline)."""
    ip = CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE},
                               crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                               image_mean=list(IMAGE_MEAN), image_std=list(IMAGE_STD))
    return CLIPProcessor(image_processor=ip, tokenizer=build_clip_tokenizer())


def encode_texts(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Fast equivalent of the processor's text path: ids and mask (batch, pos), right-padded."""
    vocab = clip_vocabulary()
    rows = [[vocab["<s>"], *(vocab.get(w, vocab["<unk>"]) for w in t.split()), vocab[EOT]] for t in texts]
    return pad_right(rows, vocab["<pad>"])


# ---- texts with ground truth -------------------------------------------------------------------

ATTRS = ("size", "colour", "shape", "position", "background")
VALUES = {"size": SIZES, "colour": COLOURS, "shape": SHAPES, "position": POSITIONS, "background": DOMAINS}
SWAP_OF = {"size": "size", "colour": "colour", "shape": "shape", "position": "position", "background": "domain"}


def attribute(scene: Scene, attr: str) -> str:
    """A one-object scene's value of one of ATTRS: its object's, or the scene's background."""
    return scene.domain if attr == "background" else getattr(scene.objects[0], attr)


@dataclass(frozen=True)
class Text:
    """A description and what it claims: a full caption (`full`) or the attributes of a scene's only
    object and its background (`attrs`, e.g. {"colour": "red", "background": "noisy"})."""

    text: str
    full: str | None = None
    attrs: tuple[tuple[str, str], ...] = ()

    def matches(self, scene: Scene) -> bool:
        if self.full is not None:
            return caption(scene) == self.full
        return len(scene.objects) == 1 and all(attribute(scene, k) == v for k, v in self.attrs)


def describe(attrs: dict[str, str]) -> Text:
    """ "a [size] [colour] shape|object [at position] [on a background background .]" for a one-object
    scene's attributes (the background phrase as the full caption ends)."""
    words = ["a", *(attrs[k] for k in ("size", "colour") if k in attrs), attrs.get("shape", "object")]
    words += ["at", attrs["position"]] if "position" in attrs else []
    words += ["on", "a", attrs["background"], "background", "."] if "background" in attrs else []
    return Text(" ".join(words), attrs=tuple(sorted(attrs.items())))


def full_text(scene: Scene) -> Text:
    c = caption(scene)
    return Text(c, full=c)


def _other(rng: np.random.Generator, values: tuple[str, ...], value: str) -> str:
    return str(rng.choice([v for v in values if v != value]))


SWAPS = ("colour", "shape", "size", "position", "domain", "bind")


def swap_one(rng: np.random.Generator, scene: Scene, weights: tuple[float, ...] = (1,) * 6) -> Scene:
    """The scene with one attribute changed: an object's colour, shape, size or cell, the background,
    or (with two objects of different colours) their colours exchanged; `weights` per kind of SWAPS.
    Its caption differs."""
    objs = scene.objects
    i = int(rng.integers(len(objs)))
    n = 6 if len({o.colour for o in objs}) > 1 else 5
    if len(set(weights)) == 1:
        kind = SWAPS[int(rng.integers(n))]
    else:
        w = np.asarray(weights[:n], dtype=float)
        kind = SWAPS[int(rng.choice(n, p=w / w.sum()))]
    o = objs[i]
    if kind == "colour":
        return scene.with_object(i, colour=_other(rng, COLOURS, o.colour))
    if kind == "shape":
        return scene.with_object(i, shape=_other(rng, SHAPES, o.shape))
    if kind == "size":
        return scene.with_object(i, size=_other(rng, SIZES, o.size))
    if kind == "position":
        free = [c for c in range(GRID * GRID) if c not in {p.cell for p in objs}]
        cell = int(rng.choice(free))
        return scene.with_object(i, cell=cell, x=o.x + (cell % GRID - o.col) * CELL,
                                 y=o.y + (cell // GRID - o.row) * CELL)
    if kind == "domain":
        return replace(scene, domain=_other(rng, DOMAINS, scene.domain))
    j = int(rng.choice([k for k, p in enumerate(objs) if p.colour != o.colour]))
    return scene.with_object(i, colour=objs[j].colour).with_object(j, colour=o.colour)


def _partial(rng: np.random.Generator, scene: Scene, full_p: float, keep_p: tuple[float, ...],
             swaps: tuple[float, ...], must: str | None = None) -> tuple[Text, Text]:
    """A one-object scene's description (a random subset of ATTRS, each kept with its `keep_p`, or the
    full caption) and its hard negative (one mentioned attribute changed, picked with the `swaps` weight
    of its kind); `must`: an attribute always mentioned and the one changed (a twin's difference). An
    attribute with `keep_p` 0 draws no random number, so recipes without background in partial texts
    see the same batches as before it could be mentioned."""
    if must is None and rng.random() < full_p:
        return full_text(scene), full_text(swap_one(rng, scene, swaps))
    keep = ([k for k, p in zip(ATTRS, keep_p, strict=True) if p > 0 and rng.random() < p]
            or [ATTRS[1 + int(rng.integers(2))]])
    if must is not None:
        keep = [a for a in ATTRS if a in keep or a == must]
    attrs = {k: attribute(scene, k) for k in keep}
    w = np.array([swaps[SWAPS.index(SWAP_OF[a])] for a in keep], dtype=float)
    if must is not None:
        k = must
    elif len(set(w)) == 1:
        k = keep[int(rng.integers(len(keep)))]
    else:
        k = keep[int(rng.choice(len(keep), p=w / w.sum()))]
    return describe(attrs), describe({**attrs, k: _other(rng, VALUES[k], attrs[k])})


@dataclass(frozen=True)
class Batch:
    pixel_values: torch.Tensor  # (images, 3, H, W)
    input_ids: torch.Tensor  # (2 * images, pos): each image's text, then the hard negatives
    attention_mask: torch.Tensor
    match: torch.Tensor  # (images, 2 * images) bool: text j is true of image i


def contrastive_batch(rng: np.random.Generator, n: int, single: float = 0.4, full_p: float = 0.25,
                      keep_p: tuple[float, ...] = (0.5, 0.5, 0.5, 0.5, 0.0), swaps: tuple[float, ...] = (1,) * 6,
                      focus: float = 0.0, twins: float = 0.0) -> Batch:
    """n fresh scenes (a `single` share with one object), their texts, hard negatives and matches.
    `focus`: the share of one-object scenes given the batch's one shared colour, so that only shape,
    size and position tell them apart (colour alone would solve the batch otherwise). `twins`: the
    share of one-object scenes followed by a twin, the same scene with the object in another cell or on
    another background (position and background swaps weighted as in `swaps`), both described with
    that attribute: a pair of images that only it tells apart (hard negative images)."""
    shared = COLOURS[int(rng.integers(len(COLOURS)))] if focus > 0 else None
    scenes, pos, neg = [], [], []
    while len(scenes) < n:
        k = 1 if rng.random() < single else int(rng.integers(2, 5))
        attrs = random_attrs(rng, k)
        if k == 1 and focus > 0 and rng.random() < focus:
            attrs = [(attrs[0][0], shared)]
        s = place(rng, attrs)
        if k == 1 and twins > 0 and len(scenes) < n - 1 and rng.random() < twins:
            twin = swap_one(rng, s, (0, 0, 0, swaps[3], swaps[4]))
            must = "background" if twin.domain != s.domain else "position"
            pairs = [(x, _partial(rng, x, full_p, keep_p, swaps, must)) for x in (s, twin)]
        elif k == 1:
            pairs = [(s, _partial(rng, s, full_p, keep_p, swaps))]
        else:
            pairs = [(s, (full_text(s), full_text(swap_one(rng, s, swaps))))]
        for x, (t, h) in pairs:
            scenes.append(x)
            pos.append(t)
            neg.append(h)
    texts = pos + neg
    match = torch.tensor([[t.matches(s) for t in texts] for s in scenes])
    ids, mask = encode_texts([t.text for t in texts])
    return Batch(pixel_values([render(s) for s in scenes]), ids, mask, match)


def contrastive_loss(model: CLIPModel, b: Batch) -> torch.Tensor:
    """Symmetric CLIP loss with soft targets over matching pairs; hard negatives join image -> text."""
    out = model(input_ids=b.input_ids, attention_mask=b.attention_mask, pixel_values=b.pixel_values)
    return soft_clip_loss(out.logits_per_image, b.match)


def soft_clip_loss(logits: torch.Tensor, match: torch.Tensor) -> torch.Tensor:
    """The loss of contrastive_loss from logits (images, texts) and matches (images, texts) bool; the
    first `images` texts are the images' own."""
    m = match.float()
    i2t = -(m / m.sum(1, keepdim=True) * F.log_softmax(logits, 1)).sum(1).mean()
    n = logits.shape[0]
    mt = m[:, :n]  # text -> image over the images' own texts (each is true of at least its image)
    t2i = -(mt / mt.sum(0, keepdim=True) * F.log_softmax(logits[:, :n], 0)).sum(0).mean()
    return (i2t + t2i) / 2


# ---- evaluation --------------------------------------------------------------------------------

@torch.no_grad()
def _embed(model: CLIPModel, images: list[np.ndarray] | None = None, texts: list[str] | None = None):
    if images is not None:
        e = model.get_image_features(pixel_values=pixel_values(images))
    else:
        ids, mask = encode_texts(texts)
        e = model.get_text_features(input_ids=ids, attention_mask=mask)
    e = getattr(e, "pooler_output", e)
    return F.normalize(e, dim=-1)  # (batch, projection_dim)


ZERO_SHOT = {"colour": "a {} object", "shape": "a {}", "position": "a object at {}",
             "background": "a object on a {} background ."}  # attribute: prompt template


def zero_shot(model: CLIPModel, seed: int, n: int) -> dict[str, float]:
    """Accuracy on n fresh one-object scenes, by arg-max cosine similarity among one prompt per value
    (ZERO_SHOT): colour "a {colour} object", shape "a {shape}", position "a object at {position}",
    background "a object on a {background} background ." (chance 1/6, 1/5, 1/9, 1/3)."""
    rng = np.random.default_rng([seed, 1])
    scenes = [place(rng, random_attrs(rng, 1)) for _ in range(n)]
    img = torch.cat([_embed(model, images=[render(s) for s in scenes[i: i + 200]]) for i in range(0, n, 200)])
    out = {}
    for attr, template in ZERO_SHOT.items():
        values = VALUES[attr]
        txt = _embed(model, texts=[template.format(v) for v in values])
        pred = (img @ txt.T).argmax(1).tolist()
        truth = [attribute(s, attr) for s in scenes]
        out[attr] = float(np.mean([values[p] == t for p, t in zip(pred, truth, strict=True)]))
    return out


def retrieval(model: CLIPModel, seed: int, n: int, pool: int = 100, negatives: int = 5) -> dict[str, float]:
    """Caption retrieval on n fresh scenes of 2-4 objects: top-1 image -> caption and caption -> image
    within pools of `pool` scenes, and the share of (image, one-attribute swap) pairs where the true
    caption scores higher than the swap (`hard_negative`, `negatives` swaps per image)."""
    rng = np.random.default_rng([seed, 2])
    scenes = [place(rng, random_attrs(rng, int(rng.integers(2, 5)))) for _ in range(n)]
    i2t = t2i = hard = 0
    for i in range(0, n, pool):
        chunk = scenes[i: i + pool]
        img = _embed(model, images=[render(s) for s in chunk])
        txt = _embed(model, texts=[caption(s) for s in chunk])
        sim = img @ txt.T  # (pool, pool)
        target = torch.arange(len(chunk))
        i2t += int((sim.argmax(1) == target).sum())
        t2i += int((sim.argmax(0) == target).sum())
        swaps = _embed(model, texts=[caption(swap_one(rng, s)) for s in chunk for _ in range(negatives)])
        swap_sim = (img[:, None, :] * swaps.view(len(chunk), negatives, -1)).sum(-1)  # (pool, negatives)
        hard += int((swap_sim < sim.diagonal()[:, None]).sum())
    return {"retrieval_i2t": i2t / n, "retrieval_t2i": t2i / n, "hard_negative": hard / (n * negatives)}


def evaluate(model: CLIPModel, seed: int, n: int) -> dict[str, float]:
    """Zero-shot colour, shape, position and background on n one-object scenes and retrieval on n
    multi-object scenes."""
    was = model.training
    model.eval()
    out = zero_shot(model, seed, n) | retrieval(model, seed, n)
    model.train(was)
    return out
