"""A real browser (Debian's chromium, driven by Playwright) on the real app: what a user sees after each action.

Covers: upload -> click -> caption; every action that changes the image or the model replaces or clears every
result (captions, regions table, x/y) and names the model; a failed upload leaves nothing of the old image;
clicking an example scores it; the threshold reset goes to the model's threshold and Enter applies a typed
threshold; a screenshot with the heatmap's legend (written to $DEFECTCLIP_SCREENSHOT_DIR when set; the README's
docs/app.png is made this way with DEFECTCLIP_SCREENSHOT_MODELS=demo/default).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from app_fixtures import CANDIDATES, PADIM, PATCHCORE, build_pipeline, defective
from conftest import save_png, textured_image

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
BROWSER_FLAGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]
WAIT_MS = 60_000
CAPTION_RE = re.compile("|".join(map(re.escape, CANDIDATES)))

pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed (scripts/setup.sh installs it as root)"
)


@pytest.fixture(scope="module")
def served():
    """(url, pipeline): the tiny test pipeline, or the folder named by DEFECTCLIP_SCREENSHOT_MODELS."""
    from defectclip.pipeline import InspectionPipeline
    from demo.app import build_demo

    folder = os.environ.get("DEFECTCLIP_SCREENSHOT_MODELS")
    pipeline = InspectionPipeline.from_pretrained(folder) if folder else build_pipeline()
    demo = build_demo(pipeline)
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True)
    yield url, pipeline
    demo.close()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=BROWSER_FLAGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, served):
    page = browser.new_page(viewport={"width": 1500, "height": 1100})
    page.goto(served[0])
    yield page
    page.close()


@pytest.fixture
def images(tmp_path):
    return {
        "defect": str(save_png(defective(np.random.default_rng(5)), tmp_path / "defect.png")),
        "normal": str(save_png(textured_image(np.random.default_rng(9), (64, 64)), tmp_path / "normal.png")),
    }


def tiny_only(served):
    if os.environ.get("DEFECTCLIP_SCREENSHOT_MODELS"):
        pytest.skip("this test knows the tiny test pipeline's images and models")


def upload(page, path):
    """Upload as a user does: a file already there is removed first (its ✕), then the new one is chosen."""
    from playwright.sync_api import expect

    clear = page.locator("#upload button[aria-label=Clear]")
    if clear.count():
        clear.click()
        # as a user sees the old file go before choosing the next: on a loaded machine the clear could
        # otherwise still be on its way when the new file is chosen
        expect(clear).to_have_count(0, timeout=WAIT_MS)
    page.locator("#upload input[type=file]").set_input_files(str(path), timeout=WAIT_MS)


def verdict(page):
    return page.locator("#verdict textarea")


def click_image_pixel(page, x, y, side=64):
    heatmap = page.locator("#heatmap img")
    expect_visible(heatmap)
    box = heatmap.bounding_box()
    heatmap.click(position={"x": box["width"] * (x + 0.5) / side, "y": box["height"] * (y + 0.5) / side})


def expect_visible(locator):
    from playwright.sync_api import expect

    expect(locator).to_be_visible(timeout=WAIT_MS)


def score_and_describe(page, path):
    """Upload the defect image, click the defect, describe all regions; returns when everything is shown."""
    from playwright.sync_api import expect

    upload(page, path)
    expect(verdict(page)).to_have_value(re.compile("^DEFECT"), timeout=WAIT_MS)
    click_image_pixel(page, 32, 27)  # the defect's centre in the 64 x 64 image (shown enlarged)
    expect(page.locator("#captions")).to_contain_text(CAPTION_RE, timeout=WAIT_MS)
    expect(page.locator("#x input")).to_have_value("32", timeout=WAIT_MS)
    page.locator("#describe-all").click()
    expect(page.locator("#all-regions")).to_contain_text(CAPTION_RE, timeout=WAIT_MS)


def expect_results_cleared(page):
    from playwright.sync_api import expect

    expect(page.locator("#captions")).not_to_contain_text(CAPTION_RE, timeout=WAIT_MS)
    expect(page.locator("#all-regions")).not_to_contain_text(CAPTION_RE, timeout=WAIT_MS)
    expect(page.locator("#x input")).to_have_value("", timeout=WAIT_MS)
    expect(page.locator("#y input")).to_have_value("", timeout=WAIT_MS)


def test_upload_click_read_the_caption_and_the_legend_is_shown(page, served, tmp_path):
    from playwright.sync_api import expect

    folder = os.environ.get("DEFECTCLIP_SCREENSHOT_MODELS")
    examples = sorted((Path(__file__).resolve().parents[1] / "demo" / "examples").glob("*mixed*.png"))
    if folder:  # the README's screenshot: a real model on a real example, its largest region clicked
        upload(page, examples[0])
        expect(verdict(page)).to_have_value(re.compile("^DEFECT"), timeout=WAIT_MS)
        from demo.render import read_upload

        pipeline = served[1]
        image = read_upload(examples[0])
        largest = pipeline.regions(pipeline.score(image, pipeline.model_names[0]))[0]
        ys, xs = np.nonzero(largest)
        heatmap = page.locator("#heatmap img")
        box = heatmap.bounding_box()
        height, width = image.shape[:2]
        heatmap.click(position={"x": box["width"] * (xs.mean() + 0.5) / width,
                                "y": box["height"] * (ys.mean() + 0.5) / height})
        expect(page.locator("#captions")).to_contain_text("magnetic tile", timeout=WAIT_MS)
        page.locator("#describe-all").click()
        expect(page.locator("#all-regions")).to_contain_text("%", timeout=WAIT_MS)
    else:
        score_and_describe(page, save_png(defective(np.random.default_rng(5)), tmp_path / "defect.png"))
    legend = page.locator("#heat-legend")
    expect_visible(legend)
    expect(legend).to_contain_text("threshold")
    assert legend.bounding_box()["width"] > 200
    shot_dir = Path(os.environ.get("DEFECTCLIP_SCREENSHOT_DIR", tmp_path))
    shot_dir.mkdir(parents=True, exist_ok=True)
    screenshot = shot_dir / "app.png"
    page.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.stat().st_size > 10_000


def test_a_new_upload_clears_captions_table_and_xy(page, served, images):
    from playwright.sync_api import expect

    tiny_only(served)
    score_and_describe(page, images["defect"])
    upload(page, images["normal"])
    expect_results_cleared(page)
    expect(verdict(page)).to_have_value(re.compile(r"^(OK|DEFECT) \(score"), timeout=WAIT_MS)
    normal_score = served[1].score(np.asarray(__import__("PIL.Image").Image.open(images["normal"]).convert("RGB")),
                                   PATCHCORE).score
    from demo.render import number_text

    expect(page.locator("#score-value textarea")).to_have_value(number_text(normal_score), timeout=WAIT_MS)


def test_a_failed_upload_leaves_nothing_of_the_previous_image(page, served, images, tmp_path):
    from playwright.sync_api import expect

    tiny_only(served)
    score_and_describe(page, images["defect"])
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    upload(page, bad)
    expect(page.get_by_text(re.compile("not an image this app can read")).first).to_be_visible(timeout=WAIT_MS)
    expect_results_cleared(page)
    expect(verdict(page)).to_have_value("", timeout=WAIT_MS)
    expect(page.locator("#heatmap img")).to_have_count(0, timeout=WAIT_MS)
    page.locator("#describe-all").click()
    expect(page.get_by_text(re.compile("Upload an image and score it first")).first).to_be_visible(timeout=WAIT_MS)
    expect(page.locator("#all-regions")).not_to_contain_text(CAPTION_RE)


def test_switching_the_model_rescores_and_says_which_model(page, served, images):
    from playwright.sync_api import expect

    tiny_only(served)
    score_and_describe(page, images["defect"])
    expect(page.locator("#result-model textarea")).to_have_value(f"Result from: {PATCHCORE}")
    page.locator("#model input").click()
    page.get_by_role("option", name=PADIM).click()
    expect(page.locator("#result-model textarea")).to_have_value(f"Result from: {PADIM}", timeout=WAIT_MS)
    expect_results_cleared(page)
    from demo.render import number_text

    image = np.asarray(__import__("PIL.Image").Image.open(images["defect"]).convert("RGB"))
    expected = number_text(served[1].score(image, PADIM).score)
    expect(page.locator("#score-value textarea")).to_have_value(expected, timeout=WAIT_MS)


def test_clicking_an_example_scores_it(page, served):
    from playwright.sync_api import expect

    tiny_only(served)
    examples = page.locator("#examples")
    expect_visible(examples)
    examples.get_by_text(re.compile("crack")).first.click()
    expect(verdict(page)).to_have_value(re.compile(r"^(OK|DEFECT) \(score"), timeout=WAIT_MS)
    expect(page.locator("#result-model textarea")).to_have_value(f"Result from: {PATCHCORE}", timeout=WAIT_MS)
    expect_visible(page.locator("#heatmap img"))


def test_enter_applies_a_typed_threshold_and_reset_goes_to_the_models(page, served, images):
    from playwright.sync_api import expect

    tiny_only(served)
    upload(page, images["defect"])
    expect(verdict(page)).to_have_value(re.compile("^DEFECT"), timeout=WAIT_MS)
    model_threshold = served[1].model(PATCHCORE).threshold
    image = np.asarray(__import__("PIL.Image").Image.open(images["defect"]).convert("RGB"))
    above_the_score = served[1].score(image, PATCHCORE).score * 1.2  # within the slider's range (1.5x the score)
    typed = page.locator("#threshold input[type=number]")
    typed.fill(f"{above_the_score:.3f}")
    typed.press("Enter")
    expect(verdict(page)).to_have_value(re.compile("^OK"), timeout=WAIT_MS)
    expect(page.locator("#message textarea")).to_have_value(re.compile("^0 predicted defect regions"))
    page.locator("#threshold-reset").click()
    expect(verdict(page)).to_have_value(re.compile("^DEFECT"), timeout=WAIT_MS)
    from demo.app import on_step
    from demo.render import slider_step

    shown = on_step(model_threshold, slider_step(model_threshold))
    expect(typed).to_have_value(str(shown), timeout=WAIT_MS)
