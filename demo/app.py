"""The Gradio UI: upload, heatmap and score, click a region and read what it is.

`build_demo(pipeline)` wires demo/handlers.py to components; `main()` loads the models once, moves them to
the serving device once, and launches. API names (for gradio_client): /score, /set_threshold,
/reset_threshold, /describe_point, /describe_all.

Every change of the image, the model, the object or the references first clears every result output
(`start_over`), then scores again: nothing on screen ever belongs to an earlier image or model.
"""

from __future__ import annotations

# On a ZeroGPU Space `spaces` must be imported before anything initialises CUDA (torch, the models);
# everywhere else it is absent and the app runs as it is.
try:
    import spaces  # noqa: F401
except ImportError:
    spaces = None

import functools
import os
import tempfile
from pathlib import Path

import gradio as gr

from defectclip.data import DataError
from defectclip.pipeline import FEW_SHOT, InspectionPipeline

from . import handlers
from .models import load_pipeline
from .render import MAX_UPLOAD_BYTES, legend_html, slider_step

EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"
CONCURRENCY_LIMIT = 4
USER_ERRORS = (ValueError, DataError, FileNotFoundError)  # ours all derive from ValueError
# Uploads and rendered heatmaps live in Gradio's cache: files older than CACHE_MAX_AGE_S are deleted every
# CACHE_SWEEP_S (a re-score reuses the decoded image held in the session, not the uploaded file).
CACHE_SWEEP_S, CACHE_MAX_AGE_S = 300, 900
SESSION_TTL_S = 3600  # a tab idle this long loses its result (Gradio also drops it when the tab closes)
# Gradio keeps every session's state (and a closed tab's for an hour): beyond this many sessions the least
# recently used is dropped, so memory stays bounded (a session holds one image, its map and region labels:
# about 10 MB at the 1024-px upload limit, 0.3 MB at 256 px).
SESSION_CAPACITY = 200
GPU_MODEL_CALLS = ("score", "describe", "fit_few_shot")


# ------------------------------------------------------------------------------------------- serving


def gpu_decorator():
    """`spaces.GPU` on a Hugging Face ZeroGPU Space, else None."""
    try:
        import spaces as hf_spaces
    except ImportError:
        return None
    return hf_spaces.GPU


def serving_device() -> str:
    """CUDA when there is a GPU (a ZeroGPU Space reports one once `spaces` is imported), else the CPU."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def prepare_for_serving(pipeline: InspectionPipeline, device: str | None = None) -> InspectionPipeline:
    """Move every model to the serving device once, at start-up; on ZeroGPU run model calls under @spaces.GPU.

    Only the pipeline's model calls are wrapped: they take arrays and return results, so nothing depends on
    session state changed inside the GPU worker, and handlers stay plain functions.
    """
    pipeline.to(device or serving_device())
    decorator = gpu_decorator()
    if decorator is not None and not getattr(pipeline, "gpu_wrapped", False):
        for name in GPU_MODEL_CALLS:
            setattr(pipeline, name, decorator(getattr(pipeline, name)))
        pipeline.gpu_wrapped = True
    return pipeline


def private_cache_dir() -> str:
    """Gradio's cache for this process in a folder only its user can enter (heatmaps are nobody else's).

    An operator's GRADIO_TEMP_DIR is kept, and made private too.
    """
    chosen = os.environ.get("GRADIO_TEMP_DIR")
    if chosen:
        Path(chosen).mkdir(parents=True, exist_ok=True)
        os.chmod(chosen, 0o700)
        return chosen
    folder = tempfile.mkdtemp(prefix="defectclip-app-")  # created 0700
    os.environ["GRADIO_TEMP_DIR"] = folder
    return folder


def friendly(fn):
    """Turn a user error into a message box (gr.Error) instead of a stack trace."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as err:
            raise gr.Error(str(err)) from err

    return wrapper


# --------------------------------------------------------------------------------------------- views

EMPTY_TABLE = {"headers": handlers.TABLE_HEADERS, "data": []}


