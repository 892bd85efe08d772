"""One preprocessing description and one transform builder for training, scoring and the app.

A model's `Preprocess` is saved in its config.json, so whoever loads the model resizes and
normalises exactly as it was trained.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


@dataclass(frozen=True)
class Preprocess:
    """Input size (height, width), per-channel mean and std, and the resize interpolation."""

    size: tuple[int, int] = (224, 224)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {self.interpolation!r}")
        if len(self.size) != 2 or min(self.size) < 1:
            raise ValueError(f"size must be (height, width) with positive values, got {self.size}")

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Preprocess":
        return cls(
            size=tuple(data["size"]),
            mean=tuple(data["mean"]),
            std=tuple(data["std"]),
            interpolation=data.get("interpolation", "bilinear"),
        )

    def with_size(self, size: int | tuple[int, int]) -> "Preprocess":
        size = (size, size) if isinstance(size, int) else tuple(size)
        return Preprocess(size, self.mean, self.std, self.interpolation)


def resize(images: torch.Tensor, size: tuple[int, int], interpolation: str = "bilinear") -> torch.Tensor:
    """Resize N x C x H x W (or C x H x W) images; bicubic overshoot is clamped back into [0, 1]."""
    single = images.dim() == 3
    batch = images[None] if single else images
    if tuple(batch.shape[-2:]) != tuple(size):
        kwargs = {} if interpolation == "nearest" else {"align_corners": False, "antialias": True}
        batch = F.interpolate(batch.float(), size=tuple(size), mode=interpolation, **kwargs)
        if interpolation == "bicubic":
            batch = batch.clamp(0.0, 1.0)
    return batch[0] if single else batch


def normalize(images: torch.Tensor, preprocess: Preprocess) -> torch.Tensor:
    mean = torch.tensor(preprocess.mean, dtype=images.dtype, device=images.device).view(-1, 1, 1)
    std = torch.tensor(preprocess.std, dtype=images.dtype, device=images.device).view(-1, 1, 1)
    return (images - mean) / std


class ImageTransform:
    """[0, 1] RGB tensor(s) of any size -> resized and normalised model input."""

    def __init__(self, preprocess: Preprocess):
        self.preprocess = preprocess

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() not in (3, 4) or images.shape[-3] != 3:
            raise ValueError(
                f"Expected RGB images shaped 3 x H x W or N x 3 x H x W, got {tuple(images.shape)}; "
                "read files with defectclip.data.load_image, which converts any mode to RGB."
            )
        return normalize(resize(images, self.preprocess.size, self.preprocess.interpolation), self.preprocess)

    def mask(self, masks: torch.Tensor) -> torch.Tensor:
        """Resize bool masks to the model size with nearest-neighbour, keeping them bool."""
        batch = masks[None, None] if masks.dim() == 2 else masks[:, None]
        resized = F.interpolate(batch.float(), size=self.preprocess.size, mode="nearest") > 0.5
        return resized[0, 0] if masks.dim() == 2 else resized[:, 0]


def build_transform(preprocess: Preprocess) -> ImageTransform:
    """The transform every caller uses: training scripts, scoring and the app."""
    return ImageTransform(preprocess)
