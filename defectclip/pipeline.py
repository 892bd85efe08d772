"""InspectionPipeline: everything the app needs, behind three calls (DESIGN.md "pipeline.py").

- `score(image, model)` -> AnomalyResult from an installed PatchCore/PaDiM state, a few-shot bank
  built on the spot, or the reference-free CLIP-ADA head;
- `regions(result)` -> the predicted defect regions;
- `describe(image, region, object)` -> the object's candidate captions ranked for that region.

A pipeline is loaded from one folder laid out as
```
<root>/scorers/<name>/      PatchCore / PaDiM folders (config.json + model.safetensors)
<root>/describer/           AlphaDescriber folder (optional)
<root>/clip_ada/            CLIP-ADA folder (optional)
```
which is what `scripts/build_embedded_default.py` writes and what the Hub repos hold.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .regions_ui import predicted_regions, region_from_click
from .results import AnomalyResult

FEW_SHOT = "few-shot"
REFERENCE_FREE = "reference-free (CLIP-ADA)"
MAX_FEW_SHOT_IMAGES = 16  # = defectclip.scoring.few_shot.MAX_REFERENCES


class PipelineError(ValueError):
    """A request the pipeline cannot serve; the message tells the user what to do."""


@dataclass
class InspectionModel:
    """One choice in the app's model list."""

    name: str
    object: str  # what the model inspects, e.g. "magnetic tile"; "" when it is object-agnostic
    kind: str  # "patchcore", "padim" or "clip_ada"
    scorer: Any  # has predict(list of images) -> list[AnomalyResult] and a `threshold`
    report: Any = None  # few-shot: the FewShotReport of the build (merged and left-out references)

    @property
    def threshold(self) -> float:
        return float(self.scorer.threshold)

    @property
    def notes(self) -> list[str]:
        """What the user should know about how this model was built (few-shot merges, outliers)."""
        return self.report.messages() if self.report is not None else []


def _object_of(folder: Path) -> str:
    """inspection.json beside a scorer names the object it inspects; else the folder name stands in."""
    side = folder / "inspection.json"
    if side.is_file():
        return str(json.loads(side.read_text())["object"])
    return folder.name.replace("_", " ")


def load_scorers(folder: Path) -> dict[str, InspectionModel]:
    """Every PatchCore/PaDiM folder under `folder`, keyed by a readable name."""
    from .scoring import load_config, load_scorer

    models = {}
    for model_dir in sorted(p for p in folder.iterdir() if (p / "config.json").is_file()):
        config = load_config(model_dir)
        scorer = load_scorer(model_dir)
        object_name = _object_of(model_dir)
        name = f"{object_name} · {config['model_type']} · {config.get('tower', '')}"
        models[name] = InspectionModel(name, object_name, config["model_type"], scorer)
    return models


