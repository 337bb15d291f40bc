"""The annotation page in headless Chromium (Debian ``chromium`` driven by Playwright).

A real server (uvicorn on loopback, tiny random model) serves the page; the test opens an
image, clicks, checks that a mask is drawn, switches candidates, adds a negative click,
undoes and redoes, adds a second object with a box, runs "segment everything", exports COCO
JSON (checked with pycocotools) and a label map, and keeps a screenshot in artifacts/.

Skipped only when Chromium or Playwright is missing AND ``SEGANY_REQUIRE_BROWSER`` is unset
(scripts/test sets it, so CI fails instead of skipping).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY, randomize_, synthetic_image
from PIL import Image

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
H, W = 300, 450


def _missing() -> str | None:
    if not (Path(CHROMIUM).is_file() or shutil.which("chromium")):
        return f"{CHROMIUM} not found (apt-get install chromium)"
    for module in ("playwright", "uvicorn", "fastapi"):
        try:
            __import__(module)
        except ImportError:
            return f"{module} is not installed (pip install -r requirements-dev.txt)"
    return None


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    reason = _missing()
    if reason is not None:
        if os.environ.get("SEGANY_REQUIRE_BROWSER"):
            pytest.fail(f"browser test required (SEGANY_REQUIRE_BROWSER) but {reason}")
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    executable = CHROMIUM if Path(CHROMIUM).is_file() else shutil.which("chromium")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    import uvicorn

    from segany.modeling import build_sam
    from segany.server import ServerSettings, create_app

    app = create_app(
        randomize_(build_sam(TINY), seed=5).eval(),
        ServerSettings(max_points_per_side=16),
    )
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(10)
    sock.close()


def wait_for_mask(page, previous: str | None = None) -> int:
    """Waits until no request is in flight and a mask is painted (different from before)."""
    selector = "body[data-busy='0'][data-mask-pixels]:not([data-mask-pixels='0'])"
    if previous is not None:
        selector += f":not([data-mask-pixels='{previous}'])"
    page.wait_for_selector(selector, timeout=20000)
    return int(page.get_attribute("body", "data-mask-pixels"))


def candidate_labels(page) -> list[str]:
    return [b.inner_text() for b in page.query_selector_all("#candidates button")]


def test_annotate_click_undo_export(browser, server, tmp_path):
    from pycocotools.coco import COCO

    photo = tmp_path / "photo.png"
    Image.fromarray(synthetic_image(H, W, seed=3)).save(photo)
    context = browser.new_context(viewport={"width": 1400, "height": 820}, accept_downloads=True)
    page = context.new_page()
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))

    page.goto(server + "/")
    assert "Keyboard and mouse" in (page.text_content("aside") or "")
    page.set_input_files("#file-input", str(photo))
    page.wait_for_selector("body[data-ready='1']", timeout=20000)

    # One click: three candidates, the best one drawn.
    canvas = page.locator("#ui-canvas")
    box = canvas.bounding_box()
    assert box is not None

    def at(fx: float, fy: float) -> tuple[float, float]:
        return box["x"] + box["width"] * fx, box["y"] + box["height"] * fy

    page.mouse.click(*at(0.4, 0.5))
    first = wait_for_mask(page)
    assert len(candidate_labels(page)) == 3
    assert "mask in" in page.inner_text("#timing")

    # Switch candidates with the keyboard.
    page.keyboard.press("1")
    page.wait_for_selector("#candidates button.active >> text=/^1 ·/")
    page.keyboard.press("2")
    page.wait_for_selector("#candidates button.active >> text=/^2 ·/")

    # A negative (right) click: two prompts -> one mask.
    x, y = at(0.7, 0.3)
    page.mouse.click(x, y, button="right")
    page.wait_for_selector("#candidates button:only-child", timeout=20000)
    wait_for_mask(page)

    # Undo brings back the three candidates, redo the single mask.
    page.keyboard.press("Control+z")
    page.wait_for_selector("#candidates button:nth-child(3)")
    page.keyboard.press("Control+Shift+z")
    page.wait_for_selector("#candidates button:only-child")

    # A second object from a drag (box), renamed.
    page.keyboard.press("n")
    assert len(page.query_selector_all("#objects li")) == 2
    before = page.get_attribute("body", "data-mask-pixels")
    page.mouse.move(*at(0.1, 0.15))
    page.mouse.down()
    page.mouse.move(*at(0.3, 0.3), steps=5)
    page.mouse.move(*at(0.45, 0.55), steps=5)
    page.mouse.up()
    wait_for_mask(page, previous=before)
    name = page.locator("#objects li.active input[type=text]").first
    name.fill("the box")
    name.press("Enter")

    # Segment everything shows its overlay.
    page.click("#everything")
    page.wait_for_selector("#status >> text=/Segment everything: \\d+ masks/", timeout=30000)

    # COCO export: a valid dataset with both objects.
    with page.expect_download() as download:
        page.click("#export-coco")
    coco_path = tmp_path / "export.json"
    download.value.save_as(coco_path)
    data = json.loads(coco_path.read_text())
    coco = COCO(str(coco_path))
    assert len(data["images"]) == 1
    assert (data["images"][0]["height"], data["images"][0]["width"]) == (H, W)
    assert data["images"][0]["file_name"] == "photo.png"
    anns = coco.loadAnns(coco.getAnnIds())
    assert [a["name"] for a in anns] == ["object 1", "the box"]
    assert all(a["area"] > 0 and a["category_id"] == 1 for a in anns)
    assert first > 0

    # Label map export: one label per object.
    with page.expect_download() as download:
        page.click("#export-labels")
    labels = np.asarray(Image.open(io.BytesIO(Path(download.value.path()).read_bytes())))
    assert labels.shape == (H, W) and set(np.unique(labels)) <= {0, 1, 2}

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "page_browser.png"))
    assert not problems, problems
    context.close()


def test_zoom_in_toggle_feeds_back_the_chosen_logits(browser, server, tmp_path):
    """With zoom-in on, predictions ask the server to refine on a crop, and each click after
    the first sends the low-res logits of the candidate shown and the crop of that answer."""
    photo = tmp_path / "photo.png"
    Image.fromarray(synthetic_image(H, W, seed=5)).save(photo)
    context = browser.new_context(viewport={"width": 1400, "height": 820})
    page = context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.goto(server + "/")
    page.set_input_files("#file-input", str(photo))
    page.wait_for_selector("body[data-ready='1']", timeout=20000)
    page.check("#zoom-in")
    box = page.locator("#ui-canvas").bounding_box()
    assert box is not None

    def at(fx: float, fy: float) -> tuple[float, float]:
        return box["x"] + box["width"] * fx, box["y"] + box["height"] * fy

    def predict_body(action) -> dict:
        with page.expect_request(lambda r: r.url.endswith("/predict")) as request:
            action()
        return request.value.post_data_json

    first = predict_body(lambda: page.mouse.click(*at(0.4, 0.5)))
    assert first["zoom_in"] is True and first["return_low_res_logits"] is True
    assert "mask_input" not in first
    wait_for_mask(page)
    page.keyboard.press("2")
    page.wait_for_selector("#candidates button.active >> text=/^2 ·/")
    second = predict_body(lambda: page.mouse.click(*at(0.7, 0.3), button="right"))
    assert second["zoom_in"] is True and len(second["points"]) == 2
    assert isinstance(second["mask_input"], str) and len(second["mask_input"]) > 1000
    # ... with the crop the first answer was refined on, so the server can reuse its encoding
    crop = second["zoom_crop"]
    assert len(crop) == 4 and 0 <= crop[0] < crop[2] <= W and 0 <= crop[1] < crop[3] <= H
    page.wait_for_selector("#candidates button:only-child", timeout=20000)
    # Z turns it off again: plain requests.
    page.locator("#ui-canvas").focus()
    page.keyboard.press("z")
    assert not page.is_checked("#zoom-in")
    third = predict_body(lambda: page.mouse.click(*at(0.5, 0.6)))
    assert "zoom_in" not in third and "mask_input" not in third
    assert not problems, problems
    context.close()
