"""The scorer base shared by PatchCore and PaDiM, and its artifact folder.

`FeatureScorer` holds the harness around each method's model: the tower and device, the input plan
(`plan`: resize or tiles, saved with the model), input batching (`inputs`), patch features
(`features`), maps (`maps`), calibration (`thresholds`), and the artifact: `config.json` +
`model.safetensors`, written atomically, read back strictly.
"""

from __future__ import annotations

import abc
import math
from pathlib import Path
from typing import Any, ClassVar, Iterable, Iterator, Sequence

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..artifacts import Artifact
from ..data import Preprocess, image_to_tensor
from ..errors import ArtifactError, DefectclipError
from ..io import read_json_object, write_json_atomic
from ..results import AnomalyResult
from ..schema import MAX_SIGMA, Config, check_number, check_preprocess, check_tensor, confine_local_dir
from ..towers import TowerError, VisionTower, build_vision_tower, split_spec
from .errors import ScoringError
from .features import PatchFeatures, ViewBatch, check_layers, default_layers, input_dtype
from .blend import MapBlend
from .inference import resolve_inference
from .inputs import as_image_source, chunked, dataset_labels, iter_view_groups, normal_subset
from .maps import DEFAULT_SIGMA, patch_scores_to_maps
from .photometric import Photometric, parse_photometric
from .plan import InputPlan, crop, parse_plan, stitch
from .thresholds import DEFAULT_QUANTILE, calibrate_threshold, json_threshold

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """'auto' (or None) picks the GPU when one is present, else the CPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def portable_spec(spec: str) -> str:
    """A `local-dir:` spec with an absolute path, so a saved model loads from any working folder."""
    kind, name = split_spec(spec)
    if kind == "local-dir":
        return f"local-dir:{Path(name).expanduser().resolve()}"
    return spec


def resolve_saved_spec(spec: str, folder: str | Path, root: str | Path | None = None,
                       allow_absolute: bool = True) -> str:
    """A saved `local-dir:<relative path>` tower is relative to the model folder itself.

    That is how an exported model carries its own backbone (`local-dir:tower`) and still loads from
    any place it is copied or downloaded to. The path must stay inside `root` (the artifact's top
    folder, by default the model folder): see `defectclip.schema.confine_local_dir`.
    """
    return confine_local_dir(spec, folder, root, allow_absolute=allow_absolute)


def build_tower(tower: str | VisionTower) -> VisionTower:
    if isinstance(tower, VisionTower):
        return tower
    if isinstance(tower, str):
        return build_vision_tower(portable_spec(tower))
    raise ScoringError(f"tower must be a spec string or a VisionTower, got {type(tower).__name__}.")


def write_model_files(folder: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """config.json + model.safetensors into a (staging) folder."""
    write_json_atomic(folder / CONFIG_NAME, config)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(folder / WEIGHTS_NAME))


def _is_replaceable(folder: Path, member_prefix: str | None = None) -> bool:
    """Only an empty folder or an earlier save is overwritten, never a folder of unrelated files
    (`member_prefix`: an ensemble's save also holds its members' sub-folders, named so)."""
    if not folder.is_dir():
        return False
    names = {p.name for p in folder.iterdir()}
    if member_prefix is not None:
        names = {n for n in names if not n.startswith(member_prefix)}
    return names <= {CONFIG_NAME, WEIGHTS_NAME, "README.md"}


def read_model_folder(
    folder: str | Path, model_type: str, config_keys: set[str], tensor_keys: set[str]
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read a saved scorer, refusing missing or unexpected keys in either file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ScoringError(f"Model folder {folder} does not exist.")
    config = read_json_object(folder / CONFIG_NAME, "a saved PatchCore / PaDiM")
    if config.get("model_type") != model_type:
        raise ScoringError(f"{folder} holds a {config.get('model_type')!r} model, not {model_type!r}.")
    if config.get("format_version") != FORMAT_VERSION:
        raise ScoringError(f"{folder} has format_version {config.get('format_version')}; this code reads {FORMAT_VERSION}.")
    _require_same_keys(set(config), config_keys, folder / CONFIG_NAME, OPTIONAL_CONFIG_KEYS)
    return config, read_tensors(folder / WEIGHTS_NAME, tensor_keys)


def read_tensors(weights: Path, tensor_keys: set[str]) -> dict[str, torch.Tensor]:
    """The named tensors of a safetensors file; a damaged file is an ArtifactError naming it."""
    if not weights.is_file():
        raise ScoringError(f"{weights} not found: the model folder is incomplete.")
    try:
        with safe_open(str(weights), framework="pt") as handle:
            _require_same_keys(set(handle.keys()), tensor_keys, weights)
            return {key: handle.get_tensor(key) for key in tensor_keys}
    except DefectclipError:
        raise
    except Exception as err:  # noqa: BLE001 - safetensors raises its own and OS errors for a damaged file
        raise ArtifactError(f"Cannot read {weights}: {type(err).__name__}: {err}. The file is damaged; save or download it again.") from err


def check_base_config(config: Config) -> None:
    """The entries every scorer's config.json shares (types, ranges, finite numbers)."""
    config.string("tower")
    config.strings("layers")
    check_preprocess(config.sub("preprocess"))
    config.number("sigma", 0.0, MAX_SIGMA)
    config.number("seed", 0, None, integer=True)
    config.number("threshold", optional=True)
    config.string("calibration", optional=True)
    config.number("num_train_images", 0, None, integer=True)


