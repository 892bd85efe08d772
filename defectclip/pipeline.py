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
which is what `InspectionPipeline.save_pretrained` and `scripts/build_embedded_default.py` write and what the
Hub repos hold; `InspectionPipeline.from_pretrained(<folder> | "org/repo")` reads it.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .artifacts import Artifact
from .captions import NO_DEFECT
from .errors import DefectclipError
from .io import read_json, write_json_atomic
from .regions_ui import predicted_regions, region_from_click
from .results import AnomalyResult

FEW_SHOT = "few-shot"
REFERENCE_FREE = "reference-free (CLIP-ADA)"
MAX_FEW_SHOT_IMAGES = 16  # = defectclip.scoring.few_shot.MAX_REFERENCES
# Few-shot builds run on a thread of this niceness: a build is seconds of CPU for one user, a score is
# the sub-second request everyone else waits on, so on a busy CPU the scores go first. Measured on the
# 2-core dev machine (bench_app_latency.py): another session's score p95 went from 0.40 s alone to
# 0.90 s during a 16-reference build at normal priority (2.24x).
BUILD_NICENESS = 10


class PipelineError(DefectclipError):
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
        from .schema import Config

        return Config(read_json(side), side).string("object")
    return folder.name.replace("_", " ")


METHOD_NAMES = {"patchcore": "PatchCore", "padim": "PaDiM", "ensemble": "Ensemble", "clip_ada": "CLIP-ADA"}


def backbone_label(spec: str, folder: Path | None = None) -> str:
    """A tower spec as a person would name it: 'timm:resnet18' -> 'resnet18 (ImageNet)',
    'local-dir:../tab_backbone' -> 'TAB efficientnet_lite0' (read from the folder), never a path."""
    kind, _, name = spec.partition(":")
    if kind in ("timm", "offline"):
        return f"{name} (ImageNet)"
    if kind == "hf-hub":
        return name.rstrip("/").split("/")[-1]
    if kind == "open_clip":
        return f"{name.split('/')[0]} (CLIP)"
    if kind == "local-dir":
        local = Path(name) if folder is None or Path(name).is_absolute() else folder / name
        return _local_backbone_label(local)
    return spec.replace(":", " ")


def _local_backbone_label(folder: Path) -> str:
    config = folder / "config.json"
    try:
        architecture = json.loads(config.read_text()).get("architecture") if config.is_file() else None
    except (OSError, ValueError):
        architecture = None
    name = architecture or folder.resolve().name.replace("_", " ")
    return f"TAB {name}" if (folder / "tab_config.json").is_file() else name


def scorer_backbone_label(scorer: Any, config: dict, folder: Path) -> str:
    """The backbone part of a scorer's plain name; an ensemble's names each loaded member's tower."""
    members = getattr(scorer, "members", None)
    if members is not None:
        return " + ".join(f"{METHOD_NAMES.get(m.model_type, m.model_type)} {backbone_label(m.tower.spec)}" for m in members)
    return backbone_label(config.get("tower", ""), folder)


def plain_model_name(object_name: str, model_type: str, backbone: str) -> str:
    """What the app's model list shows: object · method · backbone."""
    return f"{object_name or 'any object'} · {METHOD_NAMES.get(model_type, model_type)} · {backbone}"


def load_scorers(
    folder: Path, device: str = "cpu", root: Path | None = None, allow_absolute_tower: bool = True
) -> dict[str, InspectionModel]:
    """Every PatchCore/PaDiM/Ensemble folder under `folder`, keyed by a plain name (object · method · backbone).

    Scorers are loaded on `device` (the CPU by default) and moved once with `InspectionPipeline.to`:
    picking CUDA while loading would touch the GPU before a ZeroGPU Space has imported `spaces`.
    `root` is the artifact a scorer's `local-dir:` tower must stay inside (default: its own folder).
    """
    from .scoring import load_config, load_scorer

    models = {}
    for model_dir in sorted(p for p in folder.iterdir() if (p / "config.json").is_file()):
        config = load_config(model_dir)
        scorer = load_scorer(model_dir, device=device, root=root, allow_absolute_tower=allow_absolute_tower)
        object_name = _object_of(model_dir)
        name = plain_model_name(object_name, config["model_type"], scorer_backbone_label(scorer, config, model_dir))
        if name in models:  # two folders that differ only in details the plain name leaves out
            name = f"{name} ({model_dir.name})"
        models[name] = InspectionModel(name, object_name, config["model_type"], scorer)
    return models


