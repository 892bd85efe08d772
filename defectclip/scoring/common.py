"""What PatchCore and PaDiM share: image input, patch features, anomaly maps, thresholds, save/load.

Both scorers turn a vision tower's mid-level feature maps into one feature vector per patch, fit a
model of normal patches, and score each test patch by how far it lies from that model. Everything
around the model itself lives here:

- input: image files, [0, 1] tensors, uint8 arrays, PIL images, or a dataset (`open_dataset`), read
  lazily batch by batch so a thousand-image training set never sits in memory as pixels;
- features: the requested stages, optionally 3 x 3 averaged, the coarser maps upsampled to the finest
  one and concatenated;
- maps: patch scores -> model-input size -> Gaussian smoothing -> each image's own size;
- thresholds: F1-optimal on labelled validation images, else a quantile of normal scores;
- artifacts: `config.json` + `model.safetensors`, written atomically, read back strictly.
"""

from __future__ import annotations

import abc
import functools
import math
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from ..artifacts import Artifact
from ..data import Preprocess, image_to_tensor, normalize, resize
from ..errors import ArtifactError, DefectclipError
from ..io import read_json_object, write_json_atomic
from ..metrics import f1_max
from ..results import AnomalyResult
from ..schema import MAX_SIGMA, Config, check_number, check_preprocess, check_tensor, confine_local_dir
from ..towers import TowerError, VisionTower, build_vision_tower, split_spec
from .errors import ScoringError
from .plan import Box, InputPlan, crop, parse_plan, stitch

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1
DEFAULT_SIGMA = 4.0
DEFAULT_QUANTILE = 0.99


