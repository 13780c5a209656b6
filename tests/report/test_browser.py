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
    """The app on 127.0.0.1 at a free port, served by uvicorn in a background thread."""
    from vlmscope.report.app import create_app

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(create_app(vlm), log_level="warning"))
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


@pytest.fixture(scope="module")
def results(tmp_path_factory, vlm, monkeypatch_module):
    """A small results folder written by run_demo (lens + patching stages) on the random model."""
    from vlmscope import zoo
    from vlmscope.experiments.demo import run_demo

    monkeypatch_module.setattr(zoo, "load", lambda name: vlm)
    return run_demo(tmp_path_factory.mktemp("results"), stages=("lens", "patching"), progress=False)


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
    assert len(images) >= 5, images  # entropy, patch words, sweep, AtP sweep, knockout windows
    assert all(complete and width > 0 for complete, width, _ in images), images
    assert page.locator("#scorecard").count() == 1 and page.locator("section#lens").count() == 1
    assert page.locator("section#patching").count() == 1
    _screenshot(page, tmp_path, "report.png", full_page=True)
    assert errors == [], errors
    page.close()
