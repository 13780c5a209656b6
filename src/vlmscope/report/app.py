"""`vlmscope serve`: a local web app over one VLM. Pick, upload or generate an image, ask a
question, and look inside: the answer's probabilities, each patch's logit-lens words
(nostalgebraist 2020) and top SAE features, the SAE's features with their top scenes
(feature_browser.py), a layer x position causal-tracing grid (Gaussian noise
on the image tokens, Meng et al. 2022) and image->last attention-knockout windows (Geva et al. 2023).

`create_app(vlm, sae)` returns a FastAPI app: JSON endpoints under /api that call the library's
methods on the current inputs, and the page in static/ (plain JS, no build step, nothing fetched
from outside this server). Model calls hold one lock: hooks live on the shared model.
"""

from __future__ import annotations

import io
import math
import secrets
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image, ImageOps, UnidentifiedImageError
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from vlmscope.errors import InputError, VlmscopeError
from vlmscope.methods.corruptions import gaussian_noise
from vlmscope.methods.knockout import knockout_sweep
from vlmscope.methods.lens import logit_lens
from vlmscope.methods.metrics import answer_prob, last_logits
from vlmscope.methods.patching import patch_sweep
from vlmscope.model.positions import IMAGE, ROLES
from vlmscope.report import feature_browser

STATIC = Path(__file__).parent / "static"
MAX_UPLOAD_BYTES = 5 * 1024 * 1024
MAX_PIXELS = 25_000_000
MODES = ("RGB", "RGBA", "L", "LA", "P", "1")  # what converts to RGB without guessing
GALLERY = (0, 1, 2, 3, 4, 5)  # scene seeds offered as pictures to pick
QUESTIONS = ("what colour is the circle ?", "what shape is the red object ?", "how many squares are there ?",
             "where is the blue triangle ?", "is there a green cross ?")
LENS_K, SAE_K, KEPT_UPLOADS = 3, 5, 32