class InspectionPipeline(Artifact):
    """Scoring, few-shot fitting and region description for the app (thread-safe for inference)."""

    card_kind = "pipeline"

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
        self.device = None  # None: each model where it was loaded (the CPU); set by `to`

    # -- construction ----------------------------------------------------------------------------

    @classmethod
    def _read_artifact(cls, root: Path, allow_absolute_towers: bool = False, **kwargs) -> "InspectionPipeline":
        """Load the models folder; every `local-dir:` tower must lie inside it.

        A models folder is a shared artifact (a Hub repo, the embedded default), so by default its
        towers may only be named relative to it; `allow_absolute_towers=True` accepts absolute paths
        for a folder assembled on this machine.
        """
        options = {"root": root, "allow_absolute_tower": allow_absolute_towers}
        models = load_scorers(root / "scorers", **options) if (root / "scorers").is_dir() else {}
        describer = _load_describer(root / "describer", **options)
        clip_ada = _load_clip_ada(root / "clip_ada", **options)
        if not models and clip_ada is None:
            raise PipelineError(f"{root} holds no scorer (scorers/<name>/) and no CLIP-ADA head (clip_ada/).")
        return cls(models, describer, clip_ada, **kwargs)

    def _write_artifact(self, root: Path, **options) -> None:
        """scorers/<folder>/ (+ inspection.json naming the object), describer/, clip_ada/: what `_read_artifact`
        reads. Towers are named by their specs; `defectclip.sharing.export_pipeline` bundles local ones."""
        for folder_name, model in self.scorer_folders().items():
            target = root / "scorers" / folder_name
            target.mkdir(parents=True)
            model.scorer._write_artifact(target)
            write_json_atomic(target / "inspection.json", {"object": model.object})
        if self.describer is not None:
            (root / "describer").mkdir()
            self.describer._write_artifact(root / "describer", merged=bool(self.describer.config.get("merged")))
        if self.clip_ada is not None:
            (root / "clip_ada").mkdir()
            self.clip_ada._write_artifact(root / "clip_ada")

    def scorer_folders(self) -> dict[str, InspectionModel]:
        """The PatchCore/PaDiM models by folder name: the object's name, with the method when it repeats."""
        scorers = [m for m in self.models.values() if m.kind != "clip_ada"]
        counts: dict[str, int] = {}
        for model in scorers:
            counts[model.object] = counts.get(model.object, 0) + 1
        named = {}
        for index, model in enumerate(scorers):
            base = (model.object or "model").replace(" ", "_")
            name = base if counts[model.object] == 1 else f"{base}-{model.kind}-{index}"
            named[name] = model
        return named

    # -- device placement ---------------------------------------------------------------------------

    def to(self, device: str | Any) -> "InspectionPipeline":
        """Move every model (scorers, few-shot tower, describer, CLIP-ADA) to `device`, once, at start-up.

        The app calls this after loading everything on the CPU (and, on a ZeroGPU Space, after
        `import spaces`), so no model ever picks its device on its own.
        """
        import torch

        device = torch.device(device)
        with self._lock:
            for model in self.models.values():
                _move_model(model.scorer, device)
            for module in (self.describer,):
                if module is not None:
                    _move_model(module, device)
        with self._few_shot_tower_lock:
            self._few_shot_tower_built = None  # rebuilt on `device` at the next few-shot build
        self.device = device
        return self

    def tensors(self) -> dict[str, Any]:
        """Every parameter, buffer and state tensor of every model, by a readable name (for placement checks)."""
        found = {}
        for name, model in self.models.items():
            found.update({f"{name}/{key}": value for key, value in _model_tensors(model.scorer).items()})
        if self.describer is not None:
            found.update({f"describer/{key}": value for key, value in _model_tensors(self.describer).items()})
        return found

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

    def min_image_side(self, model: str | InspectionModel) -> int:
        """The smallest image side `model` can score (one patch of its coarsest stage); 1 if it has no limit."""
        inspection = model if isinstance(model, InspectionModel) else self.model(model)
        own = getattr(inspection.scorer, "min_image_side", None)  # an ensemble: its members' largest
        if own is not None:
            return int(own)
        features = getattr(inspection.scorer, "features", None)
        return int(getattr(features, "min_size", 1) or 1)

    def fit_few_shot(self, normal_images: Sequence[np.ndarray], object_name: str = "", seed: int = 0) -> InspectionModel:
        """Build a PatchCore bank from 1-16 normal reference images of the object, on the spot.

        One feature pass per reference, no refits; the threshold comes from the references alone
        (their held-out scores against synthetic defects made from them, defectclip.scoring.few_shot),
        every map blended with the image's self-similarity map (defectclip.scoring.blend). Identical
        references are merged and outliers left out; `InspectionModel.notes` says which.
        The build holds no pipeline-wide lock, so other sessions keep scoring meanwhile.
        """
        from .scoring.few_shot import FewShotError, check_reference_count, fit_few_shot

        try:
            check_reference_count(len(normal_images))
            images = [_check_rgb(image) for image in normal_images]
            tower = self.few_shot_tower_model()
            scorer, report = run_at_low_priority(
                fit_few_shot, images, tower, self.few_shot_image_size, seed=seed, device=self.device or "cpu"
            )
        except FewShotError as err:
            raise PipelineError(str(err)) from err
        name = f"{FEW_SHOT} ({len(report.used)} refs)"
        return InspectionModel(name, object_name, "patchcore", scorer, report=report)

    @staticmethod
    def check_few_shot_count(count: int) -> None:
        """Raise a PipelineError for a reference count outside 1-16, before anything is decoded."""
        from .scoring.few_shot import FewShotError, check_reference_count

        try:
            check_reference_count(count)
        except FewShotError as err:
            raise PipelineError(str(err)) from err

    def few_shot_tower_model(self):
        """The few-shot tower, built once and shared by every session's bank (read-only at inference).

        Its patch-centre offset is measured here, once, under a lock of its own: that is the only
        step that runs a backward pass through the tower.
        """
        with self._few_shot_tower_lock:
            if self._few_shot_tower_built is None:
                from .scoring import PatchCore

                probe = PatchCore(self.few_shot_tower, image_size=self.few_shot_image_size, coreset_ratio=1.0, max_bank_size=None,
                                  device=self.device or "cpu")
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
        """The object's own candidate captions; an object the describer does not know raises UnknownObjectError
        (never another object's captions: they would describe the region as something it cannot be)."""
        if self.describer is None:
            raise PipelineError("No region describer is installed.")
        return self.describer.candidates_for(object_name)

    def describe(self, image: np.ndarray, region: np.ndarray, object_name: str,
                 flagged: bool = False) -> list[tuple[str, float]]:
        """The object's candidate captions ranked for `region` of `image`, with probabilities.

        `flagged`: the scorer has flagged the region (a predicted region), so the question left is which
        defect it is: only the object's defect captions are ranked (the probabilities renormalised over
        them). Asked with "no defect" among the answers, a describer may call a scorer's blob normal (the
        one shipped in session 9 did for most of them, at > 0.99), contradicting the heatmap around it.
        """
        candidates = self.candidates(object_name)
        if flagged:
            candidates = [c for c in candidates if not c.startswith(NO_DEFECT)] or candidates
        with self._lock:
            return self.describer.describe(_check_rgb(image), np.asarray(region, bool), candidates)

    def describe_click(self, image: np.ndarray, result: AnomalyResult, x: int, y: int, object_name: str,
                       threshold: float | None = None, top: int = 3):
        """The region a click selects, its index among the predicted regions (None: a disk around a click
        away from them, where "no defect" is a possible answer), and its top captions."""
        regions = self.regions(result, threshold)
        region, index = region_from_click(regions, image.shape[:2], x, y)
        return region, index, self.describe(image, region, object_name, flagged=index is not None)[:top]


