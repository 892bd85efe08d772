"""Pictures the app shows: heatmap overlays, region outlines, and uploads made safe to process."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from defectclip.data import DataError, pil_to_rgb_array
from defectclip.data.images import check_regular_file, open_image

MAX_UPLOAD_BYTES = 20 * 1024 * 1024
MAX_PIXELS = 40_000_000  # beyond this PIL's decompression-bomb guard would trip anyway
MAX_SIDE = 1024  # large photos are scaled down once, so every step after is fast and bounded
OUTLINE_RGB = (0, 255, 0)
SELECTED_RGB = (255, 64, 255)


class UploadError(DataError):
    """What the user sees instead of a stack trace when an upload cannot be used."""


def read_upload(path: str | Path) -> np.ndarray:
    """An uploaded file -> H x W x 3 uint8 RGB, no side longer than MAX_SIDE.

    The file goes through defectclip's one image loader (regular file only, pixel budget checked from
    the header, EXIF orientation, bit-depth scaling, finite pixels), with the app's tighter limits.
    """
    path = Path(path)
    try:
        check_regular_file(path)
        size = path.stat().st_size
        if size > MAX_UPLOAD_BYTES:
            raise UploadError(f"{path.name} is {size / 1e6:.1f} MB; the limit is {MAX_UPLOAD_BYTES / 1e6:.0f} MB.")
        rgb = pil_to_rgb_array(open_image(path, max_pixels=MAX_PIXELS), path.name)
    except UploadError:
        raise
    except DataError as err:
        reason = str(err).replace(str(path), path.name)
        raise UploadError(f"{path.name} is not an image this app can read (PNG, JPEG, TIFF, BMP, WebP): {reason}") from err
    return shrink(rgb)


def shrink(rgb: np.ndarray, max_side: int = MAX_SIDE) -> np.ndarray:
    height, width = rgb.shape[:2]
    scale = max_side / max(height, width)
    if scale >= 1:
        return rgb
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BILINEAR))


def normalise_array(image: np.ndarray) -> np.ndarray:
    """Whatever array Gradio hands over (gray, RGBA, 16-bit) -> H x W x 3 uint8 RGB."""
    array = np.asarray(image)
    if array.dtype != np.uint8:
        array = array.astype(np.float64)
        low, high = array.min(), array.max()
        array = ((array - low) / (high - low) * 255 if high > low else np.zeros_like(array)).astype(np.uint8)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    if array.shape[2] == 4:
        array = pil_to_rgb_array(Image.fromarray(array, "RGBA"))
    return shrink(array[..., :3])


def heat_colours(values: np.ndarray) -> np.ndarray:
    """[0, 1] -> a blue-yellow-red ramp (no matplotlib needed)."""
    v = np.clip(values, 0, 1)[..., None]
    blue, yellow, red = np.array([0, 0, 255.0]), np.array([255, 255, 0.0]), np.array([255, 0, 0.0])
    low = blue + (yellow - blue) * (v / 0.5)
    high = yellow + (red - yellow) * ((v - 0.5) / 0.5)
    return np.where(v < 0.5, low, high)


def overlay(image: np.ndarray, anomaly_map: np.ndarray, threshold: float, alpha: float = 0.45) -> np.ndarray:
    """The heatmap scaled so the threshold sits in the middle of the ramp, blended on the image."""
    scale = max(float(threshold), 1e-6)
    colours = heat_colours(anomaly_map / (2 * scale))
    blended = (1 - alpha) * image.astype(np.float64) + alpha * colours
    return blended.clip(0, 255).astype(np.uint8)


def draw_outlines(image: np.ndarray, regions: list[np.ndarray], selected: int | None = None,
                  extra: np.ndarray | None = None) -> np.ndarray:
    """Outline every region (the selected one, or an extra click disk, in another colour)."""
    out = image.copy()
    for index, region in enumerate(regions):
        out[edge(region)] = SELECTED_RGB if index == selected else OUTLINE_RGB
    if extra is not None:
        out[edge(extra)] = SELECTED_RGB
    return out


def edge(region: np.ndarray) -> np.ndarray:
    region = np.asarray(region, bool)
    return region & ~ndimage.binary_erosion(region, iterations=2)


def to_png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()
