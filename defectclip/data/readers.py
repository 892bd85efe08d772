"""Readers for the two dataset layouts defectclip understands (see DESIGN.md "Data").

Listing happens when a dataset is built, so a missing folder or mask fails at once; pixels are read
lazily in `__getitem__`, so a dataset of thousands of images costs nothing until it is used.
"""

from __future__ import annotations

import abc
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .images import DataError, list_images, load_image, load_index_mask, load_mask

GOOD = "good"
SPLITS = ("train", "test")


@dataclass
class SampleRef:
    """Where one sample's files are, before anything is read."""

    image_path: Path
    object: str
    split: str
    defect: str  # "good", a defect type, or for index masks the types present joined by "+"
    mask_paths: dict[str, Path] = field(default_factory=dict)  # MVTec: defect type -> mask file
    index_mask_path: Path | None = None  # index-mask layout: one file with class indices


@dataclass
class Sample:
    """One image with its labels: `image` is 3 x H x W float in [0, 1]; masks are H x W bool."""

    image: torch.Tensor
    label: int  # 0 normal, 1 defective
    defect: str
    masks: dict[str, torch.Tensor]
    object: str
    split: str
    path: Path

    @property
    def mask(self) -> torch.Tensor:
        """Union of all defect masks (all False for a normal image)."""
        height, width = self.image.shape[-2:]
        union = torch.zeros(height, width, dtype=torch.bool)
        for mask in self.masks.values():
            union |= mask
        return union


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DataError(f"Missing {what}: {path} does not exist or is not a folder.")
    return path


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DataError(f"Unknown split {split!r}; use one of {SPLITS}.")


def _check_mask_size(mask: np.ndarray, image: torch.Tensor, mask_path: Path, image_path: Path) -> None:
    if tuple(mask.shape) != tuple(image.shape[-2:]):
        raise DataError(
            f"Mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} but its image {image_path} is "
            f"{image.shape[-1]}x{image.shape[-2]}; masks must have the image's size."
        )