# --------------------------------------------------------------------------------------------------
# devices and layers


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """'auto' (or None) picks the GPU when one is present, else the CPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def default_layers(tower: VisionTower, reductions: Sequence[int]) -> list[str]:
    """The tower's stages at the given strides (the deepest stage of each stride).

    Mid-level stages (stride 8 and 16) are local enough to localise small defects and generic
    enough that ImageNet features transfer to industrial images (PatchCore, PaDiM). Towers without a
    pyramid (ViTs: every block has the patch stride) get as many consecutive middle blocks instead.
    """
    by_reduction: dict[int, str] = {}
    for stage in tower.stages.values():
        by_reduction[stage.reduction] = stage.name
    if all(r in by_reduction for r in reductions):
        return [by_reduction[r] for r in reductions]
    names = tower.stage_names
    count = min(len(reductions), len(names))
    start = max(0, (len(names) - count) // 2)
    return names[start : start + count]


def check_layers(tower: VisionTower, layers: Sequence[str]) -> list[str]:
    layers = list(layers)
    if not layers:
        raise ScoringError("layers is empty; name at least one stage of the tower.")
    unknown = [name for name in layers if name not in tower.stages]
    if unknown:
        raise ScoringError(f"Unknown layers {unknown} for tower {tower.spec}; it has {tower.stage_names}.")
    if len(set(layers)) != len(layers):
        raise ScoringError(f"layers {layers} names a stage twice.")
    return layers


def coarsest_stride(tower: VisionTower, layers: Sequence[str]) -> int:
    return max(tower.stages[name].reduction for name in layers)


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


# --------------------------------------------------------------------------------------------------
# image input


def is_dataset(source: Any) -> bool:
    """Dataset readers (MVTecDataset, IndexMaskDataset, any torch Dataset of samples)."""
    return isinstance(source, torch.utils.data.Dataset) and hasattr(source, "__len__")


def as_image_source(source: Any) -> Sequence[Any] | torch.utils.data.Dataset:
    """A dataset, a sequence of images, or one image / one N x 3 x H x W batch -> something indexable."""
    if is_dataset(source):
        return source
    if isinstance(source, torch.Tensor) and source.dim() == 4:
        return list(source)
    if isinstance(source, (str, Path, Image.Image, np.ndarray, torch.Tensor)):
        return [source]
    if isinstance(source, Iterable):
        return list(source)
    raise ScoringError(f"Expected images or a dataset, got {type(source).__name__}.")


def dataset_labels(source: Any) -> list[int] | None:
    labels = getattr(source, "labels", None)
    return list(labels) if is_dataset(source) and labels is not None else None


def normal_subset(source: Any) -> Sequence[Any]:
    """The images a model may learn from: for a labelled dataset only its normal samples."""
    images = as_image_source(source)
    labels = dataset_labels(images)
    if labels is not None:
        images = torch.utils.data.Subset(images, [i for i, label in enumerate(labels) if label == 0])
    if len(images) == 0:
        root = getattr(source, "root", None)
        where = f" of {root} ({getattr(source, 'split', '?')} split)" if root is not None else ""
        raise ScoringError(f"The normal (training) set{where} is empty: fit needs at least one defect-free image.")
    return images


@dataclass
class ViewGroup:
    """A few images and the windows the plan cuts them into: (image index in `images`, box)."""

    images: list[torch.Tensor]
    windows: list[tuple[int, Box]]


@dataclass
class ViewBatch:
    """Features of a ViewGroup's windows (V x C x h x w, one per window, in `windows` order) and the
    sizes of the images they came from; what `embed` yields and `fit_embedded` / `predict_embedded`
    take."""

    embedding: torch.Tensor
    windows: list[tuple[int, Box]]
    image_sizes: list[tuple[int, int]]


def iter_view_groups(
    images: Sequence[Any], plan: InputPlan, batch_size: int, min_size: int = 1, spec: str = ""
) -> Iterator[ViewGroup]:
    """Read images lazily and group them so that a group holds about `batch_size` windows (whole
    images; one large image alone may hold more, and is then embedded in several passes).

    Each image is checked against the tower's smallest usable size here, where its file name (if it
    came from one) is still known, so the error says which image is too small.
    """
    group = ViewGroup([], [])
    for index in range(len(images)):
        item = images[index]
        image = image_to_tensor(item)
        try:
            check_image_size(image, min_size, spec)
        except ScoringError as err:
            raise ScoringError(f"{image_label(item, index)}: {err}") from None
        boxes = plan.windows(*image.shape[-2:])
        if group.images and len(group.windows) + len(boxes) > batch_size:
            yield group
            group = ViewGroup([], [])
        group.windows.extend((len(group.images), box) for box in boxes)
        group.images.append(image)
    if group.images:
        yield group


def chunked(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def image_label(item: Any, index: int) -> str:
    """How an error names one input image: its file when it has one, else its position."""
    path = item if isinstance(item, (str, Path)) else getattr(item, "path", None)
    return str(path) if isinstance(path, (str, Path)) else f"Image {index}"


# --------------------------------------------------------------------------------------------------
# patch features


# tower -> {(layers, model size, local averaging): centre offset}; weak keys, so a dropped tower
# takes its entries with it. Towers are frozen inside scorers, so the offsets cannot go stale.
_CENTRE_OFFSETS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


class PatchFeatures:
    """Tower stages -> one feature vector per patch, shaped N x C x h x w at the finest stage's grid."""

    def __init__(self, tower: VisionTower, layers: Sequence[str], preprocess: Preprocess, local_average: bool):
        self.tower = tower
        self.layers = list(layers)
        self.preprocess = preprocess
        self.local_average = local_average
        self.min_size = coarsest_stride(tower, layers)
        self._centre_offset: tuple[float, float] | None = None
        check_model_size(preprocess.size, self.min_size, tower.spec)

    def model_input(self, images: list[torch.Tensor], device: torch.device) -> torch.Tensor:
        """Resize and normalise a list of differently sized images into one batch."""
        for image in images:
            check_image_size(image, self.min_size, self.tower.spec)
        size, interpolation = self.preprocess.size, self.preprocess.interpolation
        # Each image is resized on its own (sizes differ); the batch is normalised with one op rather
        # than a few per image, which mattered on a busy CPU where every op waits for both threads.
        batch = torch.stack([resize(image, size, interpolation) for image in images]).to(device)
        batch = normalize(batch, self.preprocess)
        if batch.device.type == "cpu":
            # oneDNN's convolutions run 1.5-1.8x faster on channels-last input on this project's CPU
            # (EfficientNet-Lite0 to blocks.4, 224 px: 33 vs 59 ms an image, one thread); the
            # features differ only by float rounding (~5e-5).
            batch = batch.contiguous(memory_format=torch.channels_last)
        return batch

    @torch.no_grad()
    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        return self.embed(batch)

    def centre_offset(self) -> tuple[float, float]:
        """Where patch (i, j)'s feature is centred in the model input: (s i + dy, s j + dx) pixels.

        Measured once per scorer by back-propagation (see `measure_centre_offset`) rather than assumed:
        a padded CNN's patches sit pixels up-left of the grid cell a resize would give them
        (EfficientNet-Lite0's blocks.2 + blocks.4: about -9 and -8 px instead of +3.5), and small
        defects scored a cell away from where they are lose most of their pixel-level overlap.
        """
        if self._centre_offset is None:
            # Shared by every scorer on the same tower object: the app's few-shot mode builds one
            # PatchCore per reference image, and each would otherwise measure it again.
            known = _CENTRE_OFFSETS.setdefault(self.tower, {})
            key = (tuple(self.layers), tuple(self.preprocess.size), self.local_average)
            if key not in known:
                device = next(iter(self.tower.parameters())).device
                known[key] = measure_centre_offset(self.embed, self.preprocess.size, device)
            self._centre_offset = known[key]
        return self._centre_offset

    def embed(self, batch: torch.Tensor) -> torch.Tensor:
        maps = self.tower.forward_features(batch, self.layers)
        if self.local_average:
            # PatchCore's locally aware patch features: each patch also sees its 3 x 3 neighbourhood,
            # which adds context without the resolution loss of a deeper stage.
            maps = {name: F.avg_pool2d(m, 3, stride=1, padding=1) for name, m in maps.items()}
        finest = max(maps.values(), key=lambda m: m.shape[-2] * m.shape[-1]).shape[-2:]
        aligned = [
            m if m.shape[-2:] == finest else F.interpolate(m, size=finest, mode="bilinear", align_corners=False)
            for m in maps.values()
        ]
        return torch.cat(aligned, dim=1).float()


