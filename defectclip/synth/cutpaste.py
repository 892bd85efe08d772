"""CutPaste-style anomalies: rectangles cut from another normal image and pasted with no blending.

This module also holds the patch machinery NSA shares (where a patch goes, how big it is, what is cut
from the source); NSA only swaps the paste step for Poisson blending (see `nsa.py`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from defectclip.synth._images import (
    RngLike,
    changed_pixels,
    check_int_range,
    check_positive_int,
    check_range,
    like_input,
    make_rng,
    match_color_mode,
    resize_rgb,
    to_rgb,
)

# Poisson blending leaves a 2-pixel ring of a patch untouched (OpenCV fixes the border and erodes the
# mask; an 8x8 patch changes ~3 pixels, a 3x3 one crashes OpenCV), so no patch side is below 10 px,
# which leaves a visible 6 x 6 defect at least.
MIN_PATCH_SIDE = 10


@dataclass(frozen=True)
class PatchBox:
    """A rectangle in the target image, in pixels."""

    top: int
    left: int
    height: int
    width: int

    @property
    def slices(self) -> tuple[slice, slice]:
        return slice(self.top, self.top + self.height), slice(self.left, self.left + self.width)


@dataclass(frozen=True)
class PatchSampling:
    """How patches are drawn; shared by `cutpaste` and `nsa`.

    n_patches: inclusive range of how many patches one call pastes.
    patch_scale: patch side as a fraction of the image side (before the aspect ratio is applied).
    aspect_ratio: range of height / width, drawn log-uniformly so tall and wide are equally likely.
    source_scale: zoom applied to the cut (>1 magnifies a smaller crop of the source), so defects
        are not always at the source's own scale.
    min_target_std: skip plain background: target boxes whose gray-level standard deviation (0-255)
        is below this are redrawn, up to `max_tries` times, then the most textured box seen is used.
        None accepts any position.
    max_tries: bound on redraws, both for the background check and for patches that change nothing.
    """

    n_patches: tuple[int, int] = (1, 3)
    patch_scale: tuple[float, float] = (0.05, 0.4)
    aspect_ratio: tuple[float, float] = (1 / 3, 3.0)
    source_scale: tuple[float, float] = (0.75, 1.33)
    min_target_std: float | None = None
    max_tries: int = 10

    def __post_init__(self) -> None:
        check_int_range("n_patches", self.n_patches, lower=1)
        check_range("patch_scale", self.patch_scale, 0.0, 1.0)
        if self.patch_scale[0] <= 0:
            raise ValueError(f"patch_scale must be above 0; got {self.patch_scale!r}")
        check_range("aspect_ratio", self.aspect_ratio, 1e-3, 1e3)
        check_range("source_scale", self.source_scale, 1e-2, 1e2)
        if self.min_target_std is not None and not self.min_target_std >= 0:
            raise ValueError(f"min_target_std must be None or >= 0; got {self.min_target_std!r}")
        check_positive_int("max_tries", self.max_tries)


# A paste step: (current image, patch, where) -> new content of the box, same shape as the patch.
PasteFn = Callable[[np.ndarray, np.ndarray, PatchBox], np.ndarray]


def sample_patch_box(height: int, width: int, rng: np.random.Generator, sampling: PatchSampling) -> PatchBox:
    """A random rectangle fully inside a height x width image."""
    scale = rng.uniform(*sampling.patch_scale)
    low, high = sampling.aspect_ratio
    aspect = math.exp(rng.uniform(math.log(low), math.log(high)))
    box_height = _clamp_side(round(scale * height * math.sqrt(aspect)), height)
    box_width = _clamp_side(round(scale * width / math.sqrt(aspect)), width)
    top = int(rng.integers(0, height - box_height + 1))
    left = int(rng.integers(0, width - box_width + 1))
    return PatchBox(top, left, box_height, box_width)


def _clamp_side(side: int, image_side: int) -> int:
    return int(min(max(side, MIN_PATCH_SIDE), image_side))


def choose_target_box(image: np.ndarray, rng: np.random.Generator, sampling: PatchSampling) -> PatchBox:
    """A target box, redrawn while it lands on plain background (see PatchSampling.min_target_std)."""
    height, width = image.shape[:2]
    best_box, best_std = None, -1.0
    for _ in range(sampling.max_tries):
        box = sample_patch_box(height, width, rng, sampling)
        if sampling.min_target_std is None:
            return box
        std = float(image[box.slices].mean(axis=2).std())  # gray level spread inside the box
        if std >= sampling.min_target_std:
            return box
        if std > best_std:
            best_box, best_std = box, std
    return best_box


def cut_source_patch(
    source: np.ndarray, height: int, width: int, rng: np.random.Generator, sampling: PatchSampling
) -> np.ndarray:
    """A height x width patch: a random crop of `source`, zoomed by a random `source_scale` factor."""
    zoom = rng.uniform(*sampling.source_scale)
    source_height, source_width = source.shape[:2]
    crop_height = int(min(max(round(height / zoom), 1), source_height))
    crop_width = int(min(max(round(width / zoom), 1), source_width))
    top = int(rng.integers(0, source_height - crop_height + 1))
    left = int(rng.integers(0, source_width - crop_width + 1))
    crop = source[top : top + crop_height, left : left + crop_width]
    return resize_rgb(crop, height, width)


def paste_patches(
    image: np.ndarray,
    source: np.ndarray,
    rng: np.random.Generator,
    sampling: PatchSampling,
    paste: PasteFn,
) -> np.ndarray:
    """Paste 1..n patches from `source` into a copy of `image` (both H x W x 3 uint8).

    Only the box of each patch is ever written, so pixels outside all boxes keep their values. A patch
    that changes nothing (e.g. a flat cut blended onto flat ground) is redrawn, up to max_tries times.
    """
    output = image.copy()
    count = int(rng.integers(sampling.n_patches[0], sampling.n_patches[1] + 1))
    for _ in range(count):
        for _ in range(sampling.max_tries):
            box = choose_target_box(image, rng, sampling)
            patch = cut_source_patch(source, box.height, box.width, rng, sampling)
            new_content = paste(output, patch, box)
            if changed_pixels(output[box.slices], new_content).any():
                output[box.slices] = new_content
                break
    return output


def synthesize_with_patches(
    image: np.ndarray,
    source: np.ndarray,
    rng: RngLike,
    sampling: PatchSampling,
    paste: PasteFn,
) -> tuple[np.ndarray, np.ndarray]:
    """Validate inputs, paste patches, and return (image in the caller's layout, exact changed mask)."""
    target = to_rgb(image, "image")
    # A gray target gets a gray source: a coloured patch in a gray category is a trivial tell.
    donor = match_color_mode(to_rgb(source, "source"), target)
    output = paste_patches(target, donor, make_rng(rng), sampling, paste)
    return like_input(output, image), changed_pixels(target, output)


def _paste_directly(image: np.ndarray, patch: np.ndarray, box: PatchBox) -> np.ndarray:
    return patch


def cutpaste(image: np.ndarray, source: np.ndarray, rng: RngLike = None, **options) -> tuple[np.ndarray, np.ndarray]:
    """Paste 1-3 random rectangles cut from `source` into `image` with hard edges.

    image, source: uint8 (H, W, 3) RGB or gray (H, W) / (H, W, 1), each side >= 16 px; sizes may
    differ. Pass `source=image` for classic same-image CutPaste. rng: Generator, seed or None.
    Options (keywords) are the fields of `PatchSampling`.

    Returns (anomalous image with the same shape and dtype as `image`, H x W bool mask of exactly the
    pixels whose value changed).
    """
    return synthesize_with_patches(image, source, rng, PatchSampling(**options), _paste_directly)
