"""The web app's JSON API (FastAPI's TestClient), checked against the library and the model."""

import io

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi", reason="the web app needs FastAPI: pip install -e '.[app]'")
pytest.importorskip("multipart", reason="uploads need python-multipart: pip install -e '.[app]'")

from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

import vlmscope as vs  # noqa: E402
from vlmscope.methods.lens import logit_lens  # noqa: E402
from vlmscope.report import app as webapp  # noqa: E402

QUESTION = "what colour is the circle ?"


@pytest.fixture(scope="module")
def client(vlm):
    return TestClient(webapp.create_app(vlm))


def _final_probs(vlm, image, question):
    """The plain transformers model's next-token distribution after the question."""
    x = vlm.prepare([image], [question])
    with torch.no_grad():
        logits = vlm.model(**x).logits  # (1, pos, vocab)
    return logits[0, int(x["attention_mask"][0].sum()) - 1].float().softmax(-1)


def _png(response) -> np.ndarray:
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    return np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB")).astype(int)


def test_page_and_assets_are_served_and_local(client):
    page = client.get("/")
    assert page.status_code == 200 and "<title>vlmscope</title>" in page.text
    for path, kind in (("/static/app.js", "javascript"), ("/static/app.css", "text/css")):
        r = client.get(path)
        assert r.status_code == 200 and kind in r.headers["content-type"] and len(r.text) > 500
    for name in ("index.html", "app.js", "app.css"):  # offline: nothing fetched from another host
        text = (webapp.STATIC / name).read_text()
        assert "http://" not in text and "https://" not in text and 'src="//' not in text


def test_info_describes_the_model(client, vlm):
    info = client.get("/api/info").json()
    assert info["model"] == repr(vlm) and info["layers"] == vlm.n_layers("lm") == 4
    assert info["sae"] is None and info["max_upload_bytes"] == 5 * 2**20
    assert len(info["questions"]) >= 3 and len(info["gallery"]) >= 3


def test_scene_is_the_shapes_world_scene_of_its_seed(client, scene):
    from vlmscope.data import answer_of, caption, sample_scene

    got = client.get("/api/scene/11").json()
    truth = sample_scene(np.random.default_rng(11))
    assert got["image"] == "scene-11" and got["caption"] == caption(truth)
    assert got["questions"], "a scene offers answerable questions"
    for q in got["questions"]:
        family = {"what colour": "colour", "what shape": "shape", "where is": "where", "how many": "count",
                  "is there": "exists"}[" ".join(q["text"].split()[:2])]
        answers = {a.answer for a in (answer_of(truth, family, s) for s in _slots(truth, family)) if a and
                   a.text == q["text"]}
        assert answers == {q["answer"]}
    # the picture shown is the model's view of the rendered scene (72 px: no resize, no crop)
    view = _png(client.get("/api/image/scene-11"))
    assert view.shape == (72, 72, 3) and np.abs(view - scene(11).astype(int)).max() <= 1


def _slots(scene, family):
    objs = scene.objects
    if family in ("colour", "count"):
        return [(o.shape,) for o in objs]
    if family == "shape":
        return [(o.colour,) for o in objs]
    return [(o.colour, o.shape) for o in objs]


def test_ask_gives_the_models_answer_and_its_probabilities(client, vlm, scene):
    got = client.post("/api/ask", json={"image": "scene-2", "question": QUESTION, "k": 4}).json()
    probs = _final_probs(vlm, scene(2), QUESTION)
    p, i = probs.topk(4)
    words = vlm.tokenizer.convert_ids_to_tokens(i.tolist())
    assert got["answer"] == words[0]
    assert [t["token"] for t in got["top"]] == words
    assert np.allclose([t["prob"] for t in got["top"]], p.tolist(), atol=1e-5)
    assert got["grid"] == [3, 3] and got["unknown_words"] == [] and got["sae"] is None
    roles = [t["role"] for t in got["tokens"]]
    assert roles == ["special"] + ["image"] * 9 + ["text"] * len(QUESTION.split())
    assert [(t["row"], t["col"]) for t in got["tokens"] if t["role"] == "image"] == \
        [(r, c) for r in range(3) for c in range(3)]


