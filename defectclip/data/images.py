"""Reading image and mask files into one predictable form.

Industrial cameras write 8-bit grayscale, 16-bit grayscale, float, RGB, RGBA and palette files; every
consumer in defectclip wants the same thing, so all of them go through `load_image` / `load_mask`.
One validation layer sits in front of the pixels:

- the file must be a regular file (a FIFO or device would block the reader forever);
- the pixel count is checked from the header, before anything is decoded (`MAX_IMAGE_PIXELS`);
- any decoder failure (truncated data, a text-chunk bomb, a malformed header) becomes a DataError
  naming the file;
- EXIF orientation is applied, so a phone photo is scored the way it is displayed;
- 16-bit and float pixels are scaled by their bit depth (65535, resp. 1.0 is white), never by the
  image's own min/max, so one hot pixel cannot turn the rest of the image black;
- non-finite float pixels are refused;
- transparent pixels are composited onto the image's own background (the median of its opaque border
  pixels, white when there are none), not onto black, which would read as a dark defect.
"""

from __future__ import annotations

import math
import os
import stat
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from ..errors import DefectclipError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
# Formats the loader decodes; anything else (PSD, ICO, EPS, ...) is refused before its decoder runs.
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP", "MPO")
# 40 MP: above any industrial line camera frame the project targets (25 MP) and small enough that
# the whole read (decode + 8-bit RGB + a float32 tensor, 12 bytes a pixel) stays under 1 GB.
MAX_IMAGE_PIXELS = 40_000_000
# Values this far outside a float image's nominal [0, 1] are rounding, not a different convention.
FLOAT_TOLERANCE = 1e-3
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
# v -> round(255 v / 65535) for every 16-bit value (no ties: 255 v / 65535 is never k + 1/2).
SIXTEEN_TO_EIGHT = ((np.arange(65536, dtype=np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
TRANSPARENT_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


class DataError(DefectclipError):
    """A problem with the user's data: the message says which file or folder and what to do."""


# --------------------------------------------------------------------------------------------------
# opening


def check_regular_file(path: Path, what: str = "Image") -> None:
    """Refuse what is not a readable regular file before opening it (a FIFO would block forever)."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise DataError(f"{what} file not found: {path}") from None
    except OSError as err:
        raise DataError(f"Cannot access {what.lower()} file {path}: {err.strerror or err}.") from None
    if stat.S_ISDIR(info.st_mode):
        raise DataError(f"{path} is a folder, not an {what.lower()} file.")
    if not stat.S_ISREG(info.st_mode):
        raise DataError(f"{path} is not a regular file (a pipe, socket or device); pass an image file.")
    if info.st_size == 0:
        raise DataError(f"{what} file {path} is empty (0 bytes).")


def check_pixel_budget(width: int, height: int, source: object, limit: int = MAX_IMAGE_PIXELS) -> None:
    if width < 1 or height < 1:
        raise DataError(f"{source} has no pixels ({width} x {height}).")
    if width * height > limit:
        raise DataError(
            f"{source} is {width} x {height} = {width * height / 1e6:.0f} MP; at most {limit / 1e6:.0f} MP "
            "is read (defectclip.data.images.MAX_IMAGE_PIXELS). Downscale or crop it first."
        )


def open_image(path: str | Path, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Open and fully decode an image file, EXIF-oriented; every failure is a DataError naming the file."""
    path = Path(path)
    check_regular_file(path)
    try:
        with warnings.catch_warnings():
            # The pixel budget below replaces PIL's own bomb warning (it fires at 89 MP).
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path, formats=IMAGE_FORMATS) as img:
                check_pixel_budget(img.width, img.height, f"Image {path}", max_pixels)
                img.load()
                return ImageOps.exif_transpose(img)  # a new image, turned upright when EXIF says so
    except DataError:
        raise
    except Image.DecompressionBombError:  # PIL's own guard fires in open() above 2 x its 89 MP limit
        raise DataError(
            f"Image {path} declares more than {2 * Image.MAX_IMAGE_PIXELS / 1e6:.0f} MP; at most "
            f"{max_pixels / 1e6:.0f} MP is read (defectclip.data.images.MAX_IMAGE_PIXELS)."
        ) from None
    except MemoryError:
        raise DataError(f"Image {path} is too large to decode in the available memory.") from None
    except Exception as err:  # noqa: BLE001 - any decoder failure means the file is unreadable
        raise DataError(
            f"Cannot read image {path}: {type(err).__name__}: {err}. Is it a complete PNG/JPEG/TIFF/BMP/WebP file?"
        ) from err


# --------------------------------------------------------------------------------------------------
# pixels -> 8-bit RGB


def pil_to_rgb_array(img: Image.Image, source: object = "image") -> np.ndarray:
    """Any PIL mode -> H x W x 3 uint8 RGB, scaled by bit depth (see the module docstring)."""
    check_pixel_budget(img.width, img.height, source)
    if img.mode in SIXTEEN_BIT_MODES or img.mode == "I":
        return gray_to_rgb(_sixteen_bit_to_uint8(np.asarray(img), img.mode, source))
    if img.mode == "F":
        return gray_to_rgb(_float_to_uint8(np.asarray(img, dtype=np.float32), source))
    if img.mode in TRANSPARENT_MODES or (img.mode == "P" and "transparency" in img.info):
        return composite_on_background(img.convert("RGBA"))
    try:
        return np.asarray(img.convert("RGB"))
    except (ValueError, OSError) as err:
        raise DataError(f"{source}: cannot convert PIL mode {img.mode!r} to RGB ({err}).") from err


def gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[..., None], 3, axis=2)


def _sixteen_bit_to_uint8(values: np.ndarray, mode: str, source: object) -> np.ndarray:
    """0..65535 -> 0..255 (65535 is white, whatever the image's own maximum)."""
    if mode == "I":
        # PIL opens some 16-bit files as 32-bit "I"; real 32-bit integer images are out of range here.
        low, high = int(values.min()), int(values.max())
        if low < 0 or high > 65535:
            raise DataError(
                f"{source} is a 32-bit integer image with values {low}..{high}; only 8-bit, 16-bit (0-65535) "
                "and float (0-1) images are read. Convert it to 16-bit first."
            )
    # One table look-up per pixel: no temporary wider than the input (the old float64 path cost 1.3 GB
    # and 11 s on a 40 MP image).
    return SIXTEEN_TO_EIGHT[values.astype(np.uint16, copy=False)]  # 1 byte a pixel (np.take: 9)


def _float_to_uint8(values: np.ndarray, source: object) -> np.ndarray:
    """Float pixels in [0, 1] -> 0..255; non-finite pixels and other ranges are refused."""
    finite = np.isfinite(values)
    if not finite.all():
        raise DataError(
            f"{source} holds {int((~finite).sum())} NaN or infinite pixels; a float image must be finite."
        )
    low, high = float(values.min()), float(values.max())
    if low < -FLOAT_TOLERANCE or high > 1 + FLOAT_TOLERANCE:
        raise DataError(
            f"{source} is a float image with values {low:g}..{high:g}; float images must hold 0-1 "
            "(0 = black, 1 = white). Rescale it, or save it as 8- or 16-bit."
        )
    return np.round(np.clip(values, 0.0, 1.0) * 255.0).astype(np.uint8)


def border_background(rgba: np.ndarray) -> tuple[int, int, int]:
    """The median colour of the opaque pixels on the image's border, white when none is opaque.

    A cut-out part photographed on a table keeps the table's colour around it, so filling the
    transparent area with it adds no edge that the scorer would mistake for a defect.
    """
    border = np.concatenate([rgba[0], rgba[-1], rgba[:, 0], rgba[:, -1]])
    opaque = border[border[:, 3] == 255]
    if opaque.size == 0:
        return (255, 255, 255)
    return tuple(int(v) for v in np.median(opaque[:, :3], axis=0).round())


def composite_on_background(rgba_image: Image.Image) -> np.ndarray:
    rgba = np.asarray(rgba_image)
    background = Image.new("RGBA", rgba_image.size, (*border_background(rgba), 255))
    return np.asarray(Image.alpha_composite(background, rgba_image).convert("RGB"))


def load_image_array(path: str | Path) -> np.ndarray:
    """Read a file as H x W x 3 uint8 RGB."""
    return pil_to_rgb_array(open_image(path), f"Image {path}")


def array_to_tensor(rgb: np.ndarray) -> torch.Tensor:
    """H x W x 3 uint8 -> 3 x H x W float32 in [0, 1]."""
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise DataError(f"Expected an H x W x 3 RGB array, got shape {tuple(rgb.shape)}")
    if rgb.dtype != np.uint8:
        raise DataError(f"Expected a uint8 (0-255) RGB array, got {rgb.dtype}.")
    # .float() makes the new tensor, so the caller's array is only read (a read-only or flipped one
    # is copied first, as torch.from_numpy requires).
    source = rgb if rgb.flags.writeable and min(rgb.strides) >= 0 else np.array(rgb)  # from_numpy: no negative strides
    return torch.from_numpy(source).permute(2, 0, 1).float().div_(255.0)


def load_image(path: str | Path) -> torch.Tensor:
    """Read any image file as a 3 x H x W float32 RGB tensor in [0, 1]."""
    return array_to_tensor(load_image_array(path))


# --------------------------------------------------------------------------------------------------
# masks


def load_mask(path: str | Path) -> np.ndarray:
    """Read a binary mask file as an H x W bool array.

    Masks are black (0) and white (255, or 65535 in 16-bit); a mask holding only 0 and 1 is read as
    0 / 1. Anything in between (JPEG noise, anti-aliased edges) is thresholded at half the bit depth,
    so faint background noise never becomes defect pixels.
    """
    img = open_image(path)
    if img.mode == "1":
        return np.asarray(img, dtype=bool)
    if img.mode == "F":
        raise DataError(f"Mask {path} is a float image; save masks as 8-bit black/white PNG.")
    if img.mode not in ("L", "I") + SIXTEEN_BIT_MODES:
        img = img.convert("L")
    values = np.asarray(img).astype(np.int64)
    top = 255 if img.mode == "L" else 65535
    if values.min() < 0 or values.max() > top:
        raise DataError(f"Mask {path} holds values {values.min()}..{values.max()}; expected 0 (background) to {top}.")
    if values.max() <= 1:
        return values == 1
    return values > top // 2


def load_index_mask(path: str | Path) -> np.ndarray:
    """Read an index mask (pixel value = class index, 0 = background) as an H x W int64 array."""
    img = open_image(path)
    if img.mode in ("RGB", "RGBA", "LA", "CMYK", "YCbCr", "F"):
        raise DataError(
            f"Index mask {path} is a {img.mode} image; expected one channel whose pixel values are class "
            "indices (0 = background). Save it as 8-bit grayscale or palette PNG."
        )
    return np.asarray(img).astype(np.int64)


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside `folder`, sorted by name so every run sees the same order."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


# --------------------------------------------------------------------------------------------------
# any accepted image -> tensor


def image_to_tensor(item: Any) -> torch.Tensor:
    """One image in any accepted form -> 3 x H x W float32 in [0, 1]: the one converter every model uses.

    Accepted: a path (read with `load_image`, so a corrupt file raises a DataError naming it), a
    3 x H x W tensor (float in [0, 1] or uint8), an H x W x 3 uint8 array, a PIL image, or a dataset
    sample (anything with an `.image` tensor).
    """
    if isinstance(item, (str, Path)):
        return load_image(item)
    if isinstance(item, Image.Image):
        return array_to_tensor(pil_to_rgb_array(item, "PIL image"))
    if hasattr(item, "image") and isinstance(getattr(item, "image"), torch.Tensor):
        return image_to_tensor(item.image)
    if isinstance(item, np.ndarray):
        return _array_image(item)
    if isinstance(item, torch.Tensor):
        return _tensor_image(item)
    raise DataError(
        f"Cannot use a {type(item).__name__} as an image; pass file paths, 3 x H x W tensors, "
        "H x W x 3 uint8 arrays, PIL images or a dataset."
    )


def _check_pixels(height: int, width: int, what: str) -> None:
    if height < 1 or width < 1:
        raise DataError(f"The {what} is empty ({height} x {width} pixels).")
    if height * width > MAX_IMAGE_PIXELS:
        raise DataError(
            f"The {what} is {width} x {height} = {height * width / 1e6:.0f} MP; at most "
            f"{MAX_IMAGE_PIXELS / 1e6:.0f} MP is scored (defectclip.data.images.MAX_IMAGE_PIXELS). Downscale it first."
        )


def _array_image(array: np.ndarray) -> torch.Tensor:
    if array.ndim != 3 or array.shape[2] != 3:
        raise DataError(
            f"Expected an H x W x 3 RGB array, got shape {tuple(array.shape)}. A grayscale or RGBA "
            "image must be converted first: defectclip.data.load_image(path) reads any file as RGB."
        )
    if array.dtype != np.uint8:
        raise DataError(f"Expected a uint8 H x W x 3 array (0-255), got {array.dtype}; pass floats as a 3 x H x W tensor.")
    _check_pixels(array.shape[0], array.shape[1], "image array")
    return array_to_tensor(array)


def _dense_view(tensor: torch.Tensor) -> torch.Tensor:
    """The same elements as a contiguous view where the tensor is a permuted contiguous block (an
    H x W x 3 array seen as 3 x H x W): whole-tensor reductions then run 3x faster (0.05 vs 0.15 ms
    at 224 px) than over the strided view."""
    order = sorted(range(tensor.dim()), key=lambda axis: -tensor.stride(axis))
    view = tensor.permute(order)
    return view if view.is_contiguous() else tensor


def _tensor_image(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.dim() != 3 or tensor.shape[0] != 3:
        channels = tensor.shape[0] if tensor.dim() == 3 else "no channel axis"
        raise DataError(
            f"Expected an RGB image tensor shaped 3 x H x W, got {tuple(tensor.shape)} ({channels} channels). "
            "Grayscale images need 3 channels: defectclip.data.load_image(path) converts any file to RGB, "
            "or repeat the channel with image.expand(3, -1, -1)."
        )
    _check_pixels(tensor.shape[1], tensor.shape[2], "image tensor")
    if tensor.dtype == torch.uint8:
        return tensor.detach().cpu().float().div_(255.0)
    if not tensor.is_floating_point():
        raise DataError(f"Expected a float (0-1) or uint8 image tensor, got {tensor.dtype}.")
    image = tensor.detach().float().cpu()
    # One pass for the whole check (NaN or +-inf anywhere makes the min or the max non-finite); the
    # element-wise isfinite mask, which took longer than the backbone's first stage on a 224 px image,
    # is only built to count bad values for the error.
    low, high = (float(value) for value in torch.aminmax(_dense_view(image)))
    if not (math.isfinite(low) and math.isfinite(high)):
        bad = int((~torch.isfinite(image)).sum())
        raise DataError(f"The image tensor holds {bad} NaN or infinite values; every pixel must be a finite 0-1 value.")
    if low < -FLOAT_TOLERANCE or high > 1 + FLOAT_TOLERANCE:
        hint = " It looks like 0-255 values: divide by 255." if high > 1.5 else ""
        raise DataError(f"Float image tensors must hold values in [0, 1]; this one spans {low:g}..{high:g}.{hint}")
    if low < 0.0 or high > 1.0:
        # Out of place: for a float32 CPU tensor `image` is the caller's own tensor.
        image = image.clamp(0.0, 1.0)
    return image
