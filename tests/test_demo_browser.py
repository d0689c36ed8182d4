"""The demo in a real browser: Debian's Chromium, headless, driven by Playwright for Python.

Upload two images, press Classify, wait for the teacher's and the student's label panels, check
their text against the serve Predictor, and keep a screenshot under the test's tmp dir. The same
code (`dgkit.demo.screenshot.capture`) makes the README's docs/demo.png.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("gradio", reason="needs the 'demo' extra (gradio)")

from dgkit.demo.screenshot import capture, missing_browser  # noqa: E402

REASON = missing_browser()
pytestmark = pytest.mark.skipif(bool(REASON), reason=f"no real browser here: {REASON}")

import test_demo  # noqa: E402  (the run it builds is shared, built once per session)

from dgkit.serve import Predictor  # noqa: E402


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_domains, tiny_teacher) -> Iterator[tuple[str, Path]]:
    run = test_demo.exported_run(tmp_path_factory, tiny_domains, tiny_teacher)
    url, app = test_demo.start(run)
    try:
        yield url, run
    finally:
        app.close()


def test_browser_upload_shows_both_label_panels(served, tiny_domains, tmp_path):
    url, run = served
    images = [tiny_domains / "sketch" / "circle" / "004.png",
              tiny_domains / "photo" / "square" / "005.png"]
    shot = tmp_path / "demo.png"
    result = capture(url, images, shot)

    assert len(result.teacher) == 2 and len(result.student) == 2
    predictor = Predictor(run / "export" / "model.onnx")
    for image, teacher, student in zip(images, result.teacher, result.student, strict=True):
        expected = predictor.predict(image, top_k=5)[0]
        # a gr.Label panel: the top class as its heading, then every class with a percentage
        assert student.split("\n")[0].strip() == expected.label
        for text in (teacher, student):
            assert all(c in text for c in test_demo.CLASSES) and "%" in text
    assert "Classified 2 images" in result.status

    with Image.open(shot) as img:
        assert img.format == "PNG" and img.width >= 1200 and img.height >= 900
