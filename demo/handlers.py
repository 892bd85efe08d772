"""What happens on each user action, as plain functions of (pipeline, inputs, session state).

The Gradio layer in demo/app.py only wires these to components, so they are tested directly.
Session state is a `Session` held in `gr.State`: every browser tab has its own, so one user's image
or result never reaches another.

Every action that changes the image, the model or the threshold returns a complete `ScoreView` (or
`cleared()`), so no output is ever left showing a result of an earlier image, model or threshold.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from defectclip.pipeline import FEW_SHOT, REFERENCE_FREE, InspectionModel, InspectionPipeline, PipelineError
from defectclip.results import AnomalyResult

from .render import (
    UploadError, display_scale, draw_outlines, enlarge, legend_html, number_text, overlay, read_upload, slider_step,
)

# Most of an image above the model's threshold means it is not what the model learned as "normal"
# (a defect, by definition of anomaly detection, is a minority of the surface): the result then says
# more about the image being foreign than about defects, and the user is told so.
UNFAMILIAR_AREA_FRACTION = 0.5
MAX_REGIONS = 50  # bounds the per-session state and the table; regions come largest first
CAPTIONS_SHOWN = 3
# What the modes without an installed model were measured to do (benchmarks/results/few_shot.json, and
# clip_ada_default.json for the embedded default's head); shown beside their results so nobody takes them
# for a trained model.
MEASURED_QUALITY = {
    FEW_SHOT: "few-shot, blended with self-similarity; measured on magnetic tile (709 test images, 5 draws): image AUROC {auroc}",
    REFERENCE_FREE: ("trained on magnetic tile, blended with self-similarity, eight mirror/turned views; measured: image "
                     "AUROC 0.80 on magnetic tile, pixel AUROC 0.80 on steel strip, which it never saw (clip_ada_transfer.md)"),
}
FEW_SHOT_AUROC = {1: 0.78, 2: 0.78, 4: 0.80, 8: 0.82, 16: 0.81}  # means over 5 draws, exposure matched, blended (full data: 0.965)


@dataclass
class Session:
    """One user's current image, result and choices (bounded: one image, one result, <= MAX_REGIONS regions)."""

    image: np.ndarray | None = None
    image_path: str | None = None  # the upload the image came from, so a model change re-scores without re-reading
    result: AnomalyResult | None = None
    model_name: str | None = None  # the model that produced `result`
    object_name: str = ""
    threshold: float | None = None
    few_shot: InspectionModel | None = None
    few_shot_key: str = ""
    selected: np.ndarray | None = None
    region_labels: np.ndarray | None = None  # 0 = none, i = region i (one small label image, not one mask each)
    scale: int = 1  # the displayed picture is the image enlarged by this whole factor

    @property
    def regions(self) -> list[np.ndarray]:
        """The predicted regions at the current threshold, largest first, as boolean masks."""
        if self.region_labels is None:
            return []
        return [self.region_labels == index for index in range(1, int(self.region_labels.max()) + 1)]

    @regions.setter
    def regions(self, regions: list[np.ndarray]) -> None:
        if not regions:
            self.region_labels = None
            return
        labels = np.zeros(regions[0].shape, np.uint8)  # MAX_REGIONS < 256
        for index, region in enumerate(regions, start=1):
            labels[region] = index
        self.region_labels = labels

    def forget_result(self) -> None:
        """Drop everything derived from the last scoring (the image itself stays for a re-score)."""
        self.result, self.model_name, self.threshold, self.selected, self.regions = None, None, None, None, []

    def forget_image(self) -> None:
        self.forget_result()
        self.image, self.image_path, self.scale = None, None, 1


@dataclass
class ScoreView:
    """Everything the app shows about one result; `cleared()` is the view with no result."""

    picture: np.ndarray | None
    score: float | None
    verdict: str
    threshold: float | None  # the threshold in use (the slider's)
    model_threshold: float | None  # the model's own (the reset target and the colour scale's anchor)
    message: str
    model_label: str  # which model produced this result
    legend: str

    @property
    def score_text(self) -> str:
        return "" if self.score is None else number_text(self.score)


def cleared(message: str = "") -> ScoreView:
    return ScoreView(None, None, "", None, None, message, "", legend_html(None))


def verdict(score: float, threshold: float) -> str:
    if score >= threshold:
        return f"DEFECT (score {number_text(score)} ≥ threshold {number_text(threshold)})"
    return f"OK (score {number_text(score)} < threshold {number_text(threshold)})"


