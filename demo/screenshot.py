"""Drive the demo in a real headless browser: upload images, classify, read both label panels,
save a screenshot. The browser test and the README screenshot (docs/demo.png) share this path:

    python -m dgkit.demo.screenshot RUN IMAGE [IMAGE ...] --out docs/demo.png

Uses Playwright for Python with a system Chromium (`apt-get install chromium`), never a browser
that Playwright downloads: set DGKIT_CHROMIUM to use another binary.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

# Without the background-networking switches Chromium keeps calling home, which on a closed
# network only burns CPU and fills logs.
CHROMIUM_ARGS = ("--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--disable-dev-shm-usage")


def find_chromium() -> str | None:
    """A Chromium binary: $DGKIT_CHROMIUM, else chromium / chromium-browser on PATH."""
    env = os.environ.get("DGKIT_CHROMIUM")
    if env:
        return env if Path(env).is_file() else None
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def missing_browser() -> str:
    """Why a browser run cannot happen here ('' when it can)."""
    import importlib.util

    if importlib.util.find_spec("playwright") is None:
        return "Playwright for Python is not installed (pip install playwright)"
    if find_chromium() is None:
        return "no Chromium binary (apt-get install chromium, or set DGKIT_CHROMIUM)"
    return ""


@dataclass
class Capture:
    teacher: list[str]  # text of each teacher label panel (or its 'unavailable' note)
    student: list[str]  # text of each student label panel
    status: str
    screenshot: Path


def capture(url: str, images: Sequence[str | Path], out: str | Path, *, width: int = 1360,
            timeout_s: float = 90, full_page: bool = True) -> Capture:
    """Open `url`, upload `images`, press Classify, wait for one student panel per image (and
    the teacher's), then save a screenshot to `out`."""
    from playwright.sync_api import sync_playwright

    chromium = find_chromium()
    if chromium is None:
        raise RuntimeError(missing_browser())
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    ms = int(timeout_s * 1000)
    n = len(images)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True,
                                     args=list(CHROMIUM_ARGS))
        try:
            page = browser.new_page(viewport={"width": width, "height": 900},
                                    device_scale_factor=1)
            page.set_default_timeout(ms)
            page.goto(url, wait_until="load")
            page.locator("#dg-classify").wait_for()
            page.locator("#dg-files input[type=file]").set_input_files([str(p) for p in images])
            # gradio lists each uploaded file by name once the upload has finished
            for p in images:
                page.locator(f'#dg-files [aria-label="{Path(p).name}"]').first.wait_for()
            page.locator("#dg-classify").click()
            page.locator(".dg-result").nth(n - 1).wait_for()
            ok = n - page.locator(".dg-pill.error").count()
            page.wait_for_function(
                "n => document.querySelectorAll('.dg-student').length >= n && "
                "document.querySelectorAll('.dg-teacher, .dg-teacher-absent').length >= n",
                arg=ok)
            student = page.locator(".dg-student")
            teacher = page.locator(".dg-teacher, .dg-teacher-absent")
            page.wait_for_timeout(400)  # let the bars finish their transition
            result = Capture(teacher=[t.inner_text() for t in teacher.all()],
                             student=[s.inner_text() for s in student.all()],
                             status=page.locator("#dg-status").inner_text(), screenshot=out)
            page.screenshot(path=str(out), full_page=full_page)
        finally:
            browser.close()
    return result


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Screenshot the dgkit demo of a run.")
    parser.add_argument("run", help="run directory")
    parser.add_argument("images", nargs="+", help="images to upload")
    parser.add_argument("--out", default="docs/demo.png", help="PNG to write")
    parser.add_argument("--artifact", default=None, help="torch | onnx | fp16 | int8 | trt")
    parser.add_argument("--width", type=int, default=1360)
    args = parser.parse_args(argv)
    reason = missing_browser()
    if reason:
        print(f"error: {reason}", file=sys.stderr)
        return 2
    from dgkit.demo.app import build_app, launch

    app = build_app(args.run, args.artifact)
    url = launch(app, port=free_port(), block=False, quiet=True)
    try:
        result = capture(url, args.images, args.out, width=args.width)
    finally:
        app.close()
    print(f"wrote {result.screenshot}: {result.status}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