class InspectionPipeline:
    """Scoring, few-shot fitting and region description for the app (thread-safe for inference)."""

    def __init__(self, models: dict[str, InspectionModel], describer=None, clip_ada=None,
                 few_shot_tower: str = "offline:efficientnet_lite0", few_shot_image_size: int = 224):
        self.models = dict(models)
        self.describer = describer
        self.clip_ada = clip_ada
        if clip_ada is not None:
            self.models[REFERENCE_FREE] = InspectionModel(REFERENCE_FREE, "", "clip_ada", clip_ada)
        self.few_shot_tower = few_shot_tower
        self.few_shot_image_size = few_shot_image_size
        # torch modules are not safe to call from many threads at once: the app's queue runs
        # several requests concurrently, so calls into the installed models are serialised here.
        # Few-shot builds do not take this lock: they run on their own tower (see fit_few_shot).
        self._lock = threading.Lock()
        self._few_shot_tower_lock = threading.Lock()
        self._few_shot_tower_built = None

    # -- construction ----------------------------------------------------------------------------

    @classmethod
    def from_folder(cls, root: str | Path, **kwargs) -> "InspectionPipeline":
        root = Path(root)
        if not root.is_dir():
            raise PipelineError(f"Model folder {root} does not exist.")
        models = load_scorers(root / "scorers") if (root / "scorers").is_dir() else {}
        describer = _load_describer(root / "describer")
        clip_ada = _load_clip_ada(root / "clip_ada")
        if not models and clip_ada is None:
            raise PipelineError(f"{root} holds no scorer (scorers/<name>/) and no CLIP-ADA head (clip_ada/).")
        return cls(models, describer, clip_ada, **kwargs)

    # -- scoring ----------------------------------------------------------------------------------

    @property
    def model_names(self) -> list[str]:
        return list(self.models)

    def model(self, name: str) -> InspectionModel:
        if name not in self.models:
            raise PipelineError(f"Unknown model {name!r}; choose one of {self.model_names}.")
        return self.models[name]

    def score(self, image: np.ndarray, model: str | InspectionModel) -> AnomalyResult:
        """Score one H x W x 3 uint8 RGB image."""
        inspection = model if isinstance(model, InspectionModel) else self.model(model)
        with self._lock:
            return inspection.scorer.predict([_check_rgb(image)])[0]

    def fit_few_shot(self, normal_images: Sequence[np.ndarray], object_name: str = "", seed: int = 0) -> InspectionModel:
        """Build a PatchCore bank from 1-16 normal reference images of the object, on the spot.

        One feature pass per reference, no refits; the threshold comes from the references alone
        (their held-out scores against synthetic defects made from them, defectclip.scoring.few_shot).
        Identical references are merged and outliers left out; `InspectionModel.notes` says which.
        The build holds no pipeline-wide lock, so other sessions keep scoring meanwhile.
        """
        from .scoring.few_shot import FewShotError, check_reference_count, fit_few_shot

        try:
            check_reference_count(len(normal_images))
            images = [_check_rgb(image) for image in normal_images]
            scorer, report = fit_few_shot(images, self.few_shot_tower_model(), self.few_shot_image_size, seed=seed)
        except FewShotError as err:
            raise PipelineError(str(err)) from err
        name = f"{FEW_SHOT} ({len(report.used)} refs)"
        return InspectionModel(name, object_name, "patchcore", scorer, report=report)

    def few_shot_tower_model(self):
        """The few-shot tower, built once and shared by every session's bank (read-only at inference).

        Its patch-centre offset is measured here, once, under a lock of its own: that is the only
        step that runs a backward pass through the tower.
        """
        with self._few_shot_tower_lock:
            if self._few_shot_tower_built is None:
                from .scoring import PatchCore

                probe = PatchCore(self.few_shot_tower, image_size=self.few_shot_image_size, coreset_ratio=1.0)
                probe.features.centre_offset()
                self._few_shot_tower_built = probe.tower
            return self._few_shot_tower_built

    def regions(self, result: AnomalyResult, threshold: float | None = None) -> list[np.ndarray]:
        """Predicted defect regions at `threshold` (default: the model's own)."""
        threshold = result.threshold if threshold is None else threshold
        return predicted_regions(result.anomaly_map >= threshold)

    # -- description --------------------------------------------------------------------------------

    @property
    def can_describe(self) -> bool:
        return self.describer is not None

    def candidates(self, object_name: str) -> list[str]:
        if self.describer is None:
            raise PipelineError("No region describer is installed.")
        known = self.describer.config.get("candidates", {})
        if object_name in known:
            return list(known[object_name])
        return sorted({c for captions in known.values() for c in captions})

    def describe(self, image: np.ndarray, region: np.ndarray, object_name: str) -> list[tuple[str, float]]:
        """The object's candidate captions ranked for `region` of `image`, with probabilities."""
        candidates = self.candidates(object_name)
        with self._lock:
            return self.describer.describe(_check_rgb(image), np.asarray(region, bool), candidates)

    def describe_click(self, image: np.ndarray, result: AnomalyResult, x: int, y: int, object_name: str,
                       threshold: float | None = None, top: int = 3):
        """The region a click selects, its index among the predicted regions, and its top captions."""
        regions = self.regions(result, threshold)
        region, index = region_from_click(regions, image.shape[:2], x, y)
        return region, index, self.describe(image, region, object_name)[:top]


def _check_rgb(image: np.ndarray) -> np.ndarray:
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise PipelineError(f"Expected an H x W x 3 uint8 RGB image, got {array.dtype} {array.shape}.")
    return array


def _load_describer(folder: Path):
    if not (folder / "describer_config.json").is_file():
        return None
    from .alphaclip import AlphaDescriber

    return AlphaDescriber.from_pretrained(folder).eval()


def _load_clip_ada(folder: Path):
    if not (folder / "config.json").is_file():
        return None
    from .clip_ada import ClipADA

    return ClipADA.load(folder)
