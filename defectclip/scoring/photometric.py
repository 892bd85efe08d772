"""Brightness and contrast matching: each image brought to the normal images' usual exposure.

Lamps age, exposure drifts from shot to shot and parts come in lighter and darker batches. A scorer
that learnt normal patches at one exposure then finds a normal image taken at another one abnormal
everywhere. With `photometric="match"` every image (training and scored alike) gets one gain and one
offset that give its luminance (all pixels and channels together) the median mean and median standard
deviation of the training images. The two targets are learnt with the scorer and saved in its config.

- Where exposure never changes the mapping is close to the identity, so it costs little there.
- A defect is local: it moves an image's mean and spread little and stays visible after the mapping.
- A whole image that is merely darker or brighter is no longer abnormal for that alone: keep "none"
  (the default) where the global brightness is itself the defect.

Measured on the full magnetic tile in benchmarks/results/photometric.md.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any, Iterable

import torch

from .errors import ScoringError

MODES = ("none", "match")
# An image whose luminance varies by less than this (on the 0-1 scale, ~0.5 gray level) has no contrast
# to match: its gain is capped there instead of stretching sensor noise into texture.
MIN_IMAGE_STD = 2e-3


# Values summed per chunk in float64: a 40 MP image's statistics without a float64 copy of it (1 GB).
STATISTICS_CHUNK = 1 << 20


def luminance_statistics(image: torch.Tensor) -> tuple[float, float]:
    """Mean and standard deviation of all values of a C x H x W image in [0, 1]."""
    values = image.reshape(-1)
    total, squares = 0.0, 0.0
    for start in range(0, values.numel(), STATISTICS_CHUNK):
        chunk = values[start : start + STATISTICS_CHUNK].double()
        total += float(chunk.sum())
        squares += float(chunk.square().sum())
    count = max(values.numel(), 1)
    mean = total / count
    return mean, math.sqrt(max(squares / count - mean * mean, 0.0))


@dataclass(frozen=True)
class Photometric:
    """`Photometric()` leaves images as they are; `Photometric("match")` is fitted with the scorer."""

    mode: str = "none"
    mean: float | None = None  # the targets, on the 0-1 scale of the model's input images
    std: float | None = None

    def __post_init__(self):
        if self.mode not in MODES:
            raise ScoringError(f"Unknown photometric mode {self.mode!r}; use one of {MODES}.")
        if self.mode == "none":
            if self.mean is not None or self.std is not None:
                raise ScoringError("photometric 'none' takes no target mean or std.")
            return
        if (self.mean is None) != (self.std is None):
            raise ScoringError("A fitted photometric 'match' needs both its target mean and std.")
        if self.mean is not None and not (math.isfinite(self.mean) and 0.0 <= self.mean <= 1.0):
            raise ScoringError(f"photometric target mean must be within 0-1, got {self.mean}.")
        if self.std is not None and not (math.isfinite(self.std) and 0.0 < self.std <= 1.0):
            raise ScoringError(f"photometric target std must be above 0 and at most 1, got {self.std}.")

    @property
    def is_fitted(self) -> bool:
        return self.mode == "none" or self.mean is not None

    def fitted_to(self, images: Iterable[torch.Tensor]) -> "Photometric":
        """The same mode with its targets learnt from normal images (medians: one odd image moves nothing)."""
        if self.mode == "none":
            return self
        means, stds = [], []
        for image in images:
            mean, std = luminance_statistics(image)
            means.append(mean)
            stds.append(std)
        if not means:
            raise ScoringError("photometric 'match' needs at least one normal image to learn the exposure from.")
        return Photometric(self.mode, statistics.median(means), max(statistics.median(stds), MIN_IMAGE_STD))

    def affine(self, image: torch.Tensor) -> tuple[float, float] | None:
        """(gain, offset) that bring this whole image to the target exposure; None for "none".

        Worked out on the whole image and applied to its model input (after the resize or the tile
        crop, both linear), so a large image is never copied at full size for it."""
        if self.mode == "none":
            return None
        if not self.is_fitted:
            raise ScoringError("photometric 'match' has no target exposure yet: fit the scorer on normal images first.")
        mean, std = luminance_statistics(image)
        gain = self.std / max(std, MIN_IMAGE_STD)
        return gain, self.mean - gain * mean

    def apply(self, image: torch.Tensor) -> torch.Tensor:
        """The image at the target exposure (a new tensor; the input is only read)."""
        return apply_affine(image, self.affine(image))

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "mean": self.mean, "std": self.std}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Photometric":
        unknown = set(data) - {"mode", "mean", "std"}
        if unknown:
            raise ScoringError(f"Unknown photometric keys {sorted(unknown)}; expected mode, mean, std.")
        numbers = {key: data.get(key) for key in ("mean", "std")}
        for key, value in numbers.items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ScoringError(f"photometric {key} must be a number or null, got {value!r}.")
        return cls(data.get("mode", "none"), *(None if v is None else float(v) for v in numbers.values()))


def apply_affine(image: torch.Tensor, affine: tuple[float, float] | None) -> torch.Tensor:
    """`image * gain + offset`, clipped back to 0-1 (the range of the images the tower learnt from)."""
    if affine is None:
        return image
    gain, offset = affine
    return (image * gain + offset).clamp_(0.0, 1.0)


def parse_photometric(value: "Photometric | str | dict | None") -> Photometric:
    """A Photometric from itself, None ("none"), a saved config's dict or a mode name."""
    if value is None:
        return Photometric()
    if isinstance(value, Photometric):
        return value
    if isinstance(value, dict):
        return Photometric.from_dict(value)
    if isinstance(value, str):
        return Photometric(value.strip())
    raise ScoringError(f"photometric must be 'none', 'match', a dict or a Photometric, got {type(value).__name__}.")