def check_model_size(size: Sequence[int], min_size: int, spec: str) -> None:
    if min(size) < min_size:
        raise ScoringError(
            f"image_size {tuple(size)} is too small for {spec}: its coarsest requested stage has stride "
            f"{min_size}, so the model input must be at least {min_size} x {min_size} pixels."
        )


def check_image_size(image: torch.Tensor, min_size: int, spec: str) -> None:
    """Reject images smaller than one patch of the coarsest stage: upscaling them invents the detail
    the features would describe, so any score would be meaningless."""
    height, width = image.shape[-2:]
    if min(height, width) < min_size:
        raise ScoringError(
            f"Image of {width} x {height} pixels is too small for {spec}: the coarsest feature stage has "
            f"stride {min_size}, so images must be at least {min_size} x {min_size} pixels."
        )


# --------------------------------------------------------------------------------------------------
# anomaly maps


def gaussian_kernel(sigma: float) -> torch.Tensor:
    """1-D Gaussian truncated at 4 sigma, summing to 1."""
    radius = int(4.0 * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return kernel / kernel.sum()


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian smoothing of N x H x W maps with mirrored borders."""
    if sigma <= 0:
        return maps
    kernel = gaussian_kernel(sigma).to(maps.device, maps.dtype)
    radius = kernel.numel() // 2
    x = maps[:, None]
    # Reflection needs the map to be wider than the kernel's radius; tiny maps repeat their edge.
    mode = "reflect" if min(maps.shape[-2:]) > radius else "replicate"
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode=mode), kernel.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode=mode), kernel.view(1, 1, -1, 1))
    return x[:, 0]


CENTRE_PROBE_SEED = 0


def measure_centre_offset(embed, model_size: Sequence[int], device: torch.device) -> tuple[float, float]:
    """(dy, dx) such that patch (i, j) of `embed`'s grid is centred at pixel (s_y i + dy, s_x j + dx).

    The centre is the centroid of |d feature / d input| for a few interior patches of a seeded
    random image: where the patch's feature actually looks. A resize of the patch grid assumes
    (s - 1) / 2, right for a ViT's unpadded patches but not for padded convolutions.
    """
    height, width = (int(v) for v in model_size)
    generator = torch.Generator().manual_seed(CENTRE_PROBE_SEED)
    probe = torch.randn(1, 3, height, width, generator=generator).to(device).requires_grad_(True)
    rows, cols = torch.arange(height, device=device), torch.arange(width, device=device)
    offsets = []
    with torch.enable_grad():
        grid = embed(probe)
        h, w = grid.shape[-2:]
        stride_y, stride_x = height / h, width / w
        for step in (-1, 0, 1):
            i, j = min(max(h // 2 + step, 0), h - 1), min(max(w // 2 + step, 0), w - 1)
            (gradient,) = torch.autograd.grad(grid[0, :, i, j].sum(), probe, retain_graph=True)
            weight = gradient.abs().sum(dim=(0, 1))
            total = weight.sum()
            if not torch.isfinite(total) or total <= 0:
                continue
            centre_y = float((weight.sum(1) * rows).sum() / total)
            centre_x = float((weight.sum(0) * cols).sum() / total)
            offsets.append((centre_y - stride_y * i, centre_x - stride_x * j))
    if not offsets:  # no gradient reached the input: keep the resize convention
        return ((stride_y - 1) / 2, (stride_x - 1) / 2)
    return tuple(float(np.mean([o[axis] for o in offsets])) for axis in (0, 1))


def interpolation_matrix(out_length: int, in_length: int, offset: float) -> torch.Tensor:
    """out x in linear interpolation weights placing input sample k at output position s k + offset
    (s = out / in), holding the end values beyond the first and last samples."""
    stride = out_length / in_length
    position = ((torch.arange(out_length, dtype=torch.float64) - offset) / stride).clamp(0, in_length - 1)
    lower = position.floor().long().clamp(max=max(in_length - 2, 0))
    upper_weight = (position - lower).float()
    matrix = torch.zeros(out_length, in_length)
    rows = torch.arange(out_length)
    matrix[rows, lower] = 1.0 - upper_weight
    if in_length > 1:
        matrix[rows, lower + 1] += upper_weight
    return matrix


@functools.lru_cache(maxsize=16)
def map_operators(
    height: int, width: int, h: int, w: int, offset_y: float, offset_x: float, sigma: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """H x h and W x w matrices A, B with gaussian_blur(R S C^T) = A S B^T for every h x w patch map S.

    Interpolation (R, C: see interpolation_matrix) and the separable blur are both linear, so the
    blur folds into the two matrices once per model size (A = G_y R, B = G_x C): a map then costs
    two small matrix products instead of two padded convolutions over H x W pixels (measured 2 ms of
    a 23 ms predict on one CPU thread at 224 px).
    """
    rows = interpolation_matrix(height, h, offset_y)
    cols = interpolation_matrix(width, w, offset_x)
    if sigma <= 0:
        return rows, cols
    kernel = gaussian_kernel(sigma)
    radius = kernel.numel() // 2
    mode = "reflect" if min(height, width) > radius else "replicate"  # as gaussian_blur decides for the map
    return _blur_columns(rows, kernel, mode), _blur_columns(cols, kernel, mode)


def _blur_columns(matrix: torch.Tensor, kernel: torch.Tensor, mode: str) -> torch.Tensor:
    """Each column of an L x n matrix smoothed along L, padded the way gaussian_blur pads a map."""
    radius = kernel.numel() // 2
    columns = F.pad(matrix.T[:, None, :], (radius, radius), mode=mode)
    return F.conv1d(columns, kernel.view(1, 1, -1))[:, 0].T.contiguous()


def patch_scores_to_maps(
    patch_scores: torch.Tensor,
    model_size: Sequence[int],
    image_sizes: Sequence[Sequence[int]],
    sigma: float,
    centre_offset: tuple[float, float] | None = None,
) -> list[np.ndarray]:
    """N x h x w patch scores -> one H x W float32 map per image, at that image's own size.

    Each patch score is placed at its feature's centre (`centre_offset`, see PatchFeatures; None =
    the plain resize convention) and interpolated linearly in between. Smoothing happens at the
    model-input size, where sigma = 4 px is the papers' setting: the result then does not depend
    on the camera's resolution, and every image costs the same.
    """
    (height, width), (h, w) = model_size, patch_scores.shape[-2:]
    if centre_offset is None:
        centre_offset = ((height / h - 1) / 2, (width / w - 1) / 2)
    rows, cols = map_operators(int(height), int(width), h, w, float(centre_offset[0]), float(centre_offset[1]), float(sigma))
    maps = rows.to(patch_scores) @ patch_scores @ cols.to(patch_scores).T
    out = []
    for smoothed, size in zip(maps, image_sizes):
        if tuple(size) != tuple(model_size):
            smoothed = F.interpolate(smoothed[None, None], size=tuple(size), mode="bilinear", align_corners=False)[0, 0]
        out.append(smoothed.float().cpu().numpy())
    return out


# --------------------------------------------------------------------------------------------------
# thresholds


@dataclass(frozen=True)
class Calibration:
    threshold: float
    method: str  # "f1" or "quantile:<q>"


def calibrate_threshold(scores: Sequence[float], labels: Sequence[int] | None, quantile: float) -> Calibration:
    """F1-optimal threshold when labels hold both classes, else the `quantile` of the normal scores.

    With only normal images the F1-optimal threshold is undefined; a high quantile of their scores
    then bounds the false-alarm rate on normal parts at about 1 - quantile.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if not 0 < quantile <= 1:
        raise ScoringError(f"quantile must be in (0, 1], got {quantile}.")
    if labels is None:
        labels = np.zeros(len(scores), dtype=int)
    labels = np.asarray(labels).astype(int)
    if labels.shape != scores.shape:
        raise ScoringError(f"Got {len(scores)} images but {len(labels)} labels.")
    if scores.size == 0:
        raise ScoringError("calibrate needs at least one image.")
    if labels.min() == 0 and labels.max() == 1:
        _, threshold = f1_max(labels, scores)
        return Calibration(_midway_below(scores, float(threshold)), "f1")
    if labels.min() == 1:
        raise ScoringError("calibrate got only anomalous images; it needs normal images (label 0) as well.")
    return Calibration(float(np.quantile(scores[labels == 0], quantile)), f"quantile:{quantile:g}")


