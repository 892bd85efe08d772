"""What TAB pretrains on: normal images of every development set, as small picklable references.

Three kinds of source, each `load()`-ing an H x W x 3 uint8 image and naming its `object` (the name
the prompt ensemble uses, in readable English):
- `ImageFile`: a whole defect-free image (MVTec layout `<category>/train/good`);
- `ImageCrop`: a square window of an index-mask image that holds no mask pixel (data sets such as
  steel strip have no defect-free images, but their defects cover a small part of each one);
- `TextureImage`: a generated surface (defectclip.synth.textures), stored as (kind, seed).

`collect_sources` gathers them from a list of roots (the layout is read from the folder: `classes.json`
means index masks), leaves out excluded objects (the leave-one-out run) and caps each object's count, so
no object dominates the loss. `steel_validation` gives held-out crops with and without real defects,
which the anti-forgetting rule scores instead of any test set.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .data import DataError, IndexMaskDataset, MVTecDataset, load_image_array, load_index_mask
from .errors import DefectclipError
from .synth.textures import TEXTURE_KINDS, TEXTURE_OBJECTS, make_texture

CROP_FRACTION = 0.5  # crop side / shorter image side: large enough to keep the texture's scale context
CROP_POSITIONS = 5  # window positions per axis searched for a mask-free crop
TEXTURE_SIZE = 256


class SourceError(DefectclipError):
    """Pretraining data that cannot be gathered as asked; the message says what to change."""


def object_name(raw: str) -> str:
    """'magnetic_tile' -> 'magnetic tile', as the MVTec reader names objects: prompts are English sentences."""
    return " ".join(raw.replace("_", " ").split())


@dataclass(frozen=True)
class ImageFile:
    path: Path
    object: str

    def load(self) -> np.ndarray:
        return load_image_array(self.path)


@dataclass(frozen=True)
class ImageCrop:
    path: Path
    object: str
    top: int
    left: int
    size: int

    def load(self) -> np.ndarray:
        image = load_image_array(self.path)
        return np.ascontiguousarray(image[self.top:self.top + self.size, self.left:self.left + self.size])


@dataclass(frozen=True)
class TextureImage:
    kind: str
    seed: int
    object: str
    size: int = TEXTURE_SIZE

    def load(self) -> np.ndarray:
        return make_texture(self.kind, self.size, self.seed)


Source = ImageFile | ImageCrop | TextureImage


# --------------------------------------------------------------------------------------------------
# windows of index-mask images


def window_grid(height: int, width: int, size: int) -> list[tuple[int, int]]:
    """(top, left) of square windows of `size` spread evenly over the image, centre-first order."""
    tops = np.linspace(0, height - size, CROP_POSITIONS).round().astype(int)
    lefts = np.linspace(0, width - size, CROP_POSITIONS).round().astype(int)
    windows = sorted({(int(t), int(l)) for t in tops for l in lefts})
    centre = ((height - size) / 2, (width - size) / 2)
    return sorted(windows, key=lambda w: (w[0] - centre[0]) ** 2 + (w[1] - centre[1]) ** 2)


def crop_windows(mask: np.ndarray, defective: bool) -> list[tuple[int, int, int]]:
    """Windows (top, left, size) holding no mask pixel, or (defective=True) at least 2 % of them."""
    height, width = mask.shape
    size = int(min(height, width) * CROP_FRACTION)
    found = []
    for top, left in window_grid(height, width, size):
        share = float((mask[top:top + size, left:left + size] > 0).mean())
        if (share >= 0.02) if defective else (share == 0.0):
            found.append((top, left, size))
    return found


def index_mask_crops(root: Path, split: str, cap: int | None, defective: bool = False,
                     seed: int = 0) -> list[ImageCrop]:
    """One crop per image (mask-free, or holding a defect), from images spread evenly over the split,
    until `cap` crops; images with no such window are passed over."""
    dataset = IndexMaskDataset(root, split)
    name = object_name(dataset.object)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(dataset.refs))
    crops: list[ImageCrop] = []
    for i in order:
        ref = dataset.refs[int(i)]
        if ref.index_mask_path is None:
            if defective:
                continue
            mask = np.zeros(load_image_array(ref.image_path).shape[:2], dtype=np.int64)
        else:
            mask = load_index_mask(ref.index_mask_path)
        windows = crop_windows(mask, defective)
        if windows:
            top, left, size = windows[int(rng.integers(len(windows)))]
            crops.append(ImageCrop(ref.image_path, name, top, left, size))
        if cap is not None and len(crops) >= cap:
            break
    return crops


# --------------------------------------------------------------------------------------------------
# gathering


def is_index_mask_root(root: Path) -> bool:
    return (Path(root) / "classes.json").is_file()


def sources_of_root(root: Path, cap: int | None, seed: int) -> list[Source]:
    """Defect-free training images of one root: MVTec train/good files, or mask-free index-mask crops."""
    root = Path(root)
    try:
        if is_index_mask_root(root):
            return list(index_mask_crops(root, "train", cap, seed=seed))
        refs = MVTecDataset(root, "train").refs
    except DataError as err:
        raise SourceError(f"{root}: {err}") from err
    by_object: dict[str, list[Source]] = {}
    for ref in refs:
        by_object.setdefault(object_name(ref.object), []).append(ImageFile(ref.image_path, object_name(ref.object)))
    return [s for group in by_object.values() for s in evenly_capped(group, cap)]


def texture_sources(per_kind: int, kinds: Sequence[str] = TEXTURE_KINDS) -> list[TextureImage]:
    return [TextureImage(kind, seed, TEXTURE_OBJECTS[kind]) for kind in kinds for seed in range(per_kind)]


def evenly_capped(items: list, cap: int | None) -> list:
    if cap is None or len(items) <= cap:
        return items
    return [items[int(i)] for i in np.linspace(0, len(items) - 1, cap).round()]


def collect_sources(roots: Sequence[Path], textures_per_kind: int = 0, exclude: Sequence[str] = (),
                    max_per_object: int | None = None, seed: int = 0) -> list[Source]:
    """Every root's defect-free sources plus generated textures, without the `exclude`d objects.

    Exclusion is by object name, with underscores as spaces and any case ('magnetic_tile' and
    'Magnetic tile' are one object), and an excluded name that no source has is an error: a typo
    would otherwise silently turn a leave-one-out run into a run on everything.
    """
    sources = [s for root in roots for s in sources_of_root(root, max_per_object, seed)]
    sources += texture_sources(textures_per_kind)
    present = sorted({s.object for s in sources})
    excluded = {object_name(e).casefold() for e in exclude}
    unknown = sorted(excluded - {name.casefold() for name in present})
    if unknown:
        raise SourceError(f"--exclude-object {unknown}: no such object in the data; the objects are {present}.")
    kept = [s for s in sources if s.object.casefold() not in excluded]
    if not kept:
        raise SourceError(f"Nothing left to train on after excluding {sorted(excluded)}; add --data roots or --textures.")
    return kept


def steel_validation(root: Path, count: int, seed: int = 0) -> tuple[list[ImageCrop], list[ImageCrop], list[ImageCrop]]:
    """(fit normals, held-out normals, held-out defect crops) from an index-mask root's *test* split:
    real defects on images pretraining never reads (it reads the train split only)."""
    normals = index_mask_crops(root, "test", 2 * count, defective=False, seed=seed)
    defects = index_mask_crops(root, "test", count, defective=True, seed=seed + 1)
    if len(normals) < 2 * count or len(defects) < count:
        raise SourceError(f"{root} test split gives {len(normals)} mask-free and {len(defects)} defect crops; "
                          f"the validation needs {2 * count} and {count}: lower the count.")
    return normals[:count], normals[count:], defects
