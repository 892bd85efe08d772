"""Input checks and small image helpers shared by the synthesis methods.

Every method accepts the same image layouts (H x W x 3 RGB, or a single gray channel as H x W or
H x W x 1), works internally on H x W x 3 uint8 and hands back the caller's layout, so these rules
live here once instead of three times.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

# Below this side length a patch of even 5% of the image is under one pixel and Poisson blending
# has no interior left to solve for, so tiny inputs are refused rather than silently mangled.
MIN_IMAGE_SIDE = 16

RngLike = np.random.Generator | int | None


def make_rng(rng: RngLike) -> np.random.Generator:
    """A Generator from a Generator (used as is, so callers can share one stream), a seed, or None."""
    if isinstance(rng, np.random.Generator):
        return rng
    if rng is None or (isinstance(rng, (int, np.integer)) and not isinstance(rng, bool)):
        return np.random.default_rng(rng)
    raise TypeError(f"rng must be a numpy.random.Generator, an int seed or None; got {type(rng).__name__}")


def to_rgb(image: np.ndarray, name: str, min_side: int = MIN_IMAGE_SIDE) -> np.ndarray:
    """Validate `image` and return it as a C-contiguous H x W x 3 uint8 array (a copy for gray input)."""
    if not isinstance(image, np.ndarray):
        raise TypeError(
            f"{name} must be a numpy uint8 array of shape (H, W, 3) or (H, W); got {type(image).__name__}"
            " (for a PIL image use numpy.asarray(img.convert('RGB')))"
        )
    if image.dtype != np.uint8:
        raise TypeError(f"{name} must have dtype uint8; got {image.dtype}")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[..., 0]
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(
            f"{name} must have shape (H, W, 3), (H, W, 1) or (H, W); got {image.shape}"
            " (drop an alpha channel before synthesis)"
        )
    height, width = image.shape[:2]
    if min(height, width) < min_side:
        raise ValueError(f"{name} is {height}x{width}; both sides must be at least {min_side} pixels")
    return np.ascontiguousarray(image)


def like_input(rgb: np.ndarray, original: np.ndarray) -> np.ndarray:
    """Return `rgb` in the layout the caller passed in (gray layouts take one of the equal channels)."""
    if original.ndim == 2:
        return rgb[..., 0].copy()
    if original.shape[2] == 1:
        return rgb[..., :1].copy()
    return rgb


def is_gray(rgb: np.ndarray) -> bool:
    """True for gray pictures stored as RGB (all channels equal), e.g. MVTec grid, screw, zipper."""
    return bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all())


def to_gray_rgb(rgb: np.ndarray) -> np.ndarray:
    """Luma replicated to three channels, so pasting into a gray image cannot introduce colour."""
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    return np.repeat(gray[..., None], 3, axis=2)


def match_color_mode(other: np.ndarray, target: np.ndarray) -> np.ndarray:
    """`other` converted to gray when `target` is gray, unchanged otherwise."""
    return to_gray_rgb(other) if is_gray(target) else other


def resize_rgb(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize to height x width (area averaging when shrinking avoids aliasing, bilinear when growing)."""
    if rgb.shape[:2] == (height, width):
        return rgb.copy()
    shrinking = height * width < rgb.shape[0] * rgb.shape[1]
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    resized = cv2.resize(rgb, (width, height), interpolation=interpolation)
    return resized.reshape(height, width, 3)


def changed_pixels(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """H x W bool: pixels where any channel differs. Masks are built from this so they are exact."""
    return (before != after).any(axis=-1)


def check_range(name: str, value: Sequence[float], lower: float, upper: float) -> tuple[float, float]:
    """Validate a (low, high) option with lower <= low <= high <= upper and return it as floats."""
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a (low, high) pair of numbers; got {value!r}") from None
    if not lower <= low <= high <= upper:
        raise ValueError(f"{name} must satisfy {lower} <= low <= high <= {upper}; got {value!r}")
    return low, high


def check_int_range(name: str, value: Sequence[int], lower: int) -> tuple[int, int]:
    """Validate an inclusive integer (low, high) option with lower <= low <= high."""
    try:
        low, high = (int(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a (low, high) pair of integers; got {value!r}") from None
    if not lower <= low <= high:
        raise ValueError(f"{name} must satisfy {lower} <= low <= high; got {value!r}")
    return low, high


def check_positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer; got {value!r}")
    return int(value)