class _SampleList(torch.utils.data.Dataset, abc.ABC):
    """Shared behaviour of both layouts: a list of SampleRefs and lazy loading."""

    refs: list[SampleRef]

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, index: int) -> Sample:
        return self.load(self.refs[index])

    def load(self, ref: SampleRef) -> Sample:
        image = load_image(ref.image_path)
        masks = self._load_masks(ref, image)
        label = 0 if ref.defect == GOOD else 1
        return Sample(image, label, ref.defect, masks, ref.object, ref.split, ref.image_path)

    @abc.abstractmethod
    def _load_masks(self, ref: SampleRef, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each layout stores its masks its own way."""

    @property
    def labels(self) -> list[int]:
        return [0 if ref.defect == GOOD else 1 for ref in self.refs]

    @property
    def objects(self) -> list[str]:
        return sorted({ref.object for ref in self.refs})


def _is_mvtec_category(folder: Path) -> bool:
    return (folder / "train").is_dir() or (folder / "test").is_dir()


def find_mvtec_categories(root: str | Path) -> list[Path]:
    """`root` itself when it is a category folder, else its sub-folders that are categories."""
    root = _require_dir(Path(root), "dataset folder")
    if _is_mvtec_category(root):
        return [root]
    categories = sorted(p for p in root.iterdir() if p.is_dir() and _is_mvtec_category(p))
    if not categories:
        raise DataError(
            f"{root} is not an MVTec AD layout: expected <category>/train/good and <category>/test/<type>, "
            "either in this folder or in its sub-folders."
        )
    return categories


class MVTecDataset(_SampleList):
    """`<cat>/train/good`, `<cat>/test/<type>`, `<cat>/ground_truth/<type>/<stem>_mask.png`.

    `root` is a category folder or a folder of categories; `categories` narrows the latter.
    The object name of a sample is its category folder's name with underscores as spaces.
    """

    def __init__(
        self, root: str | Path, split: str = "train", categories: list[str] | None = None, require_masks: bool = True
    ):
        _check_split(split)
        self.root = Path(root)
        self.split = split
        # Many real sets label test images by folder only; with require_masks=False an anomalous
        # image without a mask is kept (label 1, no mask) and `has_all_masks` says pixel metrics are off.
        self.require_masks = require_masks
        folders = find_mvtec_categories(root)
        if categories is not None:
            folders = self._select(folders, categories)
        self.refs = [ref for folder in folders for ref in self._list_category(folder)]
        if not self.refs:
            raise DataError(f"No images in the {split!r} split of {root}.")

    @staticmethod
    def _select(folders: list[Path], categories: list[str]) -> list[Path]:
        by_name = {f.name: f for f in folders}
        unknown = [c for c in categories if c not in by_name]
        if unknown:
            raise DataError(f"Unknown categories {unknown}; available: {sorted(by_name)}")
        return [by_name[c] for c in categories]

    def _list_category(self, folder: Path) -> list[SampleRef]:
        split_dir = _require_dir(folder / self.split, f"{self.split!r} split of category {folder.name}")
        object_name = folder.name.replace("_", " ")
        refs = []
        for type_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
            if self.split == "train" and type_dir.name != GOOD:
                continue  # MVTec's train split is defect-free by definition
            for image_path in list_images(type_dir):
                refs.append(self._ref(folder, object_name, type_dir.name, image_path))
        return refs

    def _ref(self, folder: Path, object_name: str, defect: str, image_path: Path) -> SampleRef:
        ref = SampleRef(image_path, object_name, self.split, defect)
        if defect != GOOD:
            mask_path = folder / "ground_truth" / defect / f"{image_path.stem}_mask.png"
            if not mask_path.is_file() and not self.require_masks:
                return ref
            if not mask_path.is_file():
                raise DataError(
                    f"Anomalous image {image_path} has no mask: expected {mask_path}. Add the mask, move the "
                    "image out of the test split, or pass require_masks=False for image-level labels only."
                )
            ref.mask_paths[defect] = mask_path
        return ref

    @property
    def has_all_masks(self) -> bool:
        """Whether every anomalous image has its mask (so pixel-level metrics can be computed)."""
        return all(ref.mask_paths for ref in self.refs if ref.defect != GOOD)

    def _load_masks(self, ref: SampleRef, image: torch.Tensor) -> dict[str, torch.Tensor]:
        masks = {}
        for defect, mask_path in ref.mask_paths.items():
            mask = load_mask(mask_path)
            _check_mask_size(mask, image, mask_path, ref.image_path)
            masks[defect] = torch.from_numpy(mask)
        return masks


CLASSES_EXAMPLE = '{"object": "steel strip", "classes": {"1": "inclusion", "2": "patches"}}'


def read_classes_json(root: Path) -> tuple[str, dict[int, str]]:
    """`classes.json` = {"object": ..., "classes": {"1": "inclusion", ...}} -> (object, {index: name})."""
    path = root / "classes.json"
    if not path.is_file():
        raise DataError(f"Missing {path}: an index-mask dataset names its object and classes there.")
    try:
        # utf-8-sig: editors on Windows start the file with a byte-order mark, which is not an error.
        spec = json.loads(path.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path} is not valid UTF-8 JSON ({err}). Expected {CLASSES_EXAMPLE}.") from err
    if not isinstance(spec, dict) or not isinstance(spec.get("classes"), dict):
        raise DataError(
            f"{path} must be an object whose \"classes\" maps class indices to names, e.g. {CLASSES_EXAMPLE}; "
            "a list would leave it unclear whether counting starts at 0 or 1."
        )
    object_name = spec.get("object")
    if not isinstance(object_name, str) or not object_name.strip():
        raise DataError(f"{path} must name the inspected object as a non-empty string, e.g. {CLASSES_EXAMPLE}.")
    classes = {_class_index(key, path): _class_name(name, key, path) for key, name in spec["classes"].items()}
    # Index 0 is background by convention; a file may name it, but it is never a defect type.
    classes.pop(0, None)
    if not classes:
        raise DataError(f"{path} names no defect classes (indices 1, 2, ...).")
    if len(set(classes.values())) != len(classes):
        raise DataError(f"{path} gives two class indices the same name: {sorted(classes.values())}.")
    return object_name, classes


def _class_index(key: str, path: Path) -> int:
    if not key.isdigit() or int(key) > 255:
        raise DataError(f"{path}: class index {key!r} must be a whole number 0-255 (a mask pixel value).")
    return int(key)


def _class_name(name: object, key: str, path: Path) -> str:
    if not isinstance(name, str) or not name.strip():
        raise DataError(f"{path}: class {key} must be named by a non-empty string, got {name!r}.")
    return name


class IndexMaskDataset(_SampleList):
    """`images/<split>/<id>.*`, `masks/<split>/<id>.png` (pixel = class index), `classes.json`.

    Images without a mask file are treated as normal; a mask that is all background also marks a
    normal image. The masks folder must exist (empty when every image is normal), and every file in
    it must be the `<id>.png` of an image: a mask under another name would silently label its image normal.
    """

    def __init__(self, root: str | Path, split: str = "train"):
        _check_split(split)
        self.root = _require_dir(Path(root), "dataset folder")
        self.split = split
        self.object, self.classes = read_classes_json(self.root)
        image_dir = _require_dir(self.root / "images" / split, f"{split!r} images folder")
        mask_dir = _require_dir(
            self.root / "masks" / split,
            f"{split!r} masks folder (masks/{split}/<id>.png; leave it empty if every image is defect-free)",
        )
        images = list_images(image_dir)
        if not images:
            raise DataError(f"No images in {image_dir}.")
        check_mask_names(mask_dir, images)
        self.refs = [self._ref(p, mask_dir) for p in images]

    def _ref(self, image_path: Path, mask_dir: Path) -> SampleRef:
        mask_path = mask_dir / f"{image_path.stem}.png"
        if not mask_path.is_file():
            return SampleRef(image_path, self.object, self.split, GOOD)
        # The defect label needs the mask's pixels; it is filled in when the sample is loaded.
        return SampleRef(image_path, self.object, self.split, "unknown", index_mask_path=mask_path)

    def load(self, ref: SampleRef) -> Sample:
        sample = super().load(ref)
        sample.defect = "+".join(sample.masks) if sample.masks else GOOD
        sample.label = int(bool(sample.masks))
        return sample

    def _load_masks(self, ref: SampleRef, image: torch.Tensor) -> dict[str, torch.Tensor]:
        if ref.index_mask_path is None:
            return {}
        index = load_index_mask(ref.index_mask_path)
        _check_mask_size(index, image, ref.index_mask_path, ref.image_path)
        unknown = sorted(set(np.unique(index).tolist()) - set(self.classes) - {0})
        if unknown:
            raise DataError(
                f"Mask {ref.index_mask_path} holds class indices {unknown} that classes.json does not name."
            )
        return {
            self.classes[k]: torch.from_numpy(index == k) for k in sorted(self.classes) if (index == k).any()
        }

    @property
    def labels(self) -> list[int]:
        # Without reading pixels, a mask file's presence is the best label; `load` refines it.
        return [0 if ref.index_mask_path is None else 1 for ref in self.refs]


def check_mask_names(mask_dir: Path, images: list[Path]) -> None:
    """Every file in the masks folder must be `<image id>.png`.

    A mask saved under another name (`<id>_mask.png`) or format (`<id>.jpg`) would otherwise be
    ignored and its image read as defect-free: the one mistake that gives no error and wrong labels.
    """
    stems = {p.stem for p in images}
    strays = sorted(
        p.name for p in mask_dir.iterdir()
        if not p.name.startswith(".") and (p.suffix.lower() != ".png" or p.stem not in stems)
    )
    if strays:
        shown = ", ".join(strays[:5]) + (f" and {len(strays) - 5} more" if len(strays) > 5 else "")
        raise DataError(
            f"{mask_dir} holds files that are not the mask of any image ({shown}). Index masks must be "
            f"named <image id>.png after an image in images/{mask_dir.name}/ (lossless PNG: JPEG changes "
            "class indices); rename or remove the others."
        )


def open_dataset(root: str | Path, split: str = "train", categories: list[str] | None = None) -> _SampleList:
    """Pick the reader from the folder's layout: `classes.json` means index masks, else MVTec AD."""
    root = Path(root)
    if (root / "classes.json").is_file():
        return IndexMaskDataset(root, split)
    return MVTecDataset(root, split, categories)
