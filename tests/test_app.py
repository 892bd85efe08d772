"""The app's behaviour: pure handlers, then the real Gradio server driven with gradio_client."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest

from conftest import save_png, textured_image
from defectclip.pipeline import FEW_SHOT, PipelineError, backbone_label, plain_model_name
from defectclip.results import AnomalyResult
from demo import handlers, render
from demo.render import UploadError, read_upload

from app_fixtures import CANDIDATES, OBJECT, PADIM, PATCHCORE, build_pipeline, defective, pipeline  # noqa: F401  (pytest fixture)


@pytest.fixture
def defect_png(tmp_path):
    return str(save_png(defective(np.random.default_rng(5)), tmp_path / "defect.png"))


@pytest.fixture
def normal_png(tmp_path):
    return str(save_png(textured_image(np.random.default_rng(9), (64, 64)), tmp_path / "ok.png"))


def test_defect_scores_above_threshold_and_its_region_is_outlined(pipeline, defect_png, normal_png):
    session = handlers.Session()
    view = handlers.score_upload(pipeline, session, defect_png, PATCHCORE)
    assert view.verdict.startswith("DEFECT")
    assert any(region[27, 32] for region in session.regions)  # the defect's centre lies in a region
    normal_view = handlers.score_upload(pipeline, handlers.Session(), normal_png, PATCHCORE)
    assert normal_view.score < view.score


def test_small_images_are_shown_enlarged_and_clicks_map_back_to_image_pixels(pipeline, defect_png):
    session = handlers.Session()
    view = handlers.score_upload(pipeline, session, defect_png, PATCHCORE)
    assert view.picture.shape == (512, 512, 3)  # 64 px shown 8x, by whole pixels
    assert handlers.to_image_xy(session, 32 * 8 + 7, 27 * 8) == (32, 27)
    assert render.display_scale((700, 300)) == 1 and render.display_scale((200, 150)) == 3


def test_click_inside_the_defect_describes_that_region(pipeline, defect_png):
    session = handlers.Session()
    handlers.score_upload(pipeline, session, defect_png, PATCHCORE)
    view, ranked = handlers.describe_point(pipeline, session, 32, 27)
    assert list(ranked) == sorted(ranked, key=lambda c: -ranked[c]) and set(ranked) <= set(CANDIDATES)
    assert len(ranked) == 3 and abs(sum(ranked.values()) - 1.0) < 1e-4
    assert session.selected[27, 32]
    rows = handlers.describe_all(pipeline, session)
    assert len(rows) == len(session.regions) and rows[0][3] in CANDIDATES
    assert rows[0][4].endswith("%") and 0 <= int(rows[0][4][:-1]) <= 100


def test_a_flagged_region_is_named_as_a_defect_and_clean_surface_may_read_no_defect(defect_png):
    from defectclip.captions import no_defect_caption
    from defectclip.regions_ui import CLICK_SNAP_PX, distance_to_region

    candidates = CANDIDATES + [no_defect_caption(OBJECT)]
    pipeline = build_pipeline(candidates)
    session = handlers.Session()
    handlers.score_upload(pipeline, session, defect_png, PATCHCORE)
    image, result, threshold = session.image, session.result, session.threshold
    region, index, flagged = pipeline.describe_click(image, result, 32, 27, OBJECT, threshold, top=10)
    assert index is not None and {caption for caption, _ in flagged} == set(CANDIDATES)
    every = dict(pipeline.describe(image, region, OBJECT))  # the describer's own answer, "no defect" included
    kept = sum(every[c] for c in CANDIDATES)
    assert all(p == pytest.approx(every[c] / kept, abs=1e-5) for c, p in flagged)  # renormalised, same order
    clean = next((x, y) for y in range(63, 0, -4) for x in range(0, 64, 4)
                 if all(distance_to_region(r, x, y) > CLICK_SNAP_PX for r in session.regions))
    _, index, answers = pipeline.describe_click(image, result, *clean, OBJECT, threshold, top=10)
    assert index is None and {caption for caption, _ in answers} == set(candidates)
    assert all(row[3] in CANDIDATES for row in handlers.describe_all(pipeline, session))


def test_a_new_upload_replaces_every_result_of_the_previous_image(pipeline, defect_png, normal_png):
    session = handlers.Session()
    handlers.score_upload(pipeline, session, defect_png, PATCHCORE)
    handlers.describe_point(pipeline, session, 32, 27)
    view = handlers.score_upload(pipeline, session, normal_png, PATCHCORE)
    assert session.selected is None and session.image_path == normal_png
    assert view.score == pytest.approx(pipeline.score(read_upload(normal_png), PATCHCORE).score)


def test_a_failed_upload_forgets_the_previous_image(pipeline, defect_png, tmp_path):
    session = handlers.Session()
    handlers.score_upload(pipeline, session, defect_png, PATCHCORE)
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    with pytest.raises(UploadError, match="not an image this app can read"):
        handlers.score_upload(pipeline, session, str(bad), PATCHCORE)
    assert session.image is None and session.result is None
    with pytest.raises(UploadError, match="Upload an image"):
        handlers.describe_all(pipeline, session)


def test_switching_the_model_rescores_and_names_the_model(pipeline, defect_png):
    session = handlers.Session()
    first = handlers.score_upload(pipeline, session, defect_png, PATCHCORE)
    second = handlers.score_upload(pipeline, session, defect_png, PADIM)
    assert first.model_label.endswith(PATCHCORE) and second.model_label.endswith(PADIM)
    assert second.model_threshold == pytest.approx(pipeline.model(PADIM).threshold)
    assert second.score == pytest.approx(pipeline.score(read_upload(defect_png), PADIM).score)
    assert session.model_name == PADIM


def test_threshold_changes_outlines_and_reset_returns_to_the_models_threshold(pipeline, defect_png):
    session = handlers.Session()
    view = handlers.score_upload(pipeline, session, defect_png, PATCHCORE)
    higher = handlers.change_threshold(pipeline, session, view.score * 2)
    assert higher.verdict.startswith("OK") and session.regions == []
    reset = handlers.reset_threshold(pipeline, session)
    assert reset.threshold == pytest.approx(pipeline.model(PATCHCORE).threshold)
    assert reset.verdict.startswith("DEFECT") and session.regions
    with pytest.raises(UploadError, match="threshold of 0 or more"):
        handlers.change_threshold(pipeline, session, None)


def test_colour_scale_is_fixed_to_the_models_threshold_with_a_light_tint_below_it():
    image = np.full((4, 4, 3), 128, np.uint8)
    ratios = np.array([[0.2, 0.5, 0.9, 1.0], [1.2, 1.5, 3.0, 0.0]] * 2, np.float32)
    picture = render.overlay(image, ratios * 31.8, 31.8).astype(int)
    tint = np.abs(picture - 128).max(axis=-1)
    assert tint[0, 0] <= 0.15 * 255 and tint[0, 2] <= 0.35 * 255  # normal: the image stays readable
    assert tint[0, 3] > tint[0, 2] and picture[0, 3, 0] > picture[0, 3, 2]  # at the threshold: warm (red > blue)
    assert picture[1, 1, 1] < picture[0, 3, 1]  # 1.5x threshold is redder than 1x
    assert np.array_equal(picture[1, 1], picture[1, 2])  # the scale saturates at 1.5x
    legend = render.legend_html(31.8, "m")
    assert "threshold 31.8" in legend and "≤ 15.9" in legend and "≥ 47.7" in legend


def test_numbers_are_rounded_for_people():
    assert render.number_text(31.786178588867188) == "31.8"
    assert render.number_text(0.123456) == "0.123" and render.number_text(1234.5) == "1234"
    assert handlers.verdict(33.3333333, 31.786178588867188) == "DEFECT (score 33.3 ≥ threshold 31.8)"
    assert render.slider_step(31.786) == pytest.approx(0.01)


def test_model_names_are_plain(tmp_path):
    tab = tmp_path / "tab_backbone"
    tab.mkdir()
    (tab / "config.json").write_text('{"architecture": "efficientnet_lite0"}')
    (tab / "tab_config.json").write_text("{}")
    scorer = tmp_path / "scorers" / "tile"
    scorer.mkdir(parents=True)
    assert backbone_label("local-dir:../../tab_backbone", scorer) == "TAB efficientnet_lite0"
    assert backbone_label("timm:resnet18") == "resnet18 (ImageNet)"
    assert backbone_label("hf-hub:defectclip/tab-resnet18") == "tab-resnet18"
    assert plain_model_name("magnetic tile", "patchcore", "TAB efficientnet_lite0") == (
        "magnetic tile · PatchCore · TAB efficientnet_lite0")


def test_too_small_images_get_a_plain_message(pipeline, tmp_path):
    tiny = str(save_png(textured_image(np.random.default_rng(1), (8, 8)), tmp_path / "tiny.png"))
    with pytest.raises(UploadError) as caught:
        handlers.score_upload(pipeline, handlers.Session(), tiny, PATCHCORE)
    text = str(caught.value)
    assert "8×8 pixels" in text and "Upload a larger image" in text
    assert "stride" not in text and "tower" not in text and str(tmp_path) not in text


def test_an_image_unlike_the_training_data_gets_a_warning(pipeline, defect_png):
    foreign = AnomalyResult.from_map(np.full((10, 10), 5.0, np.float32), 5.0, 1.0)
    warning = handlers.unfamiliar_warning(foreign, "magnetic tile")
    assert "100%" in warning and "magnetic tile" in warning
    session = handlers.Session()
    view = handlers.score_upload(pipeline, session, defect_png, PATCHCORE)
    assert "⚠" not in view.message  # one small defect is not "unlike the training data"


def test_few_shot_builds_a_bank_from_references(pipeline, defect_png, tmp_path):
    rng = np.random.default_rng(3)
    refs = [str(save_png(textured_image(rng, (64, 64)), tmp_path / f"ref{i}.png")) for i in range(3)]
    session = handlers.Session()
    view = handlers.score_upload(pipeline, session, defect_png, FEW_SHOT, refs, OBJECT)
    assert view.verdict.startswith("DEFECT") and "few-shot (3 refs)" in view.model_label
    bank = session.few_shot
    handlers.score_upload(pipeline, session, defect_png, FEW_SHOT, refs, OBJECT)
    assert session.few_shot is bank  # same references: no refit
    with pytest.raises(PipelineError, match="1 to 16 normal reference images"):
        handlers.score_upload(pipeline, handlers.Session(), defect_png, FEW_SHOT, [], OBJECT)


def test_few_shot_shows_progress_its_measured_quality_and_merged_references(pipeline, defect_png, tmp_path):
    rng = np.random.default_rng(4)
    refs = [str(save_png(textured_image(rng, (64, 64)), tmp_path / f"ref{i}.png")) for i in range(3)]
    twin = tmp_path / "copy_of_ref0.png"
    twin.write_bytes(open(refs[0], "rb").read())
    steps = []
    view = handlers.score_upload(pipeline, handlers.Session(), defect_png, FEW_SHOT, refs + [str(twin)], OBJECT,
                                 progress=lambda fraction, desc: steps.append((fraction, desc)))
    assert [fraction for fraction, _ in steps] == [0.0, 0.3, 1.0] and "4 reference" in steps[0][1]
    assert "measured on magnetic tile" in view.model_label and "image AUROC" in view.model_label
    assert "Reference 4 is identical to reference 1" in view.message


def test_too_many_references_are_refused_before_any_is_read(pipeline, defect_png, tmp_path):
    junk = [tmp_path / f"not_an_image_{i}.png" for i in range(17)]
    for path in junk:
        path.write_bytes(b"not a png")  # decoding any of these would fail with another message
    with pytest.raises(PipelineError, match="got 17"):
        handlers.score_upload(pipeline, handlers.Session(), defect_png, FEW_SHOT, [str(p) for p in junk], OBJECT)


@pytest.mark.parametrize("mode", ["L", "RGBA", "I;16"])
def test_uploads_of_any_mode_are_normalised(tmp_path, mode):
    from PIL import Image

    rng = np.random.default_rng(0)
    if mode == "I;16":
        img = Image.fromarray(rng.integers(0, 60000, (30, 40)).astype(np.uint16))
    else:
        img = Image.fromarray(rng.integers(0, 255, (30, 40, 3)).astype(np.uint8)).convert(mode)
    img.save(tmp_path / "x.png")
    rgb = read_upload(tmp_path / "x.png")
    assert rgb.shape == (30, 40, 3) and rgb.dtype == np.uint8


def test_large_uploads_are_shrunk_and_bad_files_get_a_message(tmp_path):
    from PIL import Image

    Image.new("RGB", (3000, 1500), (10, 20, 30)).save(tmp_path / "big.png")
    assert read_upload(tmp_path / "big.png").shape == (512, 1024, 3)
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(UploadError, match="not an image this app can read"):
        read_upload(tmp_path / "notes.png")


def test_actions_before_an_upload_explain_what_to_do(pipeline):
    with pytest.raises(UploadError, match="Upload an image"):
        handlers.describe_point(pipeline, handlers.Session(), 1, 1)
    with pytest.raises(UploadError, match="Upload an image"):
        handlers.score_upload(pipeline, handlers.Session(), None, PATCHCORE)
    with pytest.raises(UploadError, match="Upload an image"):
        handlers.reset_threshold(pipeline, handlers.Session())


# ---------------------------------------------------------------------------------------------
# the real app over HTTP


@pytest.fixture(scope="module")
def running_app(pipeline):
    from demo.app import build_demo

    demo = build_demo(pipeline)
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=None, quiet=True)
    yield url, demo
    demo.close()


def _score(client, path, model=PATCHCORE):
    from gradio_client import handle_file

    return client.predict(handle_file(path), model, None, OBJECT, api_name="/score")


def test_gradio_client_scores_and_describes(running_app, pipeline, defect_png):
    from gradio_client import Client

    client = Client(running_app[0], verbose=False)
    _picture, _legend, score, verdict, model, _slider, _message, *_cleared = _score(client, defect_png)
    assert verdict.startswith("DEFECT") and float(score) > 0 and model == f"Result from: {PATCHCORE}"
    _picture, ranked = client.predict(32, 27, api_name="/describe_point")
    assert ranked["label"] in CANDIDATES and len(ranked["confidences"]) == 3
    threshold, _picture, verdict, *_ = client.predict(api_name="/reset_threshold")
    assert threshold == pytest.approx(pipeline.model(PATCHCORE).threshold, rel=1e-3) and verdict.startswith("DEFECT")


def test_bad_upload_over_http_gets_a_message_not_a_traceback(running_app, tmp_path):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    bad = tmp_path / "bad.png"
    bad.write_text("hello")
    client = Client(running_app[0], verbose=False)
    with pytest.raises(AppError, match="not an image this app can read"):
        _score(client, str(bad))


def test_the_cache_is_private_and_swept(running_app, defect_png):
    from gradio_client import Client

    _url, demo = running_app
    _score(Client(running_app[0], verbose=False), defect_png)
    cache = os.environ["GRADIO_TEMP_DIR"]
    assert stat.S_IMODE(os.stat(cache).st_mode) & 0o077 == 0  # nobody else can read heatmaps or uploads
    assert any(files for _, _, files in os.walk(cache))
    assert demo.delete_cache is not None


def test_session_state_is_bounded(pipeline, tmp_path):
    """One label image instead of a mask per region, and at most MAX_REGIONS regions (a speckled image)."""
    rng = np.random.default_rng(2)
    image = textured_image(rng, (64, 64))
    image[::8, ::8] = 255  # many small bright dots: many regions at a low threshold
    session = handlers.Session()
    handlers.score_upload(pipeline, session, str(save_png(image, tmp_path / "dots.png")), PATCHCORE)
    handlers.change_threshold(pipeline, session, 0.0)
    assert session.region_labels.dtype == np.uint8 and session.region_labels.shape == (64, 64)
    assert 1 <= len(session.regions) <= handlers.MAX_REGIONS
    session.regions = [np.eye(64, dtype=bool)] * 0
    assert session.region_labels is None and session.regions == []


def test_old_cache_files_are_deleted(pipeline, defect_png, monkeypatch):
    """delete_cache really sweeps: with a 1 s sweep and age, an upload's files are gone seconds later."""
    import time

    from gradio_client import Client

    from demo import app as demo_app

    monkeypatch.setattr(demo_app, "CACHE_SWEEP_S", 1)
    monkeypatch.setattr(demo_app, "CACHE_MAX_AGE_S", 1)
    demo = demo_app.build_demo(pipeline)
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True)
    try:
        client = Client(url, verbose=False)
        _picture, *_ = _score(client, defect_png)
        made = {path for files in demo.temp_file_sets for path in files}
        assert made and all(os.path.exists(path) for path in made)
        deadline = time.time() + 60  # generous: the sweep runs in a loaded CI box too
        while time.time() < deadline and any(os.path.exists(path) for path in made):
            time.sleep(0.5)
        assert not any(os.path.exists(path) for path in made)
    finally:
        demo.close()


def test_an_object_the_describer_does_not_know_gets_a_clear_message_not_other_captions(pipeline, defect_png):
    from defectclip.errors import UnknownObjectError

    session = handlers.Session()
    handlers.score_upload(pipeline, session, defect_png, PATCHCORE)
    session.object_name = "gizmo"  # e.g. few-shot with an object typed into the (custom-value) dropdown
    with pytest.raises(UnknownObjectError, match="'gizmo'.*widget"):
        handlers.describe_point(pipeline, session, 32, 27)