def test_patch_lens_is_the_logit_lens_at_that_patch(client, vlm, scene):
    got = client.post("/api/ask", json={"image": "scene-2", "question": QUESTION}).json()
    x = vlm.prepare([scene(2)], [QUESTION])
    ref = logit_lens(vlm, x, k=3)
    pos = vlm.positions(x)["lm"]
    assert len(got["lens"]["patches"]) == 9
    for patch in got["lens"]["patches"]:
        p = int(((pos.row[0] == patch["row"]) & (pos.col[0] == patch["col"])).nonzero()[0])
        assert patch["pos"] == p
        for li, words in enumerate(patch["top"]):
            assert [w["w"] for w in words] == [ref.token(int(t)) for t in ref.top_ids[li, 0, p]]
            assert np.allclose([w["p"] for w in words], ref.top_probs[li, 0, p].tolist(), atol=1e-6)
    # the lens at the last layer and last token is the model's own output distribution
    last = got["lens"]["last"][-1]
    assert [w["w"] for w in last] == [t["token"] for t in got["top"][:3]]


def test_unknown_words_are_reported(client):
    got = client.post("/api/ask", json={"image": "scene-2", "question": "what colour is the zebra ?"}).json()
    assert got["unknown_words"] == ["zebra"]


def test_trace_effects_obey_causality(client, vlm, scene):
    """Closed forms of noising the image tokens: the BOS token before the image never differs,
    and at the last layer only the last position reaches the answer."""
    q = {"image": "scene-4", "question": QUESTION}
    answer_prob = client.post("/api/ask", json={**q, "k": 1}).json()["top"][0]["prob"]
    for direction, at_last in (("denoise", 1.0), ("noise", 0.0)):
        got = client.post("/api/trace", json={**q, "direction": direction}).json()
        effect = np.array(got["effect"], dtype=float)  # (layer, position)
        assert got["layers"] == [0, 1, 2, 3] and got["positions"] == list(range(effect.shape[1]))
        assert len(got["tokens"]) == effect.shape[1] == 10 + len(QUESTION.split())
        assert abs(got["clean"] - answer_prob) < 1e-5 and abs(got["clean"] - got["corrupt"]) > 1e-6
        assert np.allclose(effect[:, 0], 0.0 if direction == "denoise" else 1.0, atol=1e-4)  # BOS
        assert np.isclose(effect[-1, -1], at_last, atol=1e-4)
        assert np.allclose(effect[-1, 1:10], 1.0 - at_last, atol=1e-4)  # image tokens at the last layer
        base = got["corrupt"] if direction == "denoise" else got["clean"]
        assert np.allclose(np.array(got["value"])[:, 0], base, atol=1e-6)


def test_knockout_matches_blocking_attention_directly(client, vlm, scene):
    q = {"image": "scene-4", "question": QUESTION}
    got = client.post("/api/knockout", json={**q, "window": 2}).json()
    assert got["starts"] == [0, 1, 2] and got["window"] == 2
    x = vlm.prepare([scene(4)], [QUESTION])
    answer = int(_final_probs(vlm, scene(4), QUESTION).argmax())
    assert abs(got["baseline"] - float(_final_probs(vlm, scene(4), QUESTION)[answer])) < 1e-5
    for s, value, rel in zip(got["starts"], got["value"], got["relative"], strict=True):
        out = vlm.run(x, [vs.knockout("image", "last", layers=range(s, s + 2))])
        prob = float(out.logits[0, -1].float().softmax(-1)[answer])
        assert abs(value - prob) < 1e-5
        assert abs(rel - (prob - got["baseline"]) / got["baseline"]) < 1e-4


def test_bad_requests_name_the_problem(client):
    r = client.post("/api/knockout", json={"image": "scene-4", "question": QUESTION, "window": 9})
    assert r.status_code == 400 and "between 1 and 4" in r.json()["detail"]
    r = client.post("/api/ask", json={"image": "upload-nothere", "question": QUESTION})
    assert r.status_code == 404 and "unknown image" in r.json()["detail"]
    assert client.post("/api/ask", json={"image": "scene-1", "question": ""}).status_code == 422
    r = client.post("/api/ask", json={"image": "scene-1", "question": "  "})
    assert r.status_code == 400 and "question is empty" in r.json()["detail"]
    r = client.post("/api/trace", json={"image": "scene-1", "question": "q", "direction": "up"})
    assert r.status_code == 422


