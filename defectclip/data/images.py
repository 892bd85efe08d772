"""Reading image and mask files into one predictable form.

Industrial cameras write 8-bit grayscale, 16-bit grayscale, RGB, RGBA and palette files; every
consumer in defectclip wants the same thing, so all of them go through `load_image` / `load_mask`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


class DataError(ValueError):
    """A problem with the user's data: the message says which file or folder and what to do."""


def open_image(path: str | Path) -> Image.Image:
    """Open and fully decode an image file, naming the file when it cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"Image file not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()
            return img.copy()
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise DataError(f"Cannot read image {path}: {err}. Is it a valid PNG/JPEG/TIFF/BMP file?") from err


def pil_to_rgb_array(img: Image.Image) -> np.ndarray:
    """Any PIL mode -> H x W x 3 uint8 RGB.

    16-bit and 32-bit grayscale are rescaled by their own range rather than clipped, because
    clipping a 12-bit sensor image to 255 turns almost every pixel white.
    """
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        values = np.asarray(img, dtype=np.float64)
        low, high = float(values.min()), float(values.max())
        scaled = (values - low) / (high - low) if high > low else np.zeros_like(values)
        gray = np.round(scaled * 255.0).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        # Transparent pixels are composited on black: the camera saw nothing there.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return np.asarray(Image.alpha_composite(background, rgba).convert("RGB"))
    return np.asarray(img.convert("RGB"))


def load_image_array(path: str | Path) -> np.ndarray:
    """Read a file as H x W x 3 uint8 RGB."""
    return pil_to_rgb_array(open_image(path))


def array_to_tensor(rgb: np.ndarray) -> torch.Tensor:
    """H x W x 3 uint8 -> 3 x H x W float32 in [0, 1]."""
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise DataError(f"Expected an H x W x 3 RGB array, got shape {tuple(rgb.shape)}")
    return torch.from_numpy(np.array(rgb, copy=True)).permute(2, 0, 1).float().div_(255.0)


def load_image(path: str | Path) -> torch.Tensor:
    """Read any image file as a 3 x H x W float32 RGB tensor in [0, 1]."""
    return array_to_tensor(load_image_array(path))


def load_mask(path: str | Path) -> np.ndarray:
    """Read a binary mask file (0 / non-zero) as an H x W bool array."""
    img = open_image(path)
    values = np.asarray(img.convert("L") if img.mode not in ("L", "1", "I", "I;16", "P") else img)
    if values.ndim == 3:
        values = values[..., 0]
    return values > 0


def load_index_mask(path: str | Path) -> np.ndarray:
    """Read an index mask (pixel value = class index, 0 = background) as an H x W int64 array."""
    img = open_image(path)
    if img.mode in ("RGB", "RGBA"):
        raise DataError(
            f"Index mask {path} is a colour image; expected one channel whose pixel values are class "
            "indices (0 = background). Save it as 8-bit grayscale or palette PNG."
        )
    return np.asarray(img).astype(np.int64)


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside `folder`, sorted by name so every run sees the same order."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def image_to_tensor(item: Any) -> torch.Tensor:
    """One image in any accepted form -> 3 x H x W float32 in [0, 1]: the one converter every model uses.

    Accepted: a path (read with `load_image`, so a corrupt file raises a DataError naming it), a
    3 x H x W tensor (float in [0, 1] or uint8), an H x W x 3 uint8 array, a PIL image, or a dataset
    sample (anything with an `.image` tensor).
    """
    if isinstance(item, (str, Path)):
        return load_image(item)
    if isinstance(item, Image.Image):
        return array_to_tensor(pil_to_rgb_array(item))
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


def _array_image(array: np.ndarray) -> torch.Tensor:
    if array.ndim != 3 or array.shape[2] != 3:
        raise DataError(
            f"Expected an H x W x 3 RGB array, got shape {tuple(array.shape)}. A grayscale or RGBA "
            "image must be converted first: defectclip.data.load_image(path) reads any file as RGB."
        )
    if array.dtype != np.uint8:
        raise DataError(f"Expected a uint8 H x W x 3 array (0-255), got {array.dtype}; pass floats as a 3 x H x W tensor.")
    return array_to_tensor(array)


def _tensor_image(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.dim() != 3 or tensor.shape[0] != 3:
        channels = tensor.shape[0] if tensor.dim() == 3 else "no channel axis"
        raise DataError(
            f"Expected an RGB image tensor shaped 3 x H x W, got {tuple(tensor.shape)} ({channels} channels). "
            "Grayscale images need 3 channels: defectclip.data.load_image(path) converts any file to RGB, "
            "or repeat the channel with image.expand(3, -1, -1)."
        )
    if tensor.dtype == torch.uint8:
        return tensor.float().div_(255.0)
    if not tensor.is_floating_point():
        raise DataError(f"Expected a float (0-1) or uint8 image tensor, got {tensor.dtype}.")
    return tensor.detach().float().cpu()