def run_at_low_priority(fn, *args, **kwargs):
    """fn(*args, **kwargs) on a fresh thread lowered to BUILD_NICENESS; its result or its exception here.

    A fresh thread, because niceness cannot be raised back without privileges: the caller's (a web
    server's worker) must keep its own. Where priorities cannot be set, it simply runs at the same one.
    """
    outcome: dict[str, Any] = {}

    def work():
        try:
            me = threading.get_native_id()  # a thread is its own task on Linux: this lowers only it
            os.setpriority(os.PRIO_PROCESS, me, min(19, os.getpriority(os.PRIO_PROCESS, me) + BUILD_NICENESS))
        except (AttributeError, OSError):  # not Linux, or not permitted: same priority
            pass
        try:
            outcome["value"] = fn(*args, **kwargs)
        except BaseException as err:  # handed to the caller, with its traceback
            outcome["error"] = err

    worker = threading.Thread(target=work, name="few-shot-build", daemon=True)
    worker.start()
    worker.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _check_rgb(image: np.ndarray) -> np.ndarray:
    from .data.images import MAX_IMAGE_PIXELS

    if not isinstance(image, np.ndarray):
        raise PipelineError(
            f"Expected an H x W x 3 uint8 RGB image (numpy array), got a {type(image).__name__}; "
            "read files with defectclip.data.load_image_array."
        )
    array = image
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise PipelineError(f"Expected an H x W x 3 uint8 RGB image, got {array.dtype} {array.shape}.")
    height, width = array.shape[:2]
    if height < 1 or width < 1 or height * width > MAX_IMAGE_PIXELS:
        raise PipelineError(
            f"The image is {width} x {height} pixels; it must have pixels and at most {MAX_IMAGE_PIXELS / 1e6:.0f} MP."
        )
    return array


