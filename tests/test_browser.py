"""One real browser (Debian's chromium, driven by Playwright): upload, click the defect, read the caption."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from app_fixtures import CANDIDATES, defective, pipeline  # noqa: F401  (pytest fixture)
from conftest import save_png

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
BROWSER_FLAGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]

pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed (scripts/setup.sh installs it as root)"
)


@pytest.fixture(scope="module")
def app_url(pipeline):
    from demo.app import build_demo

    demo = build_demo(pipeline)
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True)
    yield url
    demo.close()


def test_upload_click_and_read_the_caption(app_url, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    image_path = save_png(defective(np.random.default_rng(5)), tmp_path / "defect.png")
    screenshot = Path(os.environ.get("DEFECTCLIP_SCREENSHOT_DIR", tmp_path)) / "browser_describe.png"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=BROWSER_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(app_url)
            page.locator("#upload input[type=file]").set_input_files(str(image_path))
            expect(page.locator("#verdict textarea")).to_have_value(re.compile("^DEFECT"), timeout=60_000)
            heatmap = page.locator("#heatmap img")
            expect(heatmap).to_be_visible(timeout=30_000)
            box = heatmap.bounding_box()
            # The defect's centre is pixel (32, 27) of the 64 x 64 image; the picture is shown scaled.
            heatmap.click(position={"x": box["width"] * 32.5 / 64, "y": box["height"] * 27.5 / 64})
            captions = page.locator("#captions")
            expect(captions).to_contain_text(re.compile("|".join(map(re.escape, CANDIDATES))), timeout=60_000)
            text = captions.inner_text()
            assert any(candidate in text for candidate in CANDIDATES), text
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    assert screenshot.stat().st_size > 10_000
