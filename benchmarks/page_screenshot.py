"""The README's screenshot of the annotation page: the bundled model on a val/DAVIS photo.

Starts ``segany serve``'s app on loopback with the bundled segany-lite, opens the photo in
headless Chromium (Debian ``/usr/bin/chromium`` driven by Playwright, as in the browser test),
clicks once on each chosen object of the photo (the click protocol's first click; optionally
after "segment everything" as the overlay) and saves the page.

    nice -n 19 env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/page_screenshot.py
"""

from __future__ import annotations

import argparse
import socket
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

DAVIS = Path(__file__).resolve().parents[2] / "shared" / "data" / "val" / "DAVIS"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def main() -> None:
    import uvicorn
    from playwright.sync_api import sync_playwright

    from segany.evaluate import next_click
    from segany.server import create_app

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image", default="101")
    ap.add_argument(
        "--objects", nargs="+", default=["2:person"], help="ID:NAME of instances to click"
    )
    ap.add_argument("--everything", action="store_true", help="add the overlay first")
    ap.add_argument("--out", type=Path, default=Path("docs/annotation_page.png"))
    args = ap.parse_args()

    photo = DAVIS / "images" / f"{args.image}.jpg"
    instances = np.asarray(Image.open(DAVIS / "instances" / f"{args.image}.png"))

    app = create_app()  # the bundled model
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/"

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1320, "height": 700})
        page.goto(url)
        page.set_input_files("#file-input", str(photo))
        page.wait_for_selector("body[data-ready='1']", timeout=120000)
        box = page.locator("#ui-canvas").bounding_box()
        assert box is not None
        h, w = instances.shape
        sx, sy = box["width"] / w, box["height"] / h

        def screen(x: float, y: float) -> tuple[float, float]:
            return box["x"] + x * sx, box["y"] + y * sy

        def settle() -> None:
            page.wait_for_selector("body[data-busy='0']", timeout=120000)

        def name(text: str) -> None:
            field = page.locator("#objects li.active input[type=text]").first
            field.fill(text)
            field.press("Enter")

        if args.everything:  # "segment everything" as the background overlay
            page.select_option("#pps", "16")
            page.click("#everything")
            page.wait_for_selector("#status >> text=/Segment everything/", timeout=300000)
            settle()
        # One object per chosen instance: a click at the protocol's first click.
        for n, spec in enumerate(args.objects):
            k, label = spec.split(":", 1)
            if n:
                page.keyboard.press("n")
            y, x, _ = next_click(instances == int(k), np.zeros_like(instances, dtype=bool))
            page.mouse.click(*screen(x, y))
            settle()
            name(label)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(args.out))
        browser.close()
    server.should_exit = True
    thread.join(10)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