def test_uploads_are_decoded_as_the_model_sees_them(client, vlm, scene, image_file):
    r = client.post("/api/upload", files={"file": ("scene.png", image_file(scene(7)), "image/png")})
    assert r.status_code == 200
    got = r.json()
    assert (got["width"], got["height"], got["name"]) == (72, 72, "scene.png")
    assert np.abs(_png(client.get(f"/api/image/{got['image']}")) - scene(7).astype(int)).max() <= 1
    ask = client.post("/api/ask", json={"image": got["image"], "question": QUESTION}).json()
    best = int(_final_probs(vlm, scene(7), QUESTION).argmax())
    assert ask["answer"] == vlm.tokenizer.convert_ids_to_tokens(best)
    # transparent pixels read as white; greyscale and larger images are accepted and resized
    rgba = np.zeros((72, 72, 4), np.uint8)
    rgba[:, 36:] = (200, 30, 30, 255)
    view = _png(client.get(f"/api/image/{_upload(client, image_file(rgba))}"))
    assert (view[:, :30] >= 254).all() and np.abs(view[:, 42:] - (200, 30, 30)).max() <= 1
    grey = np.full((100, 150), 77, np.uint8)
    view = _png(client.get(f"/api/image/{_upload(client, image_file(grey))}"))
    assert view.shape == (72, 72, 3) and np.abs(view - 77).max() <= 1


def _upload(client, data: bytes, name: str = "x.png") -> str:
    r = client.post("/api/upload", files={"file": (name, data, "application/octet-stream")})
    assert r.status_code == 200, r.text
    return r.json()["image"]


@pytest.mark.parametrize("case, status, words", [
    ("text", 415, "not an image"),
    ("cmyk", 415, "mode 'CMYK' is not supported"),
    ("16bit", 415, "mode 'I;16' is not supported"),
    ("truncated", 400, "could not be decoded"),
    ("empty", 400, "empty"),
    ("large", 413, "too large"),
])
def test_bad_uploads_get_a_clear_message_and_the_app_keeps_serving(client, scene, image_file, case, status,
                                                                    words):
    data = {
        "text": lambda: b"this is not a picture\n" * 20,
        "cmyk": lambda: image_file(scene(1), mode="CMYK", fmt="JPEG"),
        "16bit": lambda: image_file(np.full((20, 20), 40000, np.uint16)),
        "truncated": lambda: image_file(scene(1))[:300],
        "empty": lambda: b"",
        "large": lambda: b"\x89PNG\r\n\x1a\n" + bytes(5 * 2**20 + 10),
    }[case]()
    r = client.post("/api/upload", files={"file": ("upload.bin", data, "image/png")})
    assert r.status_code == status and words in r.json()["detail"], r.text
    assert client.get("/api/info").status_code == 200
    assert client.post("/api/ask", json={"image": "scene-1", "question": QUESTION}).status_code == 200


def test_upload_form_must_carry_one_file(client, image_file, scene):
    r = client.post("/api/upload", data={"note": "no file"})
    assert r.status_code == 400 and "'file'" in r.json()["detail"]
    two = [("file", (f"{i}.png", image_file(scene(i)), "image/png")) for i in (1, 2)]
    assert client.post("/api/upload", files=two).status_code == 400


def test_decode_image_limits_size_before_decoding():
    with pytest.raises(webapp.UploadError, match="too large") as e:
        webapp.decode_image(bytes(webapp.MAX_UPLOAD_BYTES + 1))
    assert e.value.status == 413


def test_only_the_latest_uploads_are_kept(client, image_file, scene):
    first = _upload(client, image_file(scene(3)))
    for _ in range(webapp.KEPT_UPLOADS):
        _upload(client, image_file(scene(3)))
    assert client.get(f"/api/image/{first}").status_code == 404