def _files_key(paths: list[str]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            digest.update(hashlib.sha256(handle.read()).digest())
    return digest.hexdigest()


def _few_shot_model(pipeline: InspectionPipeline, session: Session, reference_paths: list[str] | None,
                    object_name: str, progress=None) -> InspectionModel:
    """Reuse the session's bank while the same references are given; refit when they change.

    The bank lives in the session (gr.State), so each user builds their own, and the count is checked
    before any reference is decoded. `progress(fraction, desc)` reports the build's steps.
    """
    paths = list(reference_paths or [])
    if not paths:
        raise PipelineError("Few-shot mode needs 1 to 16 normal reference images of the same object: add them first.")
    pipeline.check_few_shot_count(len(paths))
    key = _files_key(paths)
    if session.few_shot is None or session.few_shot_key != key:
        report = progress or (lambda fraction, desc: None)
        report(0.0, f"Reading {len(paths)} reference image(s)")
        images = [read_upload(p) for p in paths]
        report(0.3, f"Building the few-shot bank from {len(images)} reference(s) and setting its threshold")
        session.few_shot = pipeline.fit_few_shot(images, object_name)
        session.few_shot_key = key
        report(1.0, "Few-shot bank ready")
    return session.few_shot


def quality_label(model: InspectionModel) -> str:
    """The measured quality of a mode without an installed model (few-shot, reference-free); else ''."""
    if model.kind == "clip_ada":
        return MEASURED_QUALITY[REFERENCE_FREE]
    if model.report is not None:
        count = len(model.report.used)
        nearest = min(FEW_SHOT_AUROC, key=lambda k: abs(k - count))
        return MEASURED_QUALITY[FEW_SHOT].format(auroc=f"{FEW_SHOT_AUROC[nearest]:.2f} with {nearest} reference(s)")
    return ""


def choose_model(pipeline: InspectionPipeline, session: Session, model_name: str,
                 reference_paths: list[str] | None, object_name: str, progress=None) -> InspectionModel:
    if model_name == FEW_SHOT:
        return _few_shot_model(pipeline, session, reference_paths, object_name, progress)
    return pipeline.model(model_name)


def describe_object(model: InspectionModel, object_choice: str) -> str:
    """Installed models know their object; few-shot and reference-free use the user's choice."""
    return model.object or object_choice


def start_over(session: Session) -> ScoreView:
    """The first step of every image/model change: no output may keep showing the previous result."""
    session.forget_result()
    return cleared()


def clear_image(session: Session) -> ScoreView:
    """The upload was removed: forget the image too."""
    session.forget_image()
    return cleared()


def _session_image(session: Session, image_path: str) -> np.ndarray:
    """The decoded upload; a re-score of the same upload (another model, threshold) reuses it."""
    if session.image is not None and session.image_path == str(image_path):
        return session.image
    session.forget_image()  # a failed read must not leave the previous image answering for this one
    image = read_upload(image_path)
    session.image, session.image_path, session.scale = image, str(image_path), display_scale(image.shape)
    return image


def check_size(pipeline: InspectionPipeline, model: InspectionModel, image: np.ndarray) -> None:
    """Say in plain words when an image is smaller than the model can look at (before the scorer does)."""
    need = pipeline.min_image_side(model)
    height, width = image.shape[:2]
    if min(height, width) < need:
        raise UploadError(
            f"This image is {width}×{height} pixels; the model needs at least {need}×{need} to see any detail. "
            "Upload a larger image (or a less tightly cropped one)."
        )


def score_upload(pipeline: InspectionPipeline, session: Session, image_path: str | None, model_name: str,
                 reference_paths: list[str] | None = None, object_choice: str = "", progress=None) -> ScoreView:
    """Upload (or a model change) -> heatmap with region outlines, score, verdict and which model said so."""
    session.forget_result()
    if not image_path:
        session.forget_image()
        raise UploadError("Upload an image first.")
    image = _session_image(session, image_path)
    model = choose_model(pipeline, session, model_name, reference_paths, object_choice, progress)
    check_size(pipeline, model, image)
    result = pipeline.score(image, model)
    session.result, session.model_name = result, model.name
    quality = quality_label(model)
    if quality:
        session.model_name = f"{model.name} ({quality})"
    session.object_name = describe_object(model, object_choice)
    session.threshold = result.threshold
    notes = " ".join(model.notes[:-1]) if model.report is not None else ""  # merges and left-out references
    message = " ".join(m for m in (notes, unfamiliar_warning(result, session.object_name)) if m)
    return render_session(pipeline, session, message)


def unfamiliar_warning(result: AnomalyResult, object_name: str) -> str:
    """A warning when most of the image scores above the model's threshold (see UNFAMILIAR_AREA_FRACTION)."""
    fraction = float(np.mean(result.anomaly_map >= result.threshold))
    if fraction < UNFAMILIAR_AREA_FRACTION:
        return ""
    subject = f"a {object_name}" if object_name else "the object this model inspects"
    return (f"⚠ {fraction:.0%} of this image scores above the model's threshold: it does not look like the "
            f"images this model was trained on (is it {subject}, photographed the same way?). "
            "Treat the regions below with caution.")


def render_session(pipeline: InspectionPipeline, session: Session, message: str) -> ScoreView:
    result, threshold = session.result, session.threshold
    session.regions = pipeline.regions(result, threshold)[:MAX_REGIONS]
    model_threshold = result.threshold
    picture = enlarge(overlay(session.image, result.anomaly_map, model_threshold), session.scale)
    regions = session.regions
    selected_index = _index_of(regions, session.selected)
    extra = session.selected if session.selected is not None and selected_index is None else None
    picture = draw_outlines(picture, regions, selected_index, extra, session.scale)
    count = len(regions)
    summary = f"{count} predicted defect region{'s' if count != 1 else ''}."
    if count:
        summary += " Click one to read what it is."
    return ScoreView(picture, result.score, verdict(result.score, threshold), threshold, model_threshold,
                     " ".join(m for m in (message, summary) if m), model_label(session.model_name),
                     legend_html(model_threshold, session.model_name or ""))


def model_label(model_name: str | None) -> str:
    return f"Result from: {model_name}" if model_name else ""


def _index_of(regions: list[np.ndarray], selected: np.ndarray | None) -> int | None:
    if selected is None:
        return None
    for index, region in enumerate(regions):
        if region.shape == selected.shape and np.array_equal(region, selected):
            return index
    return None


def _require_result(session: Session, then: str = "") -> None:
    if session.result is None:
        raise UploadError(f"Upload an image and score it first{then}.")


def change_threshold(pipeline: InspectionPipeline, session: Session, threshold: float | None) -> ScoreView:
    """A typed or dragged threshold: outlines, verdict and region count follow; colours do not (fixed scale)."""
    _require_result(session)
    if threshold is None or not np.isfinite(threshold) or threshold < 0:
        raise UploadError("Type a threshold of 0 or more.")
    session.threshold, session.selected = float(threshold), None
    return render_session(pipeline, session, "")


def reset_threshold(pipeline: InspectionPipeline, session: Session) -> ScoreView:
    """↺: back to the threshold the model was calibrated with."""
    _require_result(session)
    return change_threshold(pipeline, session, session.result.threshold)


def to_image_xy(session: Session, x: float, y: float) -> tuple[int, int]:
    """A click on the displayed (enlarged) picture -> image pixel coordinates."""
    return int(x // session.scale), int(y // session.scale)


def describe_point(pipeline: InspectionPipeline, session: Session, x: float, y: float):
    """A click at image pixel (x, y) -> (picture with the region highlighted, {caption: prob})."""
    _require_result(session, ", then click on it")
    if not pipeline.can_describe:
        raise PipelineError("No region describer is installed, so regions cannot be described.")
    if x is None or y is None:
        raise UploadError("Click on the picture, or type both x and y.")
    region, _, ranked = pipeline.describe_click(
        session.image, session.result, int(round(x)), int(round(y)), session.object_name, session.threshold,
        top=CAPTIONS_SHOWN,
    )
    session.selected = region
    view = render_session(pipeline, session, "")
    return view, {caption: probability for caption, probability in ranked}


TABLE_HEADERS = ["#", "area (px)", "centre (x, y)", "most likely defect", "probability"]


def describe_all(pipeline: InspectionPipeline, session: Session) -> list[list]:
    """One row per predicted region: number, area, centre, its most likely defect and that probability (the
    scorer flagged every one, so "no defect" is not among the answers; see InspectionPipeline.describe)."""
    _require_result(session)
    if not pipeline.can_describe:
        raise PipelineError("No region describer is installed, so regions cannot be described.")
    rows = []
    for number, region in enumerate(pipeline.regions(session.result, session.threshold)[:MAX_REGIONS], start=1):
        caption, probability = pipeline.describe(session.image, region, session.object_name, flagged=True)[0]
        ys, xs = np.nonzero(region)
        rows.append([number, int(region.sum()), f"({int(xs.mean())}, {int(ys.mean())})", caption,
                     f"{probability:.0%}"])
    return rows


def model_choices(pipeline: InspectionPipeline) -> list[str]:
    return pipeline.model_names + [FEW_SHOT]


def object_choices(pipeline: InspectionPipeline) -> list[str]:
    if pipeline.describer is None:
        return sorted({m.object for m in pipeline.models.values() if m.object})
    return sorted(pipeline.describer.config.get("candidates", {}))


__all__ = [
    "FEW_SHOT", "REFERENCE_FREE", "ScoreView", "Session", "change_threshold", "clear_image", "cleared",
    "describe_all", "describe_point", "model_choices", "object_choices", "quality_label", "reset_threshold", "score_upload",
    "start_over", "to_image_xy", "unfamiliar_warning", "verdict",
]