def _load_describer(folder: Path, **options):
    if not (folder / "describer_config.json").is_file():
        return None
    from .alphaclip import AlphaDescriber

    return AlphaDescriber.from_pretrained(folder, **options).eval()


def _load_clip_ada(folder: Path, **options):
    if not (folder / "config.json").is_file():
        return None
    from .clip_ada import ClipADA

    return ClipADA.from_pretrained(folder, **options)


def _move_model(model: Any, device) -> None:
    """Move a torch module, or a scorer (its tower plus the state tensors it holds as attributes)."""
    import torch

    if isinstance(model, torch.nn.Module):
        model.to(device)
        cache = getattr(model, "_caption_cache", None)  # the describer's text embeddings
        if isinstance(cache, dict):
            for key, value in cache.items():
                cache[key] = value.to(device)
        return
    if hasattr(model, "members"):  # an ensemble of scorers
        for member in model.members:
            _move_model(member, device)
        return
    model.tower.to(device)
    for key, value in vars(model).items():
        if isinstance(value, torch.Tensor):
            setattr(model, key, value.to(device))
    model.device = device


def _model_tensors(model: Any) -> dict[str, Any]:
    import torch

    if isinstance(model, torch.nn.Module):
        found = dict(model.named_parameters())
        found.update(dict(model.named_buffers()))
        cache = getattr(model, "_caption_cache", None)
        if isinstance(cache, dict):
            found.update({f"caption_cache/{key}": value for key, value in cache.items()})
        return found
    if hasattr(model, "members"):  # an ensemble of scorers
        return {f"member_{index}/{key}": value for index, member in enumerate(model.members)
                for key, value in _model_tensors(member).items()}
    found = {f"tower.{key}": value for key, value in _model_tensors(model.tower).items()}
    found.update({key: value for key, value in vars(model).items() if isinstance(value, torch.Tensor)})
    return found
