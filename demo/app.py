"""The Gradio UI: upload, heatmap and score, click a region and read what it is.

`build_demo(pipeline)` wires demo/handlers.py to components; `main()` loads the models once and
launches. API names (for gradio_client): /score, /set_threshold, /describe_point, /describe_all.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import gradio as gr

from defectclip.data import DataError
from defectclip.pipeline import FEW_SHOT, InspectionPipeline

from . import handlers
from .models import load_pipeline
from .render import MAX_UPLOAD_BYTES

EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"
CONCURRENCY_LIMIT = 4
USER_ERRORS = (ValueError, DataError, FileNotFoundError)  # ours all derive from ValueError


def on_gpu(fn):
    """On a Hugging Face GPU Space, run `fn` under @spaces.GPU; elsewhere leave it as it is."""
    try:
        import spaces
    except ImportError:
        return fn
    return spaces.GPU(fn)


def friendly(fn):
    """Turn a user error into a message box (gr.Error) instead of a stack trace."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as err:
            raise gr.Error(str(err)) from err

    return wrapper


def _view_outputs(view: handlers.ScoreView, session: handlers.Session):
    slider = gr.update(value=view.threshold, minimum=0.0, maximum=max(view.threshold * 3, view.score * 1.5, 1e-3))
    return view.picture, round(view.score, 4), view.verdict, slider, view.message, session


def build_demo(pipeline: InspectionPipeline) -> gr.Blocks:
    @friendly
    @on_gpu
    def score(image_path, model_name, references, object_choice, session):
        session = session or handlers.Session()
        view = handlers.score_upload(pipeline, session, image_path, model_name, references, object_choice)
        return _view_outputs(view, session)

    @friendly
    def set_threshold(threshold, session):
        view = handlers.change_threshold(pipeline, session or handlers.Session(), threshold)
        return view.picture, view.verdict, view.message

    @friendly
    @on_gpu
    def describe_point(x, y, session):
        session = session or handlers.Session()
        view, ranked = handlers.describe_point(pipeline, session, x, y)
        return view.picture, ranked, session

    def describe_click(session, evt: gr.SelectData):
        x, y = evt.index
        picture, ranked, session = describe_point(x, y, session)
        return picture, ranked, x, y, session

    @friendly
    @on_gpu
    def describe_all(session):
        return handlers.describe_all(pipeline, session or handlers.Session())

    models = handlers.model_choices(pipeline)
    objects = handlers.object_choices(pipeline)
    with gr.Blocks(title="defectclip inspection") as demo:
        session = gr.State(handlers.Session())
        gr.Markdown(
            "# defectclip inspection\nUpload a product image, read its anomaly score and heatmap, then "
            "**click a highlighted region** to read what the defect is."
        )
        with gr.Row():
            with gr.Column(scale=1):
                upload = gr.File(label="Image to inspect", type="filepath", elem_id="upload")
                model = gr.Dropdown(models, value=models[0], label="Inspection model", elem_id="model")
                references = gr.File(label="Few-shot: 1-16 normal reference images", file_count="multiple",
                                     type="filepath", visible=True)
                object_choice = gr.Dropdown(objects, value=objects[0] if objects else None,
                                            label="Object (few-shot / reference-free)", allow_custom_value=True)
                score_button = gr.Button("Score", variant="primary", elem_id="score")
            with gr.Column(scale=2):
                picture = gr.Image(label="Heatmap (click a region)", interactive=False, elem_id="heatmap",
                                   format="png", height=420)
                with gr.Row():
                    score_box = gr.Number(label="Anomaly score", elem_id="score-value")
                    verdict_box = gr.Textbox(label="Verdict", elem_id="verdict")
                threshold = gr.Slider(0.0, 1.0, value=0.5, step=0.001, label="Threshold", elem_id="threshold")
                message = gr.Textbox(label="Regions", elem_id="message")
            with gr.Column(scale=1):
                captions = gr.Label(num_top_classes=3, label="What is this region?", elem_id="captions")
                with gr.Row():
                    x_box = gr.Number(label="x", precision=0)
                    y_box = gr.Number(label="y", precision=0)
                point_button = gr.Button("Describe at (x, y)")
                all_button = gr.Button("Describe all regions", elem_id="describe-all")
                table = gr.Dataframe(headers=["#", "area px", "centre", "caption", "probability"],
                                     label="All regions", elem_id="all-regions")
        if EXAMPLES_DIR.is_dir():
            examples = sorted(str(p) for p in EXAMPLES_DIR.glob("*.png"))
            gr.Examples(examples, inputs=[upload], label="Examples (see demo/examples/README.md for provenance)")

        score_inputs = [upload, model, references, object_choice, session]
        score_outputs = [picture, score_box, verdict_box, threshold, message, session]
        score_button.click(score, score_inputs, score_outputs, api_name="score")
        upload.upload(score, score_inputs, score_outputs, api_name=False)
        threshold.release(set_threshold, [threshold, session], [picture, verdict_box, message], api_name="set_threshold")
        picture.select(describe_click, [session], [picture, captions, x_box, y_box, session], api_name=False)
        point_button.click(describe_point, [x_box, y_box, session], [picture, captions, session], api_name="describe_point")
        all_button.click(describe_all, [session], [table], api_name="describe_all")
    demo.queue(default_concurrency_limit=CONCURRENCY_LIMIT)
    return demo


def main() -> int:
    pipeline = load_pipeline()
    demo = build_demo(pipeline)
    demo.launch(
        server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
        server_port=int(os.environ.get("GRADIO_SERVER_PORT", "7860")),
        max_file_size=MAX_UPLOAD_BYTES,
    )
    return 0


__all__ = ["FEW_SHOT", "build_demo", "main"]
