"""What happens on each user action, as plain functions of (pipeline, inputs, session state).

The Gradio layer in demo/app.py only wires these to components, so they are tested directly.
Session state is a `Session` held in `gr.State`: every browser tab has its own, so one user's image
or result never reaches another.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from defectclip.pipeline import FEW_SHOT, REFERENCE_FREE, InspectionModel, InspectionPipeline, PipelineError
from defectclip.results import AnomalyResult

from .render import UploadError, draw_outlines, overlay, read_upload


@dataclass
class Session:
    """One user's current image, result and choices."""

    image: np.ndarray | None = None
    result: AnomalyResult | None = None
    model_name: str | None = None
    object_name: str = ""
    threshold: float | None = None
    few_shot: InspectionModel | None = None
    few_shot_key: str = ""
    selected: np.ndarray | None = None
    regions: list = field(default_factory=list)


@dataclass
class ScoreView:
    picture: np.ndarray
    score: float
    verdict: str
    threshold: float
    message: str


def verdict(score: float, threshold: float) -> str:
    return f"DEFECT (score {score:.3f} ≥ threshold {threshold:.3f})" if score >= threshold else (
        f"OK (score {score:.3f} < threshold {threshold:.3f})"
    )


def _files_key(paths: list[str]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            digest.update(hashlib.sha256(handle.read()).digest())
    return digest.hexdigest()


def _few_shot_model(pipeline: InspectionPipeline, session: Session, reference_paths: list[str] | None,
                    object_name: str) -> InspectionModel:
    """Reuse the session's bank while the same references are given; refit when they change."""
    paths = list(reference_paths or [])
    if not paths:
        raise PipelineError("Few-shot mode needs 1 to 16 normal reference images of the same object: add them first.")
    key = _files_key(paths)
    if session.few_shot is None or session.few_shot_key != key:
        session.few_shot = pipeline.fit_few_shot([read_upload(p) for p in paths], object_name)
        session.few_shot_key = key
    return session.few_shot


def choose_model(pipeline: InspectionPipeline, session: Session, model_name: str,
                 reference_paths: list[str] | None, object_name: str) -> InspectionModel:
    if model_name == FEW_SHOT:
        return _few_shot_model(pipeline, session, reference_paths, object_name)
    return pipeline.model(model_name)


def describe_object(model: InspectionModel, object_choice: str) -> str:
    """Installed models know their object; few-shot and reference-free use the user's choice."""
    return model.object or object_choice


def score_upload(pipeline: InspectionPipeline, session: Session, image_path: str | None, model_name: str,
                 reference_paths: list[str] | None = None, object_choice: str = "") -> ScoreView:
    """Upload -> heatmap overlay with region outlines, score and verdict. Errors become messages."""
    if not image_path:
        raise UploadError("Upload an image first.")
    image = read_upload(image_path)
    model = choose_model(pipeline, session, model_name, reference_paths, object_choice)
    result = pipeline.score(image, model)
    session.image, session.result, session.model_name = image, result, model_name
    session.object_name = describe_object(model, object_choice)
    session.threshold, session.selected = result.threshold, None
    return render_session(pipeline, session, "")


def render_session(pipeline: InspectionPipeline, session: Session, message: str) -> ScoreView:
    result, threshold = session.result, session.threshold
    session.regions = pipeline.regions(result, threshold)
    picture = overlay(session.image, result.anomaly_map, threshold)
    selected_index = _index_of(session.regions, session.selected)
    extra = session.selected if session.selected is not None and selected_index is None else None
    picture = draw_outlines(picture, session.regions, selected_index, extra)
    count = len(session.regions)
    summary = f"{count} predicted defect region{'s' if count != 1 else ''}."
    return ScoreView(picture, result.score, verdict(result.score, threshold), threshold,
                     " ".join(m for m in (message, summary) if m))


def _index_of(regions: list[np.ndarray], selected: np.ndarray | None) -> int | None:
    if selected is None:
        return None
    for index, region in enumerate(regions):
        if region.shape == selected.shape and np.array_equal(region, selected):
            return index
    return None


def change_threshold(pipeline: InspectionPipeline, session: Session, threshold: float) -> ScoreView:
    if session.result is None:
        raise UploadError("Upload an image and score it first.")
    session.threshold, session.selected = float(threshold), None
    return render_session(pipeline, session, "")


def describe_point(pipeline: InspectionPipeline, session: Session, x: float, y: float):
    """A click at (x, y) in image pixels -> (picture with the region highlighted, {caption: prob})."""
    if session.result is None:
        raise UploadError("Upload an image and score it first, then click on it.")
    if not pipeline.can_describe:
        raise PipelineError("No region describer is installed, so regions cannot be described.")
    region, _, ranked = pipeline.describe_click(
        session.image, session.result, int(round(x)), int(round(y)), session.object_name, session.threshold
    )
    session.selected = region
    view = render_session(pipeline, session, "")
    return view, {caption: probability for caption, probability in ranked}


def describe_all(pipeline: InspectionPipeline, session: Session) -> list[list]:
    """One row per predicted region: number, area, centre, best caption and its probability."""
    if session.result is None:
        raise UploadError("Upload an image and score it first.")
    if not pipeline.can_describe:
        raise PipelineError("No region describer is installed, so regions cannot be described.")
    rows = []
    for number, region in enumerate(pipeline.regions(session.result, session.threshold), start=1):
        caption, probability = pipeline.describe(session.image, region, session.object_name)[0]
        ys, xs = np.nonzero(region)
        rows.append([number, int(region.sum()), f"({int(xs.mean())}, {int(ys.mean())})", caption, round(probability, 3)])
    return rows


def model_choices(pipeline: InspectionPipeline) -> list[str]:
    return pipeline.model_names + [FEW_SHOT]


def object_choices(pipeline: InspectionPipeline) -> list[str]:
    if pipeline.describer is None:
        return sorted({m.object for m in pipeline.models.values() if m.object})
    return sorted(pipeline.describer.config.get("candidates", {}))


__all__ = [
    "FEW_SHOT", "REFERENCE_FREE", "ScoreView", "Session", "change_threshold", "describe_all", "describe_point",
    "model_choices", "object_choices", "score_upload", "verdict",
]