class UploadError(Exception):
    """An upload the app refuses: `status` is the HTTP status, the message says why."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def decode_image(data: bytes) -> np.ndarray:
    """An uploaded file as a uint8 (H, W, 3) RGB array, or an UploadError saying what is wrong."""
    if len(data) > MAX_UPLOAD_BYTES:
        raise UploadError(413, f"the file is too large ({len(data) / 2**20:.1f} MB); the limit is "
                               f"{MAX_UPLOAD_BYTES // 2**20} MB")
    if not data:
        raise UploadError(400, "the file is empty")
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.width * im.height > MAX_PIXELS:
                raise UploadError(413, f"the image is too large ({im.width} x {im.height} pixels); the limit "
                                       f"is {MAX_PIXELS // 10**6} megapixels")
            if im.mode not in MODES:
                raise UploadError(415, f"image mode {im.mode!r} is not supported; upload an RGB, RGBA, "
                                       "greyscale or palette image")
            im.load()
            im = ImageOps.exif_transpose(im)  # phone photos: upright as their viewer shows them
            if im.mode in ("RGBA", "LA") or "transparency" in im.info:  # transparent parts read as white
                rgba = im.convert("RGBA")
                im = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except UnidentifiedImageError:
        raise UploadError(415, "not an image: the file is not in a format Pillow reads (upload a PNG, JPEG, "
                               "GIF, WebP or BMP)") from None
    except Image.DecompressionBombError as e:
        raise UploadError(413, f"the image is too large: {e}") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise UploadError(400, f"the image could not be decoded (damaged or truncated?): {e}") from None


def scene_image(seed: int):
    """A shapes-world scene for a seed, its rendered image, caption and answerable questions."""
    from vlmscope.data import answer_of, caption, render, sample_scene

    scene = sample_scene(np.random.default_rng(seed))
    asked: dict[str, str] = {}
    for o in scene.objects:
        for family, slots in (("colour", (o.shape,)), ("shape", (o.colour,)), ("where", (o.colour, o.shape)),
                              ("count", (o.shape,)), ("exists", (o.colour, o.shape))):
            q = answer_of(scene, family, slots)
            if q is not None:
                asked.setdefault(q.text, q.answer)
    questions = [{"text": t, "answer": a} for t, a in asked.items()][:8]
    return render(scene), {"caption": caption(scene), "questions": questions}


def model_view(vlm, image: np.ndarray) -> np.ndarray:
    """The image as the model sees it (after the processor's resize and crop), so that the patch
    grid drawn over it is the model's; the image itself where pixel values are not one picture."""
    pixels = vlm.prepare([image], ["?"]).get("pixel_values")
    if not isinstance(pixels, torch.Tensor) or pixels.dim() != 4 or pixels.shape[:2] != (1, 3):
        return image
    ip = getattr(vlm.processor, "image_processor", None)
    x = pixels[0].float().permute(1, 2, 0)  # (H, W, 3)
    mean, std = getattr(ip, "image_mean", None), getattr(ip, "image_std", None)
    if mean is not None and std is not None:
        x = (x * torch.tensor(std) + torch.tensor(mean)).clamp(0, 1)
    else:
        x = (x - x.min()) / (x.max() - x.min()).clamp_min(1e-8)
    return (x * 255).round().to(torch.uint8).numpy()


def _nums(t: torch.Tensor) -> list:
    """A tensor as (nested) lists of floats, NaN and inf as None (JSON has neither)."""
    def finite(v):
        return [finite(u) for u in v] if isinstance(v, list) else v if math.isfinite(v) else None

    return finite(t.detach().float().cpu().tolist())


def _patches(pos) -> list[tuple[int, int, int]]:
    """(row, col, position) of each image patch of example 0, first occurrence only."""
    seen: dict[tuple[int, int], int] = {}
    for p in ((pos.role[0] == IMAGE) & (pos.row[0] >= 0)).nonzero().flatten().tolist():
        seen.setdefault((int(pos.row[0, p]), int(pos.col[0, p])), p)
    return [(r, c, p) for (r, c), p in seen.items()]


def typed_tokens(vlm, x: dict) -> list[dict]:
    """Each LM position of example 0: its token, role, and patch row/column (-1 off the image)."""
    pos = vlm.positions(x)["lm"]
    words = vlm.tokenizer.convert_ids_to_tokens(x["input_ids"][0].tolist())
    roles, rows, cols = pos.role[0].tolist(), pos.row[0].tolist(), pos.col[0].tolist()
    return [{"text": w, "role": ROLES[roles[p]], "row": rows[p], "col": cols[p]} for p, w in enumerate(words)]


def answer(vlm, x: dict, question: str, k: int) -> dict:
    """The answer's top-k probabilities, the prompt's typed tokens and the lens at every patch."""
    lens = logit_lens(vlm, x, k=LENS_K)
    probs = last_logits(vlm, vlm.run(x), x)[0].float().softmax(-1)  # (vocab,)
    top_p, top_i = probs.topk(min(k, probs.shape[0]))
    pos = vlm.positions(x)["lm"]

    def read(p: int) -> list[list[dict]]:  # (layer, k) words at one position
        ids, ps = lens.top_ids[:, 0, p].tolist(), lens.top_probs[:, 0, p].tolist()  # (layer, k)
        return [[{"w": lens.token(i), "p": q} for i, q in zip(*row, strict=True)]
                for row in zip(ids, ps, strict=True)]

    patches = _patches(pos)
    top = [{"token": lens.token(i), "prob": q} for q, i in zip(top_p.tolist(), top_i.tolist(), strict=True)]
    return {
        "question": question, "answer": top[0]["token"], "top": top, "tokens": typed_tokens(vlm, x),
        "unknown_words": unknown_words(vlm.tokenizer, question),
        "grid": [max(r for r, _, _ in patches) + 1, max(c for _, c, _ in patches) + 1] if patches else [0, 0],
        "lens": {"layers": list(lens.layers), "last": read(int(pos.last()[0])),
                 "patches": [{"row": r, "col": c, "pos": p, "top": read(p)} for r, c, p in patches]},
    }


def unknown_words(tokenizer, text: str) -> list[str]:
    """The words of `text` that the tokenizer reads as its unknown token (the zoo's closed vocabulary)."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None:
        return []
    return [w for w in text.split() if unk in tokenizer(w, add_special_tokens=False)["input_ids"]]


def sae_features(vlm, sae, x: dict, k: int = SAE_K) -> dict:
    """The SAE's top-k active features at every image patch of its site."""
    site = sae.cfg.site
    _, cache = vlm.run_with_cache(x, site)
    acts = cache[site]  # (batch, pos, d_in)
    if acts.dim() != 3 or acts.shape[-1] != sae.cfg.d_in:
        raise InputError(f"the SAE reads {site} with d_in={sae.cfg.d_in}, but this model's {site} has shape "
                         f"{tuple(acts.shape)}")
    with torch.no_grad():
        h = sae.encode(acts[0].float())  # (pos, d_sae)
    out = []
    for r, c, p in _patches(vlm.positions(x)[vlm.site(site).stream]):
        v, i = h[p].topk(min(k, h.shape[-1]))
        feats = [{"id": f, "act": a} for a, f in zip(v.tolist(), i.tolist(), strict=True) if a > 0]
        out.append({"row": r, "col": c, "features": feats})
    return {"site": site, "patches": out}


def _metric(vlm, x: dict):
    """The probability of the model's own answer on these inputs (and that answer's token)."""
    top = int(last_logits(vlm, vlm.run(x), x)[0].argmax())
    return answer_prob(top), top


def trace(vlm, x: dict, direction: str) -> dict:
    """Patching each (LM layer, position) between the run and a run with its image tokens
    noised; normalised effect: 1 = as the clean run, 0 = as the noised run."""
    metric, top = _metric(vlm, x)
    noise = gaussian_noise(vlm, x, positions="image", seed=0)
    res = patch_sweep(vlm, x, x, metric, sites="lm.blocks.*.resid_post", positions="each",
                      direction=direction, corrupt_interventions=[noise])
    return {"direction": direction, "metric": f"p({vlm.tokenizer.convert_ids_to_tokens(top)})",
            "layers": [vlm.site(c).layer for c in res.components], "positions": [int(g) for g in res.groups],
            "tokens": typed_tokens(vlm, x),
            "effect": _nums(res.effect), "value": _nums(res.raw[0]), "clean": float(res.clean[0]),
            "corrupt": float(res.corrupt[0])}


def knockout(vlm, x: dict, window: int) -> dict:
    """Image -> last-token attention blocked in each window of `window` LM layers."""
    metric, top = _metric(vlm, x)
    res = knockout_sweep(vlm, x, metric, src="image", dst="last", window=window)
    return {"window": window, "metric": f"p({vlm.tokenizer.convert_ids_to_tokens(top)})",
            "starts": list(res.starts), "value": _nums(res.values[:, 0]), "relative": _nums(res.relative),
            "baseline": float(res.baseline[0])}


class Ask(BaseModel):
    image: str = Field(max_length=64)
    question: str = Field(min_length=1, max_length=300)
    k: int = Field(default=5, ge=1, le=20)


class Trace(BaseModel):
    image: str = Field(max_length=64)
    question: str = Field(min_length=1, max_length=300)
    direction: Literal["denoise", "noise"] = "denoise"


class Knockout(BaseModel):
    image: str = Field(max_length=64)
    question: str = Field(min_length=1, max_length=300)
    window: int = Field(default=1, ge=1)


def create_app(vlm, sae=None) -> FastAPI:
    """The web app on one VLM (with a processor) and, optionally, an SAE on one of its sites."""
    if "lm.logits" not in vlm.site_table:
        raise InputError("the web app needs a generative VLM (one with lm.logits); "
                         f"{type(vlm.model).__name__} has no language-model head")
    if vlm.processor is None:
        raise InputError("the web app prepares inputs from images and questions: load the model with its "
                         "processor (vlmscope.load(model, processor))")
    if sae is not None and sae.cfg.site not in vlm.site_table:
        raise InputError(f"the SAE reads site {sae.cfg.site!r}, which this model does not have")
    app = FastAPI(title="vlmscope", docs_url=None, redoc_url=None)
    lock = threading.Lock()
    uploads: OrderedDict[str, np.ndarray] = OrderedDict()  # the latest KEPT_UPLOADS uploads
    catalogue: dict[str, list] = {}  # the feature list, computed on first request

    def image_of(image_id: str) -> np.ndarray:
        if image_id.startswith("scene-") and image_id[6:].isdigit():
            return scene_image(int(image_id[6:]))[0]
        if image_id not in uploads:
            raise HTTPException(404, f"unknown image {image_id!r}: pick, generate or upload an image again")
        return uploads[image_id]

    def inputs(image_id: str, question: str) -> dict:
        if not question.strip():
            raise HTTPException(400, "the question is empty: type a question about the image")
        return vlm.prepare([image_of(image_id)], [question.strip()])

    @app.exception_handler(VlmscopeError)
    async def bad_input(request: Request, exc: VlmscopeError):
        return JSONResponse({"detail": str(exc)}, status_code=400)

    @app.exception_handler(RuntimeError)
    async def model_failed(request: Request, exc: RuntimeError):  # e.g. inputs too long for the model
        return JSONResponse({"detail": f"the model could not run on these inputs: {exc}"}, status_code=500)

    @app.get("/", include_in_schema=False)
    def index():
        return FileResponse(STATIC / "index.html")

    @app.get("/api/info")
    def info():
        return {"model": repr(vlm), "layers": vlm.n_layers("lm"), "gallery": list(GALLERY),
                "questions": list(QUESTIONS), "max_upload_bytes": MAX_UPLOAD_BYTES,
                "sae": None if sae is None else {"site": sae.cfg.site, "d_sae": sae.cfg.d_sae}}

    @app.get("/api/scene/{seed}")
    def scene(seed: int):
        if not 0 <= seed < 2**31:
            raise HTTPException(400, f"seed must be between 0 and {2**31 - 1}, got {seed}")
        return {"image": f"scene-{seed}", "seed": seed, **scene_image(seed)[1]}

    @app.get("/api/image/{image_id}")
    def image(image_id: str):
        picture = image_of(image_id)
        with lock:
            view = model_view(vlm, picture)
        buf = io.BytesIO()
        Image.fromarray(view).save(buf, format="PNG")
        return Response(buf.getvalue(), media_type="image/png")

    @app.post("/api/upload")
    async def upload(request: Request):
        if int(request.headers.get("content-length") or 0) > MAX_UPLOAD_BYTES + 65536:
            raise HTTPException(413, f"the file is too large; the limit is {MAX_UPLOAD_BYTES // 2**20} MB")
        form = await request.form(max_files=1, max_fields=4)
        file = form.get("file")
        if not isinstance(file, UploadFile):
            raise HTTPException(400, "send the image as a multipart form field named 'file'")
        data = await file.read(MAX_UPLOAD_BYTES + 1)
        try:
            picture = await run_in_threadpool(decode_image, data)
        except UploadError as e:
            raise HTTPException(e.status, str(e)) from None
        image_id = f"upload-{secrets.token_hex(6)}"
        uploads[image_id] = picture
        while len(uploads) > KEPT_UPLOADS:
            uploads.popitem(last=False)
        return {"image": image_id, "width": picture.shape[1], "height": picture.shape[0],
                "name": file.filename}

    @app.post("/api/ask")
    def ask(req: Ask):
        with lock:
            x = inputs(req.image, req.question)
            out = answer(vlm, x, req.question.strip(), req.k)
            out["sae"] = None if sae is None else sae_features(vlm, sae, x)
        return out

    def need_sae():
        if sae is None:
            raise HTTPException(404, "no SAE loaded: start the app with --sae DIR to browse features")

    @app.get("/api/features")
    def features():
        need_sae()
        with lock:
            if "list" not in catalogue:  # the same scenes every time: rank once
                catalogue["list"] = feature_browser.list_features(vlm, sae)
        return {"site": sae.cfg.site, "d_sae": sae.cfg.d_sae, "scenes": len(feature_browser.SCENE_SEEDS),
                "features": catalogue["list"]}

    @app.get("/api/features/{feature}")
    def feature(feature: int):
        need_sae()
        if not 0 <= feature < sae.cfg.d_sae:
            raise HTTPException(404, f"feature {feature} does not exist: the SAE has features 0 to "
                                     f"{sae.cfg.d_sae - 1}")
        with lock:
            return feature_browser.feature_page(vlm, sae, feature)

    @app.post("/api/trace")
    def tracing(req: Trace):
        with lock:
            return trace(vlm, inputs(req.image, req.question), req.direction)

    @app.post("/api/knockout")
    def knocking_out(req: Knockout):
        with lock:
            return knockout(vlm, inputs(req.image, req.question), req.window)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def load_sae_or_none(path: str | Path | None) -> tuple[Any, str]:
    """An SAE from a folder for the app's feature panel, or (None, why not) when the SAE package
    or the folder is missing: the app then runs without that panel."""
    if path is None:
        return None, "no SAE given (--sae DIR)"
    try:
        from vlmscope.methods.sae import load_sae
    except ImportError as e:
        return None, f"the SAE package cannot be imported ({e})"
    if not Path(path).is_dir():
        return None, f"{path} is not a folder"
    try:
        return load_sae(path), f"SAE {path}"
    except (OSError, ValueError, KeyError) as e:
        return None, f"{path} could not be loaded as an SAE ({e})"
