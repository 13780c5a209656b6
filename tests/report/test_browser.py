"""The web app and the HTML report in a real browser: Playwright driving Debian's Chromium headless.

Skipped when Playwright or /usr/bin/chromium is missing (CI installs both: `apt-get install -y
chromium` and `pip install playwright`; Playwright's own browser download is not used). Screenshots
go to the test's tmp dir and to test-artifacts/ at the repository root, and must not be blank.
"""

import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
QUESTION = "what colour is the circle ?"

playwright_api = pytest.importorskip("playwright.sync_api",
                                     reason="Playwright is not installed: pip install playwright")
pytest.importorskip("fastapi", reason="the web app needs FastAPI: pip install -e '.[app]'")
uvicorn = pytest.importorskip("uvicorn", reason="the web app needs uvicorn: pip install -e '.[app]'")
if not CHROMIUM.exists():
    pytest.skip("Debian's Chromium is not installed (apt-get install -y chromium)", allow_module_level=True)


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def server(vlm):
    from vlmscope.report.app import create_app

    yield from _serve(create_app(vlm))


@pytest.fixture(scope="module")
def sae_server(vlm):
    """The app with a random ReLU SAE on the vision tower (every even feature dead)."""
    from vlmscope.methods.sae import SAEConfig, build_sae
    from vlmscope.report.app import create_app

    sae = build_sae(SAEConfig("relu", d_in=96, d_sae=64, site="vision.blocks.1.resid_post"))
    sae.init_weights(torch.Generator().manual_seed(0))
    with torch.no_grad():
        sae.b_enc[::2] = -1e3
    yield from _serve(create_app(vlm, sae))


def _serve(app):
    """The app on 127.0.0.1 at a free port, served by uvicorn in a background thread."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(10)
    sock.close()


def _watch(page) -> list[str]:
    """Collect the page's console errors and uncaught exceptions."""
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(f"uncaught: {e}"))
    return errors


def _screenshot(page, tmp_path: Path, name: str, full_page: bool = False) -> Path:
    """Save a screenshot in tmp_path and test-artifacts/, and check it is not blank."""
    from PIL import Image

    path = tmp_path / name
    page.screenshot(path=str(path), full_page=full_page)
    pixels = np.asarray(Image.open(path).convert("L"), dtype=float)
    assert pixels.std() > 10, f"{name} looks blank (pixel std {pixels.std():.1f})"
    assert len(np.unique(pixels)) > 20, f"{name} has almost no distinct grey levels"
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copy(path, ARTIFACTS / name)
    return path


def test_app_in_the_browser(browser, server, vlm, scene, image_file, tmp_path):
    from vlmscope.methods.lens import logit_lens

    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    errors = _watch(page)
    page.goto(server)
    page.wait_for_function("document.getElementById('image').naturalWidth > 0")
    page.wait_for_function("[...document.querySelectorAll('#gallery img')].every(i => i.naturalWidth > 0)")
    assert "LlavaForConditionalGeneration" in page.inner_text("#model")
    assert page.locator("#examples .chip").count() > 0  # the default scene's questions
    _screenshot(page, tmp_path, "app-start.png")

    # upload a picture and ask about it: the answer is the model's own
    upload = tmp_path / "scene-7.png"
    upload.write_bytes(image_file(scene(7)))
    page.set_input_files("#upload", str(upload))
    page.wait_for_function("document.getElementById('image-caption').textContent.includes('scene-7.png')")
    page.wait_for_function("document.getElementById('image').naturalWidth > 0")
    page.fill("#question", QUESTION)
    page.click("#ask")
    page.wait_for_selector("#answer-panel:not([hidden])")
    x = vlm.prepare([scene(7)], [QUESTION])
    with torch.no_grad():
        best = int(vlm.model(**x).logits[0, -1].argmax())
    assert page.inner_text("#answer") == vlm.tokenizer.convert_ids_to_tokens(best)
    assert page.locator("#top .bar").count() == 5

    # hover a patch: its per-layer lens words are the logit lens at that patch
    assert page.locator("#patches .patch").count() == 9
    page.hover('.patch[data-row="1"][data-col="2"]')
    page.wait_for_selector("#patch-panel:not([hidden])")
    lens = logit_lens(vlm, x, k=3)
    p = 1 + 3 * 1 + 2  # <s>, then the image tokens in reading order
    shown = page.locator("#lens-table tr").all_inner_texts()[1:]
    assert len(shown) == 4
    for li, row in enumerate(shown):
        assert row.split()[1] == lens.token(int(lens.top_ids[li, 0, p, 0])), row
    assert "No SAE loaded" in page.inner_text("#sae-features")
    page.click("#features-panel > summary")
    page.wait_for_function("document.getElementById('feature-list').textContent.includes('No SAE loaded')")
    _screenshot(page, tmp_path, "app-hover-patch.png")

    # the causal-tracing grid: click a cell to read its effect
    page.click("#trace")
    page.wait_for_selector("table.trace td.cell")
    assert page.locator("table.trace td.cell").count() == 4 * x["input_ids"].shape[1]
    last = x["input_ids"].shape[1] - 1
    page.click(f'td.cell[data-layer="3"][data-pos="{last}"]')
    assert "effect 1.000" in page.inner_text("#cell-detail")  # restoring the last state restores all
    page.click('td.cell[data-layer="0"][data-pos="0"]')
    assert "effect 0.000" in page.inner_text("#cell-detail")  # the BOS token is never noised

    # knockout windows
    page.click("#knockout")
    page.wait_for_selector("#knockout-result .bar")
    assert page.locator("#knockout-result .bar").count() == 4
    _screenshot(page, tmp_path, "app-trace-knockout.png", full_page=True)
    assert errors == [], errors

    # a bad upload: a clear message, and the app goes on answering
    bad = tmp_path / "notes.txt"
    bad.write_text("not a picture\n" * 10)
    page.set_input_files("#upload", str(bad))
    page.wait_for_selector("#notice:not([hidden])")
    assert "not an image" in page.inner_text("#notice")
    _screenshot(page, tmp_path, "app-bad-upload.png")
    page.click("#ask")
    page.wait_for_function("document.getElementById('notice').hidden")
    assert page.inner_text("#answer") == vlm.tokenizer.convert_ids_to_tokens(best)
    # the refused upload's 415 is the only console error Chromium may log
    assert all("status of 415" in e for e in errors), errors
    page.close()