def test_sae_panel_reads_the_saes_features_at_each_patch(vlm, scene):
    sae_pkg = pytest.importorskip("vlmscope.methods.sae", reason="the SAE package is not there yet")
    sae = sae_pkg.build_sae(sae_pkg.SAEConfig("relu", d_in=128, d_sae=64, site="lm.blocks.1.resid_post"))
    sae.init_weights(torch.Generator().manual_seed(0))
    with torch.no_grad():
        sae.b_enc.fill_(0.05)
    client = TestClient(webapp.create_app(vlm, sae))
    assert client.get("/api/info").json()["sae"] == {"site": "lm.blocks.1.resid_post", "d_sae": 64}
    got = client.post("/api/ask", json={"image": "scene-5", "question": QUESTION}).json()["sae"]
    x = vlm.prepare([scene(5)], [QUESTION])
    _, cache = vlm.run_with_cache(x, "lm.blocks.1.resid_post")
    h = sae.encode(cache["lm.blocks.1.resid_post"][0]).detach()  # (pos, d_sae)
    assert got["site"] == "lm.blocks.1.resid_post" and len(got["patches"]) == 9
    for patch in got["patches"]:
        p = 1 + 3 * patch["row"] + patch["col"]  # <s> then the 9 image tokens in reading order
        acts, ids = h[p].topk(5)
        want = [(int(i), float(a)) for a, i in zip(acts, ids, strict=True) if a > 0]
        assert [f["id"] for f in patch["features"]] == [i for i, _ in want] and want
        assert np.allclose([f["act"] for f in patch["features"]], [a for _, a in want], atol=1e-5)


def test_models_and_saes_the_app_cannot_serve_are_refused(vlm):
    class Elsewhere:
        class cfg:
            site, d_in, d_sae = "lm.blocks.9.resid_post", 128, 8

    with pytest.raises(vs.InputError, match="lm.blocks.9.resid_post"):
        webapp.create_app(vlm, Elsewhere())
    with pytest.raises(vs.InputError, match="processor"):
        webapp.create_app(vs.load(vlm.model))
    from vlmscope import testing

    with pytest.raises(vs.InputError, match="generative VLM"):
        webapp.create_app(vs.load(testing.tiny_clip()))


def test_load_sae_or_none_explains_why_not(tmp_path):
    assert webapp.load_sae_or_none(None) == (None, "no SAE given (--sae DIR)")
    sae, why = webapp.load_sae_or_none(tmp_path / "missing")
    assert sae is None and "is not a folder" in why
    sae, why = webapp.load_sae_or_none(tmp_path)
    assert sae is None and ("could not be loaded" in why or "cannot be imported" in why)


def test_serve_command_defaults():
    from vlmscope.cli import build_parser, cmd_serve

    args = build_parser().parse_args(["serve"])
    assert (args.model, args.host, args.port, args.sae) == ("shapes-llava", "127.0.0.1", 8000, None)
    assert args.func is cmd_serve
    args = build_parser().parse_args(["serve", "--model", "runs/x", "--port", "9001", "--sae", "saes/a"])
    assert (args.model, args.port, args.sae) == ("runs/x", 9001, "saes/a")


