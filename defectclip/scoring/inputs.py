"""Image input for the scorers: files, [0, 1] tensors, uint8 arrays, PIL images, or a dataset
(`open_dataset`), read lazily a few images at a time, each cut into the windows its input plan
(`plan.py`) scores, so a thousand-image training set never sits in memory as pixels; a labelled
dataset brings its labels, and only its normal images are learnt from.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from ..data import image_to_tensor
from .errors import ScoringError
from .features import check_image_size
from .plan import Box, InputPlan


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