def _midway_below(scores: np.ndarray, threshold: float) -> float:
    """Move an F1-optimal threshold halfway down to the next lower score.

    f1_max returns a score itself, so the weakest defect it accepts sits exactly on the threshold and
    its map barely crosses it; halfway to the next score classifies the calibration set identically
    while leaving a margin, and gives defect regions a sensible extent in the map.
    """
    below = scores[scores < threshold]
    return float((below.max() + threshold) / 2) if below.size else threshold


# --------------------------------------------------------------------------------------------------
# artifact folders


def write_model_files(folder: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """config.json + model.safetensors into a (staging) folder."""
    write_json_atomic(folder / CONFIG_NAME, config)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(folder / WEIGHTS_NAME))


def _is_replaceable(folder: Path) -> bool:
    """Only an empty folder or an earlier save is overwritten, never a folder of unrelated files."""
    if not folder.is_dir():
        return False
    return {p.name for p in folder.iterdir()} <= {CONFIG_NAME, WEIGHTS_NAME, "README.md"}


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


def json_threshold(threshold: float | None) -> float | None:
    """JSON has no infinity; an uncalibrated model stores null."""
    return None if threshold is None or not math.isfinite(threshold) else float(threshold)


# --------------------------------------------------------------------------------------------------
# the shared scorer


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
    ):
        if batch_size < 1:
            raise ScoringError(f"batch_size must be at least 1, got {batch_size}.")
        try:
            check_number(sigma, "sigma", 0.0, MAX_SIGMA)
        except ArtifactError as err:
            raise ScoringError(f"{err} (0 turns smoothing off; the papers use {DEFAULT_SIGMA:g}).") from None
        self.plan = parse_plan(plan)
        self.device = resolve_device(device)
        self.tower = build_tower(tower).to(self.device).eval()
        self.layers = check_layers(self.tower, layers or default_layers(self.tower, self.default_reductions))
        preprocess = self.tower.preprocess
        if image_size is None and self.plan.is_tiled:
            image_size = self.plan.tile  # tiles are scored at their native resolution by default
        self.preprocess = preprocess.with_size(image_size) if image_size is not None else preprocess
        self.features = PatchFeatures(self.tower, self.layers, self.preprocess, self.local_average)
        self.sigma = float(sigma)
        self.seed = int(seed)
        self.batch_size = int(batch_size)
        self.threshold: float | None = None
        self.calibration: str | None = None
        self.num_train_images = 0

    # ---- fitting and scoring

    @property
    @abc.abstractmethod
    def is_fitted(self) -> bool:
        """Whether fit() has run (each method knows what its fitted state is)."""

    def fit(self, images: Any) -> "FeatureScorer":
        """Learn what normal patches look like from defect-free images (or a dataset's normal ones)."""
        normal = normal_subset(images)
        return self.fit_embedded(self.embed(normal), len(normal))

    def fit_embedded(self, batches: Iterable["ViewBatch"], num_images: int) -> "FeatureScorer":
        """fit() on features from `embed` (so one extraction can serve several seeds or methods).

        With a tiles plan every tile is a training sample: PatchCore's bank and PaDiM's per-position
        statistics are shared by all tiles.
        """
        self._fit_batches(batch.embedding.float() for batch in batches)
        self._check_state_finite()
        self.num_train_images = int(num_images)
        self.threshold, self.calibration = None, None  # a threshold of the previous model means nothing now
        return self

    @torch.no_grad()
    def embed(self, images: Any) -> Iterator["ViewBatch"]:
        """Patch features of every window the input plan cuts the images into, a few images at a time."""
        groups = iter_view_groups(as_image_source(images), self.plan, self.batch_size, self.features.min_size, self.tower.spec)
        for group in groups:
            embeddings = [
                self.features(self.features.model_input([crop(group.images[i], box) for i, box in chunk], self.device))
                for chunk in chunked(group.windows, self.batch_size)
            ]
            yield ViewBatch(torch.cat(embeddings), group.windows, [tuple(im.shape[-2:]) for im in group.images])

    @torch.no_grad()
    def predict(self, images: Any) -> list[AnomalyResult]:
        """One AnomalyResult per image; maps have each input image's size (stitched from tiles when
        the plan tiles)."""
        self._require_fitted()
        return self.predict_embedded(self.embed(images))

    @torch.no_grad()
    def predict_embedded(self, batches: Iterable["ViewBatch"]) -> list[AnomalyResult]:
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

    def _score_views(self, batch: "ViewBatch") -> tuple[list[np.ndarray], list[float]]:
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
        source = as_image_source(images)
        if labels is None:
            labels = dataset_labels(source)
        scores = [result.score for result in self.predict(source)]
        calibration = calibrate_threshold(scores, labels, quantile)
        self.threshold, self.calibration = calibration.threshold, calibration.method
        return self.threshold

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
        scorer.preprocess = preprocess
        scorer.features = PatchFeatures(scorer.tower, scorer.layers, preprocess, cls.local_average)
        weights = Path(folder) / WEIGHTS_NAME
        for key, tensor in tensors.items():
            check_tensor(tensor, key, weights, floating=tensor.is_floating_point() or key != "channels")
        scorer._set_state(tensors, config, weights)
        scorer.threshold = config["threshold"]
        scorer.calibration = config["calibration"]
        scorer.num_train_images = config["num_train_images"]
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
                   seed=config["seed"], device=device, plan=config.get("plan"), **own)


BASE_CONFIG_KEYS = {
    "model_type", "format_version", "tower", "layers", "preprocess", "sigma", "seed", "threshold",
    "calibration", "num_train_images", "plan",
}
# Keys a folder written by an older version may lack, and what their absence means.
OPTIONAL_CONFIG_KEYS = {"plan"}  # absent = the resize plan, the only one there was


# model_type -> class, filled as PatchCore and PaDiM are defined.
SCORER_TYPES: dict[str, type[FeatureScorer]] = {}


def load_config(folder: str | Path) -> dict[str, Any]:
    """The config.json of a saved scorer (to find out which class loads it)."""
    return read_json_object(Path(folder) / CONFIG_NAME, "a saved PatchCore / PaDiM")


def scorer_class(folder: Path) -> type[FeatureScorer]:
    model_type = load_config(folder).get("model_type")
    if not isinstance(model_type, str) or model_type not in SCORER_TYPES:
        raise ScoringError(f"{folder} holds a {model_type!r} model; expected one of {sorted(SCORER_TYPES)}.")
    return SCORER_TYPES[model_type]
