"""Pictures the app shows: heatmap overlays on a fixed colour scale, its legend, region outlines, numbers as
people read them, and uploads made safe to process (`read_upload`, owned by the image-loading code)."""

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


# The heatmap's colour scale is fixed relative to the model's own threshold (not the slider, so moving the
# slider changes the outlines, never the colours): r = anomaly value / model threshold.
#   r <= 0.5          light blue wash: clearly normal
#   0.5 < r < 1       blue -> cyan, still a light tint: normal, closer to the threshold
#   1 <= r <= 1.5     orange -> red, strong: above the model's threshold (a predicted defect)
#   r > 1.5           red
# Below the threshold the tint stays light (alpha <= 0.3) so the product itself stays readable; above it
# the colour jumps to warm and opaque, so defects stand out however much normal texture sits near it.
SCALE_LOW, SCALE_HIGH = 0.5, 1.5
COOL_LOW, COOL_HIGH = np.array([70, 110, 255.0]), np.array([0, 210, 230.0])
WARM_LOW, WARM_HIGH = np.array([255, 150, 0.0]), np.array([220, 0, 0.0])
ALPHA_LOW, ALPHA_NEAR, ALPHA_ABOVE = 0.12, 0.3, 0.6
MIN_DISPLAY_SIDE = 512  # small images are enlarged (by whole pixels) so the panel shows them at a readable size


def heat_colours(ratio: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Anomaly / model threshold -> (H x W x 3 colours, H x W opacity) on the fixed scale above."""
    r = np.asarray(ratio, np.float64)
    below = np.clip((r - SCALE_LOW) / (1 - SCALE_LOW), 0, 1)[..., None]
    above = np.clip((r - 1) / (SCALE_HIGH - 1), 0, 1)[..., None]
    cool = COOL_LOW + (COOL_HIGH - COOL_LOW) * below
    warm = WARM_LOW + (WARM_HIGH - WARM_LOW) * above
    is_above = (r >= 1)[..., None]
    colours = np.where(is_above, warm, cool)
    alpha = np.where(is_above[..., 0], ALPHA_ABOVE, ALPHA_LOW + (ALPHA_NEAR - ALPHA_LOW) * below[..., 0])
    return colours, alpha


def overlay(image: np.ndarray, anomaly_map: np.ndarray, model_threshold: float) -> np.ndarray:
    """The heatmap on the fixed scale (relative to the model's threshold), blended on the image."""
    colours, alpha = heat_colours(anomaly_map / max(float(model_threshold), 1e-12))
    blended = (1 - alpha[..., None]) * image.astype(np.float64) + alpha[..., None] * colours
    return blended.clip(0, 255).astype(np.uint8)


def display_scale(shape: tuple[int, ...], min_side: int = MIN_DISPLAY_SIDE) -> int:
    """The whole-number enlargement that brings the longer side to at least `min_side` pixels."""
    longest = max(shape[:2])
    return max(1, -(-min_side // longest))


def enlarge(array: np.ndarray, scale: int) -> np.ndarray:
    """Nearest-neighbour enlargement by a whole factor: crisp pixels, and a click maps back exactly."""
    if scale == 1:
        return array
    return np.repeat(np.repeat(array, scale, axis=0), scale, axis=1)


def legend_html(model_threshold: float | None, model_name: str = "") -> str:
    """The colour scale as HTML next to the heatmap: what each colour means, in the model's own units."""
    def stop(colour, alpha):
        r, g, b = (int(c) for c in colour)
        return f"rgba({r},{g},{b},{alpha})"

    gradient = ", ".join([
        f"{stop(COOL_LOW, ALPHA_LOW + 0.15)} 0%", f"{stop(COOL_HIGH, ALPHA_NEAR + 0.2)} 49.9%",
        f"{stop(WARM_LOW, ALPHA_ABOVE + 0.3)} 50%", f"{stop(WARM_HIGH, 1.0)} 100%",
    ])
    if model_threshold is None:
        low, mid, high = f"≤ {SCALE_LOW:g}× threshold", "model threshold", f"≥ {SCALE_HIGH:g}× threshold"
    else:
        t = float(model_threshold)
        low, mid, high = (f"≤ {number_text(SCALE_LOW * t)}", f"threshold {number_text(t)}",
                          f"≥ {number_text(SCALE_HIGH * t)}")
    source = f" of {model_name}" if model_name else ""
    return (
        '<div id="heat-legend" style="font-size:0.85em">'
        f'<div style="height:14px;border-radius:3px;background:linear-gradient(to right, {gradient})"></div>'
        '<div style="display:flex;justify-content:space-between">'
        f"<span>{low} (normal)</span><span>{mid}</span><span>{high} (defect)</span></div>"
        f"<div>Colour = anomaly ÷ the model's threshold{source}: light blue/cyan below it, orange to red above. "
        "Outlines: <b style='color:#00b000'>green</b> = predicted region at the slider's threshold, "
        "<b style='color:#e040e0'>magenta</b> = the region being described.</div></div>"
    )


def number_text(value: float) -> str:
    """A score or threshold as a person reads it: about three significant digits, no float noise."""
    value = float(value)
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def slider_step(threshold: float) -> float:
    """A slider step about 1/1000 of the threshold, rounded to a power of ten (0.01 for a threshold of 31.8)."""
    import math

    magnitude = abs(float(threshold)) or 1.0
    return 10.0 ** (math.floor(math.log10(magnitude)) - 3)


def draw_outlines(image: np.ndarray, regions: list[np.ndarray], selected: int | None = None,
                  extra: np.ndarray | None = None, scale: int = 1) -> np.ndarray:
    """Outline every region (the selected one, or an extra click disk, in another colour).

    `image` is the enlarged picture; regions are at image size and are enlarged by `scale` first, so
    outlines stay two display pixels wide whatever the enlargement.
    """
    out = image.copy()
    for index, region in enumerate(regions):
        out[edge(enlarge(region, scale))] = SELECTED_RGB if index == selected else OUTLINE_RGB
    if extra is not None:
        out[edge(enlarge(extra, scale))] = SELECTED_RGB
    return out


def edge(region: np.ndarray) -> np.ndarray:
    region = np.asarray(region, bool)
    return region & ~ndimage.binary_erosion(region, iterations=2, border_value=0)


def to_png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()