def view_outputs(view: handlers.ScoreView, session: handlers.Session):
    """Values for RESULT_OUTPUTS: the view, and captions / x / y / table cleared (they described the old result)."""
    if view.threshold is None:
        slider = gr.update()
    else:
        step = slider_step(view.model_threshold)
        top = max(view.model_threshold * 3, (view.score or 0) * 1.5, 1e-3)
        slider = gr.update(value=on_step(view.threshold, step), minimum=0.0, maximum=on_step(top, step), step=step)
    return (view.picture, view.legend, view.score_text, view.verdict, view.model_label, slider, view.message,
            None, None, None, EMPTY_TABLE, session)


def threshold_outputs(view: handlers.ScoreView, session: handlers.Session, with_slider: bool = False):
    """After a threshold change: regions changed, so captions and the table are cleared."""
    values = (view.picture, view.verdict, view.message, None, EMPTY_TABLE, session)
    return ((on_step(view.threshold, slider_step(view.model_threshold)),) + values) if with_slider else values


def on_step(value: float, step: float) -> float:
    """A value rounded to the slider's step, so the slider shows 31.79, not 31.786178588867188."""
    import math

    return round(round(value / step) * step, max(0, -math.floor(math.log10(step))))


def build_demo(pipeline: InspectionPipeline) -> gr.Blocks:
    private_cache_dir()  # before gr.Blocks: it reads the cache folder when it is built

    def start_over(session):
        session = session or handlers.Session()
        return view_outputs(handlers.start_over(session), session)

    @friendly
    def score(image_path, model_name, references, object_choice, session, progress=gr.Progress()):
        """The Score button and /score: an image is required. A few-shot build reports its steps to `progress`."""
        session = session or handlers.Session()
        view = handlers.score_upload(pipeline, session, image_path, model_name, references, object_choice,
                                     progress=progress)
        return view_outputs(view, session)

    def rescore(image_path, model_name, references, object_choice, session, progress=gr.Progress()):
        """A new upload, model, object or set of references: score again if there is an image, else stay clear."""
        session = session or handlers.Session()
        if not image_path:
            return view_outputs(handlers.clear_image(session), session)
        return score(image_path, model_name, references, object_choice, session, progress)

    @friendly
    def set_threshold(threshold, session):
        session = session or handlers.Session()
        return threshold_outputs(handlers.change_threshold(pipeline, session, threshold), session)

    @friendly
    def reset_threshold(session):
        session = session or handlers.Session()
        return threshold_outputs(handlers.reset_threshold(pipeline, session), session, with_slider=True)

    @friendly
    def describe_point(x, y, session):
        session = session or handlers.Session()
        view, ranked = handlers.describe_point(pipeline, session, x, y)
        return view.picture, ranked, session

    def describe_click(session, evt: gr.SelectData):
        session = session or handlers.Session()
        x, y = handlers.to_image_xy(session, *evt.index)
        picture, ranked, session = describe_point(x, y, session)
        return picture, ranked, x, y, session

    @friendly
    def describe_all(session):
        return handlers.describe_all(pipeline, session or handlers.Session())

    models = handlers.model_choices(pipeline)
    objects = handlers.object_choices(pipeline)
    with gr.Blocks(title="defectclip inspection", delete_cache=(CACHE_SWEEP_S, CACHE_MAX_AGE_S)) as demo:
        session = gr.State(handlers.Session(), time_to_live=SESSION_TTL_S)
        gr.Markdown(
            "# defectclip inspection\nUpload a product image, read its anomaly score and heatmap, then "
            "**click a highlighted region** to read what the defect is."
        )
        with gr.Row():
            with gr.Column(scale=2, min_width=400):
                upload = gr.File(label="Image to inspect", type="filepath", elem_id="upload")
                model = gr.Dropdown(models, value=models[0], label="Inspection model", elem_id="model")
                references = gr.File(label="Few-shot: 1-16 normal reference images", file_count="multiple",
                                     type="filepath", elem_id="references")
                object_choice = gr.Dropdown(objects, value=objects[0] if objects else None, elem_id="object",
                                            label="Object (few-shot / reference-free)", allow_custom_value=True)
                score_button = gr.Button("Score", variant="primary", elem_id="score")
                if EXAMPLES_DIR.is_dir():
                    gr.Examples(sorted(str(p) for p in EXAMPLES_DIR.glob("*.png")), inputs=[upload],
                                elem_id="examples", examples_per_page=10,
                                label="Examples: click one to score it (provenance: demo/examples/README.md)")
            with gr.Column(scale=4, min_width=420):
                picture = gr.Image(label="Heatmap (click a region)", interactive=False, elem_id="heatmap",
                                   format="png", height=520)
                legend = gr.HTML(legend_html(None), elem_id="legend")
                with gr.Row():
                    score_box = gr.Textbox(label="Anomaly score", elem_id="score-value", interactive=False)
                    verdict_box = gr.Textbox(label="Verdict", elem_id="verdict", interactive=False)
                model_box = gr.Textbox(label="Model", elem_id="result-model", interactive=False)
                with gr.Row(equal_height=True):
                    # The built-in ↺ would go back to the value the slider was built with, not the model's
                    # threshold, so it is replaced by a button that does.
                    threshold = gr.Slider(0.0, 1.0, value=0.5, step=0.001, label="Threshold", elem_id="threshold",
                                          buttons=[], scale=5)
                    reset = gr.Button("↺ model threshold", elem_id="threshold-reset", scale=1, min_width=120)
                message = gr.Textbox(label="Regions", elem_id="message", interactive=False, lines=2)
            with gr.Column(scale=2, min_width=280):
                captions = gr.Label(num_top_classes=handlers.CAPTIONS_SHOWN, label="What is this region?",
                                    elem_id="captions")
                with gr.Row():
                    x_box = gr.Number(label="x", precision=0, elem_id="x")
                    y_box = gr.Number(label="y", precision=0, elem_id="y")
                point_button = gr.Button("Describe at (x, y)")
                all_button = gr.Button("Describe all regions", elem_id="describe-all")
        table = gr.Dataframe(value=EMPTY_TABLE, headers=handlers.TABLE_HEADERS, label="All regions",
                             elem_id="all-regions", wrap=True, interactive=False,
                             column_widths=["6%", "12%", "14%", "54%", "14%"])

        score_inputs = [upload, model, references, object_choice, session]
        result_outputs = [picture, legend, score_box, verdict_box, model_box, threshold, message, captions, x_box,
                          y_box, table, session]
        clear = dict(fn=start_over, inputs=[session], outputs=result_outputs, api_name=False, queue=False)
        score_button.click(**clear).then(score, score_inputs, result_outputs, api_name="score")
        for trigger in (upload.change, model.change, object_choice.change, references.change):
            trigger(**clear).then(rescore, score_inputs, result_outputs, api_name=False)

        threshold_after = [picture, verdict_box, message, captions, table, session]
        threshold.input(set_threshold, [threshold, session], threshold_after, api_name="set_threshold",
                        trigger_mode="always_last")
        reset.click(reset_threshold, [session], [threshold, *threshold_after], api_name="reset_threshold")
        picture.select(describe_click, [session], [picture, captions, x_box, y_box, session], api_name=False)
        point_button.click(describe_point, [x_box, y_box, session], [picture, captions, session],
                           api_name="describe_point")
        all_button.click(describe_all, [session], [table], api_name="describe_all")
    demo.queue(default_concurrency_limit=CONCURRENCY_LIMIT)
    return demo


def main() -> int:
    pipeline = prepare_for_serving(load_pipeline())
    print(f"defectclip: models on {pipeline.device}")
    demo = build_demo(pipeline)
    demo.launch(
        server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
        server_port=int(os.environ.get("GRADIO_SERVER_PORT", "7860")),
        max_file_size=MAX_UPLOAD_BYTES,
        state_session_capacity=SESSION_CAPACITY,
    )
    return 0


__all__ = ["FEW_SHOT", "build_demo", "main", "prepare_for_serving", "serving_device"]