def test_a_model_failure_is_reported_and_the_app_keeps_serving(vlm, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("shape mismatch")

    client = TestClient(webapp.create_app(vlm))
    monkeypatch.setattr(webapp, "knockout_sweep", fail)
    r = client.post("/api/knockout", json={"image": "scene-1", "question": QUESTION})
    assert r.status_code == 500 and r.json()["detail"].endswith("shape mismatch")
    assert client.post("/api/ask", json={"image": "scene-1", "question": QUESTION}).status_code == 200


# --- the SAE feature browser ----------------------------------------------------------------------

SAE_SITE = "vision.blocks.1.resid_post"


@pytest.fixture(scope="module")
def sae():
    """A random ReLU SAE on the vision tower with every even feature dead."""
    sae_pkg = pytest.importorskip("vlmscope.methods.sae", reason="the SAE package is not there yet")
    sae = sae_pkg.build_sae(sae_pkg.SAEConfig("relu", d_in=96, d_sae=64, site=SAE_SITE))
    sae.init_weights(torch.Generator().manual_seed(0))
    with torch.no_grad():
        sae.b_enc[::2] = -1e3
    return sae


@pytest.fixture(scope="module")
def sae_client(vlm, sae):
    return TestClient(webapp.create_app(vlm, sae))


def _reference_maps(vlm, sae, scene, seeds) -> torch.Tensor:
    """(scene, rows, cols, d_sae) SAE activations read straight from the cache at each patch."""
    x = vlm.prepare([scene(s) for s in seeds], [QUESTION] * len(seeds))
    _, cache = vlm.run_with_cache(x, SAE_SITE)
    pos = vlm.positions(x)[vlm.site(SAE_SITE).stream]
    h = sae.encode(cache[SAE_SITE].float()).detach()  # (scene, pos, d_sae)
    out = torch.full((len(seeds), 3, 3, sae.cfg.d_sae), float("nan"))
    for b, p in (pos.row >= 0).nonzero().tolist():
        out[b, pos.row[b, p], pos.col[b, p]] = h[b, p]
    assert not out.isnan().any()
    return out


def test_feature_list_ranks_the_features_that_fire_most(sae_client, vlm, sae, scene):
    from vlmscope.report.feature_browser import LISTED, SCENE_SEEDS

    got = sae_client.get("/api/features").json()
    assert (got["site"], got["d_sae"], got["scenes"]) == (SAE_SITE, 64, len(SCENE_SEEDS))
    freq = (_reference_maps(vlm, sae, scene, SCENE_SEEDS) > 0).float().mean((0, 1, 2))  # (d_sae,)
    ids = [f["id"] for f in got["features"]]
    assert len(ids) == LISTED and all(i % 2 == 1 for i in ids)  # the dead (even) features are left out
    assert np.allclose([f["frequency"] for f in got["features"]], freq[ids].tolist(), atol=1e-6)
    unlisted = [i for i in range(64) if i not in ids]
    assert min(freq[ids]) >= max(freq[unlisted])
    assert all(f["max"] > 0 and (f["label"] == "" or "=" in f["label"]) for f in got["features"])


def test_feature_page_shows_its_top_scenes_with_the_activation_at_each_patch(sae_client, vlm, sae, scene):
    from vlmscope.methods.explain.concepts import all_concepts, concept_masks
    from vlmscope.methods.explain.describe import dissect
    from vlmscope.report.feature_browser import ATTRIBUTES, SCENE_SEEDS, TOP, scenes_of

    feature = sae_client.get("/api/features").json()["features"][0]["id"]
    got = sae_client.get(f"/api/features/{feature}").json()
    maps = _reference_maps(vlm, sae, scene, SCENE_SEEDS)[..., feature]  # (scene, rows, cols)
    peak = maps.amax((1, 2))
    best = peak.argsort(descending=True)[:TOP].tolist()
    assert (got["id"], got["site"], got["grid"]) == (feature, SAE_SITE, [3, 3])
    assert [t["seed"] for t in got["top"]] == [SCENE_SEEDS[s] for s in best]
    assert [t["image"] for t in got["top"]] == [f"scene-{SCENE_SEEDS[s]}" for s in best]
    for t, s in zip(got["top"], best, strict=True):
        assert np.allclose(t["map"], maps[s].tolist(), atol=1e-5) and np.isclose(t["act"], float(peak[s]))
    assert np.isclose(got["max"], float(peak.max())) and np.isclose(got["frequency"], float((maps > 0).float().mean()))
    masks = concept_masks(scenes_of(SCENE_SEEDS), (3, 3), all_concepts(ATTRIBUTES))
    assert got["label"] == dissect(maps, masks).labels[0]
    assert _png(sae_client.get(f"/api/image/{got['top'][0]['image']}")).shape == (72, 72, 3)


def test_feature_browser_refuses_what_it_cannot_show(sae_client, client):
    r = sae_client.get("/api/features/64")
    assert r.status_code == 404 and "features 0 to 63" in r.json()["detail"]
    assert sae_client.get("/api/features/-1").status_code == 404
    assert sae_client.get("/api/features/first").status_code == 422
    for path in ("/api/features", "/api/features/3"):
        r = client.get(path)
        assert r.status_code == 404 and "no SAE loaded" in r.json()["detail"]
    dead = sae_client.get("/api/features/0").json()  # a dead feature: a page with no scenes
    assert dead["top"] == [] and dead["frequency"] == 0 and dead["label"] == ""