def test_features_in_the_browser(browser, sae_server, tmp_path):
    """Open the feature browser, click a feature: its top scenes load with a heat cell per patch;
    and a feature in the hover panel opens its page."""
    import json
    import urllib.request

    def api(path):
        with urllib.request.urlopen(sae_server + path) as r:
            return json.load(r)

    listed = api("/api/features")["features"]
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    errors = _watch(page)
    page.goto(sae_server)
    page.wait_for_function("document.getElementById('image').naturalWidth > 0")
    page.click("#features-panel > summary")
    page.wait_for_selector("#feature-list .feature")
    buttons = page.locator("#feature-list .feature")
    assert buttons.count() == len(listed) == 24
    assert buttons.first.get_attribute("data-feature") == str(listed[0]["id"])

    second = listed[1]["id"]
    want = api(f"/api/features/{second}")
    page.click(f'.feature[data-feature="{second}"]')
    page.wait_for_selector("#feature-detail:not([hidden])")
    page.wait_for_function("[...document.querySelectorAll('#feature-scenes img')].every(i => i.naturalWidth > 0)")
    assert page.inner_text("#feature-title") == f"Feature {second} at vision.blocks.1.resid_post"
    cards = page.locator("#feature-scenes .feature-scene")
    assert cards.count() == len(want["top"]) == 8
    assert [cards.nth(i).get_attribute("data-seed") for i in range(8)] == [str(t["seed"]) for t in want["top"]]
    assert page.locator("#feature-scenes .heat > div").count() == 8 * 9
    shade = page.locator("#feature-scenes .heat").first.evaluate(  # the first scene's hottest patch is opaque-ish
        "h => Math.max(...[...h.children].map(c => parseFloat(getComputedStyle(c).backgroundColor.split(',')[3])))")
    assert shade == pytest.approx(0.85, abs=0.01)
    page.locator("#feature-scenes .feature-scene").first.scroll_into_view_if_needed()
    _screenshot(page, tmp_path, "app-features.png", full_page=True)

    # a click on a scene opens it above; a feature in the hover panel opens its page
    cards.first.click()
    page.wait_for_function(f"document.getElementById('seed').value === '{want['top'][0]['seed']}'")
    page.fill("#question", QUESTION)
    page.click("#ask")
    page.wait_for_selector("#answer-panel:not([hidden])")
    page.hover('.patch[data-row="0"][data-col="0"]')
    page.wait_for_selector("#sae-features .bar.link")
    first = page.locator("#sae-features .bar.link .label").first.inner_text().lstrip("#")
    page.locator("#sae-features .bar.link").first.click()
    page.wait_for_function(f"document.getElementById('feature-title').textContent.startsWith('Feature {first} ')")
    assert errors == [], errors
    page.close()


@pytest.fixture(scope="module")
def results(tmp_path_factory, vlm, monkeypatch_module):
    """A small results folder written by run_demo (lens + patching stages) on the random model."""
    from vlmscope import zoo
    from vlmscope.experiments.demo import run_demo

    monkeypatch_module.setattr(zoo, "load", lambda name: vlm)
    return run_demo(tmp_path_factory.mktemp("results"), stages=("lens", "patching", "sae"), progress=False)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_report_in_the_browser(browser, results, tmp_path):
    index = results / "index.html"
    assert index.exists()
    page = browser.new_page(viewport={"width": 1100, "height": 900})
    errors = _watch(page)
    page.goto(index.as_uri())
    page.wait_for_load_state("load")
    images = page.eval_on_selector_all("img", "imgs => imgs.map(i => [i.complete, i.naturalWidth, i.alt])")
    assert len(images) >= 7, images  # entropy, patch words, sweep, AtP sweep, knockout windows, SAE
    assert all(complete and width > 0 for complete, width, _ in images), images
    assert page.locator("#scorecard").count() == 1 and page.locator("section#lens").count() == 1
    assert page.locator("section#patching").count() == 1
    grid = page.locator('section#sae img[alt*="most frequent SAE features"]')
    assert grid.count() == 1 and grid.evaluate("i => i.naturalHeight") > 1000  # 8 rows of 4 scenes
    _screenshot(page, tmp_path, "report.png", full_page=True)
    assert errors == [], errors
    page.close()
