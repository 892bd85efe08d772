"""The app's behaviour: pure handlers, then the real Gradio server driven with gradio_client."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import save_png, textured_image
from defectclip.pipeline import FEW_SHOT, PipelineError
from demo import handlers
from demo.render import UploadError, read_upload

from app_fixtures import CANDIDATES, OBJECT, defective, pipeline  # noqa: F401  (pytest fixture)


@pytest.fixture
def defect_png(tmp_path):
    return str(save_png(defective(np.random.default_rng(5)), tmp_path / "defect.png"))


def test_defect_scores_above_threshold_and_its_region_is_outlined(pipeline, defect_png, tmp_path):
    session = handlers.Session()
    view = handlers.score_upload(pipeline, session, defect_png, pipeline.model_names[0])
    assert view.verdict.startswith("DEFECT")
    assert view.picture.shape == (64, 64, 3)
    assert any(region[27, 32] for region in session.regions)  # the defect's centre lies in a region
    normal = str(save_png(textured_image(np.random.default_rng(9), (64, 64)), tmp_path / "ok.png"))
    normal_view = handlers.score_upload(pipeline, handlers.Session(), normal, pipeline.model_names[0])
    assert normal_view.score < view.score


def test_click_inside_the_defect_describes_that_region(pipeline, defect_png):
    session = handlers.Session()
    handlers.score_upload(pipeline, session, defect_png, pipeline.model_names[0])
    view, ranked = handlers.describe_point(pipeline, session, 32, 27)
    assert list(ranked) == sorted(ranked, key=lambda c: -ranked[c]) and set(ranked) <= set(CANDIDATES)
    assert len(ranked) == 3 and abs(sum(ranked.values()) - 1.0) < 1e-4
    assert session.selected[27, 32]
    rows = handlers.describe_all(pipeline, session)
    assert len(rows) == len(session.regions) and rows[0][3] in CANDIDATES


def test_threshold_slider_changes_the_verdict(pipeline, defect_png):
    session = handlers.Session()
    view = handlers.score_upload(pipeline, session, defect_png, pipeline.model_names[0])
    higher = handlers.change_threshold(pipeline, session, view.score * 2)
    assert higher.verdict.startswith("OK") and session.regions == []


def test_few_shot_builds_a_bank_from_references(pipeline, defect_png, tmp_path):
    rng = np.random.default_rng(3)
    refs = [str(save_png(textured_image(rng, (64, 64)), tmp_path / f"ref{i}.png")) for i in range(3)]
    session = handlers.Session()
    view = handlers.score_upload(pipeline, session, defect_png, FEW_SHOT, refs, OBJECT)
    assert view.verdict.startswith("DEFECT")
    bank = session.few_shot
    handlers.score_upload(pipeline, session, defect_png, FEW_SHOT, refs, OBJECT)
    assert session.few_shot is bank  # same references: no refit
    with pytest.raises(PipelineError, match="1 to 16 normal reference images"):
        handlers.score_upload(pipeline, handlers.Session(), defect_png, FEW_SHOT, [], OBJECT)


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
        handlers.score_upload(pipeline, handlers.Session(), None, pipeline.model_names[0])


# ---------------------------------------------------------------------------------------------
# the real app over HTTP


@pytest.fixture(scope="module")
def running_app(pipeline):
    from demo.app import build_demo

    demo = build_demo(pipeline)
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=None, quiet=True)
    yield url
    demo.close()


def test_gradio_client_scores_and_describes(running_app, defect_png):
    from gradio_client import Client, handle_file

    client = Client(running_app, verbose=False)
    _picture, score, verdict, _slider, _message = _score(client, defect_png)
    assert verdict.startswith("DEFECT") and score > 0
    _picture, ranked = client.predict(32, 27, api_name="/describe_point")
    assert ranked["label"] in CANDIDATES and len(ranked["confidences"]) == 3


def _score(client, path):
    from gradio_client import handle_file

    model = "widget · patchcore · tiny:cnn"
    return client.predict(handle_file(path), model, None, OBJECT, api_name="/score")


def test_bad_upload_over_http_gets_a_message_not_a_traceback(running_app, tmp_path):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    bad = tmp_path / "bad.png"
    bad.write_text("hello")
    client = Client(running_app, verbose=False)
    with pytest.raises(AppError, match="not an image this app can read"):
        _score(client, str(bad))