def _require_same_keys(found: set[str], expected: set[str], path: Path, optional: set[str] = frozenset()) -> None:
    missing, unexpected = sorted(expected - found - optional), sorted(found - expected)
    if missing or unexpected:
        raise ScoringError(f"{path}: missing keys {missing}, unexpected keys {unexpected}.")


class FeatureScorer(Artifact, abc.ABC):
    """Base of PatchCore and PaDiM: input handling, batching, maps, calibration, save/load.

    Subclasses set `model_type`, `default_reductions`, `local_average`, and implement `_fit_batches`,
    `_score_patches`, `_state_tensors`, `_set_state` and `_method_config`; `constructor_keys` names the
    saved config entries their constructor takes besides the shared ones.
    """

    model_type: ClassVar[str]
    default_reductions: ClassVar[tuple[int, ...]]
    local_average: ClassVar[bool]
    method_config_keys: ClassVar[set[str]]
    constructor_keys: ClassVar[tuple[str, ...]]
    state_keys: ClassVar[set[str]]
    # Whether "auto" inference may run this method's tower in bfloat16: only where its quality was
    # measured that way (PatchCore: benchmarks/results/vs_anomalib_full.md).
    bf16_features: ClassVar[bool] = False

    def __init__(
        self,
        tower: str | VisionTower,
        layers: Sequence[str] | None,
        image_size: int | Sequence[int] | None,
        sigma: float,
        seed: int,
        device: str | torch.device | None,
        batch_size: int,
        plan: InputPlan | str | None = None,
        inference: str = "auto",
        photometric: Photometric | str | dict | None = None,
    ):
        """`inference`: how the frozen tower runs (see `inference.py`): "exact", "folded" (BatchNorm
        folded into the convolutions: the same features up to float rounding, faster), "bf16" (the
        folded tower in bfloat16) or "auto" (bf16 on an AMX CPU for methods whose quality was measured
        with it, `bf16_features`; folded on other CPUs; exact on a GPU). Not saved with the model: it
        is a property of the machine, like the search. `photometric`: "none" (default) or "match":
        every image brought to the training images' usual brightness and contrast (see photometric.py)."""
        if batch_size < 1:
            raise ScoringError(f"batch_size must be at least 1, got {batch_size}.")
        try:
            check_number(sigma, "sigma", 0.0, MAX_SIGMA)
        except ArtifactError as err:
            raise ScoringError(f"{err} (0 turns smoothing off; the papers use {DEFAULT_SIGMA:g}).") from None
        self.plan = parse_plan(plan)
        self.photometric = parse_photometric(photometric)
        self.device = resolve_device(device)
        self.tower = build_tower(tower).to(self.device).eval()
        self.layers = check_layers(self.tower, layers or default_layers(self.tower, self.default_reductions))
        preprocess = self.tower.preprocess
        if image_size is None and self.plan.is_tiled:
            image_size = self.plan.tile  # tiles are scored at their native resolution by default
        self.preprocess = preprocess.with_size(image_size) if image_size is not None else preprocess
        self._inference = inference
        self.features = PatchFeatures(self.tower, self.layers, self.preprocess, self.local_average,
                                      self._resolved_inference())
        self.sigma = float(sigma)
        self.seed = int(seed)
        self.batch_size = int(batch_size)
        self.threshold: float | None = None
        self.calibration: str | None = None
        self.num_train_images = 0
        # The self-similarity blend (scoring/blend.py; few-shot sets it): None = the method's map alone.
        self.self_similarity: MapBlend | None = None
        self._similarity = None  # its map maker, built on first use on this scorer's tower

    # ---- how the tower runs

    @property
    def inference(self) -> str:
        """The requested inference mode ("auto", "exact", "folded" or "bf16"); settable."""
        return self._inference

    @inference.setter
    def inference(self, mode: str) -> None:
        resolved = resolve_inference(mode, self.device, self.bf16_features)  # refuses an unknown mode first
        self._inference = mode
        self.features.inference = resolved

    @property
    def inference_mode(self) -> str:
        """The mode the tower runs in here: "exact", "folded" or "bf16"."""
        return self.features.inference

    def _resolved_inference(self) -> str:
        return resolve_inference(self._inference, self.device, self.bf16_features)

    # ---- fitting and scoring

    @property
    @abc.abstractmethod
    def is_fitted(self) -> bool:
        """Whether fit() has run (each method knows what its fitted state is)."""

    def fit(self, images: Any) -> "FeatureScorer":
        """Learn what normal patches look like from defect-free images (or a dataset's normal ones)."""
        normal = normal_subset(images)
        self.fit_photometric(normal)
        # The state is learnt from the exact tower whatever `inference` says: the coreset's greedy
        # selection amplifies the smallest feature change into another bank (float32 BatchNorm folding
        # alone, ~1e-7 relative, moved image AUROC by 0.4 point on the full magnetic tile, as another
        # seed would), so a fast tower would make the saved model depend on the machine that fitted it.
        # Fitting costs the extraction once per training image; scoring is what runs on every image.
        return self.fit_embedded(self.embed(normal, exact=True), len(normal))

    def fit_photometric(self, images: Any) -> Photometric:
        """Learn the exposure targets of a "match" photometric from normal images (one decoding pass;
        nothing to learn for "none"). fit() calls it; call it before `embed` when fitting with
        `fit_embedded`."""
        if self.photometric.mode != "none":
            source = as_image_source(images)
            self.photometric = self.photometric.fitted_to(
                image_to_tensor(source[i]) for i in range(len(source))
            )
        return self.photometric

    def fit_embedded(self, batches: Iterable[ViewBatch], num_images: int) -> "FeatureScorer":
        """fit() on features from `embed` (so one extraction can serve several seeds or methods).

        With a tiles plan every tile is a training sample: PatchCore's bank and PaDiM's per-position
        statistics are shared by all tiles. The features must come from `embed` under this scorer's
        photometric setting (fitted first with `fit_photometric`).
        """
        if not self.photometric.is_fitted:
            raise ScoringError("photometric 'match' has no target exposure: call fit_photometric(normal images) "
                               "before embedding them, or use fit().")
        self._fit_batches(batch.embedding.float() for batch in batches)
        self._check_state_finite()
        self.num_train_images = int(num_images)
        # a threshold (and a blend's statistics) of the previous model mean nothing now
        self.threshold, self.calibration, self.self_similarity = None, None, None
        return self

    @torch.no_grad()
    def embed(self, images: Any, exact: bool = False) -> Iterator[ViewBatch]:
        """Patch features of every window the input plan cuts the images into, a few images at a time;
        from the tower as `inference` runs it, or the exact tower (`exact=True`, what fit uses)."""
        groups = iter_view_groups(as_image_source(images), self.plan, self.batch_size, self.features.min_size, self.tower.spec)
        runner = self.features.runner(exact)  # once per call: the weights do not change during it
        dtype = input_dtype(runner)
        for group in groups:
            # one gain and offset per whole image, so that every tile of it gets the same
            affines = [self.photometric.affine(image) for image in group.images]
            embeddings = [
                self.features.embed(
                    self.features.model_input([crop(group.images[i], box) for i, box in chunk], self.device, dtype,
                                              [affines[i] for i, _ in chunk]),
                    runner=runner,
                )
                for chunk in chunked(group.windows, self.batch_size)
            ]
            embedding = embeddings[0] if len(embeddings) == 1 else torch.cat(embeddings)
            yield ViewBatch(embedding, group.windows, [tuple(im.shape[-2:]) for im in group.images])

    @torch.no_grad()
    def predict(self, images: Any) -> list[AnomalyResult]:
        """One AnomalyResult per image; maps have each input image's size (stitched from tiles when
        the plan tiles). With a self-similarity blend the map is the blended one and the score its maximum."""
        self._require_fitted()
        source = as_image_source(images)
        results = self.predict_embedded(self.embed(source))
        if self.self_similarity is None:
            return results
        threshold = math.inf if self.threshold is None else self.threshold
        blended = []
        for index, result in enumerate(results):
            anomaly_map = self.blended_map(result.anomaly_map, source[index])
            blended.append(AnomalyResult.from_map(anomaly_map, float(anomaly_map.max()), threshold))
        return blended

    def blended_map(self, anomaly_map: np.ndarray, image: Any) -> np.ndarray:
        """This scorer's map of `image` blended with the image's self-similarity map (`self_similarity`)."""
        return self.self_similarity.blend(anomaly_map, self.similarity().map(image))

    def similarity(self):
        """The self-similarity map maker of the blend, on this scorer's own tower (built once)."""
        from .self_similarity import SelfSimilarity  # it builds on few_shot, which builds on this module

        blend = self.self_similarity
        current = self._similarity
        if current is None or (current.image_size, current.mirrors) != (blend.image_size, blend.mirrors):
            self._similarity = SelfSimilarity(self.tower, blend.image_size, blend.mirrors, device=self.device)
        return self._similarity

    @torch.no_grad()
    def predict_embedded(self, batches: Iterable[ViewBatch]) -> list[AnomalyResult]:
        """predict() on features from `embed`."""
        self._require_fitted()
        threshold = math.inf if self.threshold is None else self.threshold
        results = []
        for batch in batches:
            maps, scores = self._score_views(batch)
            if not all(math.isfinite(score) for score in scores):
                # A NaN score compares False with every threshold and would read as "normal".
                raise ScoringError(
                    f"{type(self).__name__} produced a NaN or infinite score: the model state or the tower's "
                    "features are not finite on this image."
                )
            results.extend(AnomalyResult.from_map(m, s, threshold) for m, s in zip(maps, scores))
        return results

    def _score_views(self, batch: ViewBatch) -> tuple[list[np.ndarray], list[float]]:
        patch_scores, view_scores = self._score_patches(batch.embedding.float())
        view_sizes = [box.size for _, box in batch.windows]
        view_maps = patch_scores_to_maps(
            patch_scores, self.preprocess.size, view_sizes, self.sigma, self.features.centre_offset()
        )
        maps, scores = [], []
        for index, size in enumerate(batch.image_sizes):
            mine = [v for v, (owner, _) in enumerate(batch.windows) if owner == index]
            maps.append(stitch([view_maps[v] for v in mine], [batch.windows[v][1] for v in mine], size))
            # The image score is the map's maximum unless the method scores images itself (then the
            # image's worst window), so "score >= threshold" and "the mask is not empty" agree.
            scores.append(float(maps[-1].max()) if view_scores is None else float(max(view_scores[v] for v in mine)))
        return maps, scores

    def _check_state_finite(self) -> None:
        for name, tensor in self._state_tensors().items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise ScoringError(
                    f"fit produced NaN or infinite values in {name}: the tower's features overflowed on these "
                    "images. Check the images, or use another tower or precision."
                )

    def _require_fitted(self) -> None:
        if not self.is_fitted:
            raise ScoringError(f"This {type(self).__name__} is not fitted yet; call fit(normal_images) first.")

    def calibrate(self, images: Any, labels: Sequence[int] | None = None, quantile: float = DEFAULT_QUANTILE) -> float:
        """Set the decision threshold from validation images and return it.

        With labels (1 = anomalous; a dataset brings its own) holding both classes, the threshold is
        the F1-optimal image score; otherwise it is the `quantile` of the normal images' scores.
        """
        return calibrate_model(self, images, labels, quantile)

    # ---- saving and loading

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write config.json + model.safetensors to `folder` (atomically; never pickle)."""
        self._require_fitted()
        folder = Path(folder)
        if folder.exists() and not _is_replaceable(folder):
            raise ScoringError(
                f"{folder} exists and holds other files than a saved model; choose an empty or new folder."
            )
        return super().save_pretrained(folder)

    def _write_artifact(self, folder: Path, **options: Any) -> None:
        write_model_files(folder, self._config(), self._state_tensors())

    def _config(self) -> dict[str, Any]:
        return {
            "model_type": self.model_type,
            "format_version": FORMAT_VERSION,
            "tower": portable_spec(self.tower.spec),
            "layers": self.layers,
            "preprocess": self.preprocess.to_dict(),
            "sigma": self.sigma,
            "seed": self.seed,
            "threshold": json_threshold(self.threshold),
            "calibration": self.calibration,
            "num_train_images": self.num_train_images,
            "plan": self.plan.to_dict(),
            "photometric": self.photometric.to_dict(),
            "self_similarity": None if self.self_similarity is None else self.self_similarity.to_dict(),
            **self._method_config(),
        }

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "model_type" in cls.__dict__:
            SCORER_TYPES[cls.model_type] = cls

    @classmethod
    def _read_artifact(
        cls, folder: Path, device: str | torch.device | None = "auto", tower: VisionTower | None = None,
        root: str | Path | None = None, allow_absolute_tower: bool = True,
    ) -> "FeatureScorer":
        """Read a saved model; the tower is rebuilt from its spec unless a built one is passed.

        Called on FeatureScorer itself, the folder's `model_type` picks the class (PatchCore or PaDiM).
        Every config entry is checked (types, ranges, finite numbers) and every tensor against the
        config and the tower before anything is used. A `local-dir:` tower must lie inside `root`
        (default: `folder`); `allow_absolute_tower=False` also refuses absolute paths (downloads).
        """
        if "model_type" not in cls.__dict__:
            return scorer_class(folder)._read_artifact(folder, device, tower, root, allow_absolute_tower)
        config_keys = BASE_CONFIG_KEYS | cls.method_config_keys
        config, tensors = read_model_folder(folder, cls.model_type, config_keys, cls.state_keys)
        schema = Config(config, Path(folder) / CONFIG_NAME)
        check_base_config(schema)
        cls._check_method_config(schema)
        spec = resolve_saved_spec(config["tower"], folder, root, allow_absolute_tower)
        if tower is not None and portable_spec(tower.spec) != spec:
            raise ScoringError(f"The model in {folder} was fitted with tower {spec!r}, not {tower.spec!r}.")
        try:
            built = tower if tower is not None else build_vision_tower(spec)
        except TowerError as err:
            raise ScoringError(f"Cannot rebuild the tower of {folder}: {err}") from err
        except Exception as err:  # noqa: BLE001 - a damaged bundled tower folder fails in timm or json
            raise ArtifactError(f"Cannot rebuild the tower {spec!r} of {folder}: {type(err).__name__}: {err}") from err
        preprocess = Preprocess.from_dict(config["preprocess"])
        try:
            scorer = cls._from_config(config, built, preprocess, device)
        except ScoringError as err:
            raise ArtifactError(f"{Path(folder) / CONFIG_NAME} does not fit its tower: {err}") from err
        if not scorer.photometric.is_fitted:
            raise ArtifactError(f"{Path(folder) / CONFIG_NAME}: photometric 'match' without its target mean and std; "
                                "refit the model (or set photometric to 'none').")
        scorer.preprocess = preprocess
        scorer.features = PatchFeatures(scorer.tower, scorer.layers, preprocess, cls.local_average,
                                        scorer.inference_mode)
        weights = Path(folder) / WEIGHTS_NAME
        for key, tensor in tensors.items():
            check_tensor(tensor, key, weights, floating=tensor.is_floating_point() or key != "channels")
        scorer._set_state(tensors, config, weights)
        scorer.threshold = config["threshold"]
        scorer.calibration = config["calibration"]
        scorer.num_train_images = config["num_train_images"]
        if config.get("self_similarity") is not None:
            scorer.self_similarity = MapBlend.from_config(schema.sub("self_similarity"))
        return scorer

    # ---- what each method provides

    @abc.abstractmethod
    def _fit_batches(self, batches: Iterator[torch.Tensor]) -> None:
        """Consume normal-image feature batches into the method's state."""

    @abc.abstractmethod
    def _score_patches(self, embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """N x C x h x w features -> (N x h x w patch scores, N image scores or None = map maximum)."""

    @abc.abstractmethod
    def _state_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors saved in model.safetensors."""

    @abc.abstractmethod
    def _set_state(self, tensors: dict[str, torch.Tensor], config: dict[str, Any], source: Path) -> None:
        """Restore the state from saved tensors, checking their shapes against the config and tower."""

    @classmethod
    @abc.abstractmethod
    def _check_method_config(cls, config: Config) -> None:
        """Types and ranges of the method's own config.json entries."""

    def tower_feature_dim(self) -> int:
        """Channels of one patch feature: the chosen stages' channels, concatenated."""
        return sum(self.tower.stages[name].channels for name in self.layers)

    @abc.abstractmethod
    def _method_config(self) -> dict[str, Any]:
        """The method's own config.json entries."""

    @classmethod
    def _from_config(cls, config: dict[str, Any], tower: VisionTower, preprocess: Preprocess, device) -> "FeatureScorer":
        """Construct the method's scorer from a saved config, before its state is set."""
        own = {key: config[key] for key in cls.constructor_keys}
        return cls(tower, layers=config["layers"], image_size=preprocess.size, sigma=config["sigma"],
                   seed=config["seed"], device=device, plan=config.get("plan"),
                   photometric=config.get("photometric"), **own)


BASE_CONFIG_KEYS = {
    "model_type", "format_version", "tower", "layers", "preprocess", "sigma", "seed", "threshold",
    "calibration", "num_train_images", "plan", "photometric", "self_similarity",
}
# Keys a folder written by an older version may lack, and what their absence means.
# absent "plan" = the resize plan, absent "photometric" = "none": the only ones there were;
# absent "self_similarity" = no blend: older scorers had none
OPTIONAL_CONFIG_KEYS = {"plan", "photometric", "self_similarity"}


def calibrate_model(model: Any, images: Any, labels: Sequence[int] | None, quantile: float) -> float:
    """Set `model.threshold` / `model.calibration` from its scores on `images` (see FeatureScorer.calibrate)."""
    source = as_image_source(images)
    if labels is None:
        labels = dataset_labels(source)
    calibration = calibrate_threshold([result.score for result in model.predict(source)], labels, quantile)
    model.threshold, model.calibration = calibration.threshold, calibration.method
    return model.threshold


# model_type -> class, filled as PatchCore and PaDiM are defined.
SCORER_TYPES: dict[str, type[FeatureScorer]] = {}


def load_config(folder: str | Path) -> dict[str, Any]:
    """The config.json of a saved scorer (to find out which class loads it)."""
    return read_json_object(Path(folder) / CONFIG_NAME, "a saved PatchCore / PaDiM")


def scorer_class(folder: Path) -> type[FeatureScorer]:
    model_type = load_config(folder).get("model_type")
    if model_type == "ensemble":
        raise ScoringError(f"{folder} holds an ensemble of scorers; load it with defectclip.scoring.load_scorer "
                           "or Ensemble.from_pretrained.")
    if not isinstance(model_type, str) or model_type not in SCORER_TYPES:
        raise ScoringError(f"{folder} holds a {model_type!r} model; expected one of {sorted(SCORER_TYPES)}.")
    return SCORER_TYPES[model_type]
