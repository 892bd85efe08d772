"""The region view: what the describer looks at for one region, the same in training, evaluation and the app.

A whole-image view shrinks a small region to a few pixels at the tower's input size (a 0.2 % region of
a 640 px image is 2 x 2 px at 128 px), so the alpha mask has nothing left to point at. The view is
instead a square crop centred on the region's bounding box, `CONTEXT_SCALE` times its longer side (so
the region fills about half the view and its surroundings the rest), at least `MIN_SIDE_PX` pixels
(tiny regions still get some surface around them), resized to the tower input; the mask is cropped the
same way and becomes the alpha channel. Parts of the crop outside the image are zero (black) in the
image and outside the region in the mask.

Because the crop is measured in pixels of the image and centred on the region, the view of a region
does not depend on how large the rest of the image is: a region shown in one cell of a mosaic is seen
as it is in its own image (up to what lies beyond that image's border).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .config import AlphaClipError

CONTEXT_SCALE = 2.0  # crop side / the region box's longer side
MIN_SIDE_PX = 48  # a 5 px blowhole is seen with about 20 px of surface on each side


def region_box(mask: np.ndarray | torch.Tensor) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of the mask's non-zero pixels, exclusive ends."""
    mask = torch.as_tensor(np.asarray(mask) if not torch.is_tensor(mask) else mask)
    ys = torch.nonzero(mask.any(dim=1)).flatten()
    xs = torch.nonzero(mask.any(dim=0)).flatten()
    if len(xs) == 0:
        raise AlphaClipError("The region mask is empty: mark at least one pixel.")
    return int(xs[0]), int(ys[0]), int(xs[-1]) + 1, int(ys[-1]) + 1


def view_window(box: tuple[int, int, int, int], context: float = CONTEXT_SCALE,
                min_side: int = MIN_SIDE_PX) -> tuple[int, int, int]:
    """(left, top, side) of the square crop for a region box; it may reach past the image border."""
    x0, y0, x1, y1 = box
    side = max(int(math.ceil(context * max(x1 - x0, y1 - y0))), min_side)
    centre_x, centre_y = (x0 + x1) / 2.0, (y0 + y1) / 2.0
    return int(round(centre_x - side / 2.0)), int(round(centre_y - side / 2.0)), side


def _crop_padded(array: torch.Tensor, left: int, top: int, side: int) -> torch.Tensor:
    """array[..., top:top+side, left:left+side] with zeros where the window leaves the array."""
    height, width = array.shape[-2:]
    pad = (max(0, -left), max(0, left + side - width), max(0, -top), max(0, top + side - height))
    if any(pad):
        array = F.pad(array, pad)
    left, top = left + pad[0], top + pad[2]
    return array[..., top : top + side, left : left + side]


def region_view(image: torch.Tensor, mask, size: tuple[int, int], interpolation: str = "bilinear",
                context: float = CONTEXT_SCALE, min_side: int = MIN_SIDE_PX) -> tuple[torch.Tensor, torch.Tensor]:
    """One region's view: (3 x h x w image in [0, 1], h x w mask coverage in [0, 1]) at `size`.

    `image` is 3 x H x W in [0, 1]; `mask` H x W (bool or 0..1), not empty.
    """
    from ..data.transforms import resize
    from .alpha import mask_coverage

    mask = torch.as_tensor(np.asarray(mask) if not torch.is_tensor(mask) else mask)
    if tuple(mask.shape) != tuple(image.shape[-2:]):
        raise AlphaClipError(f"Mask {tuple(mask.shape)} and image {tuple(image.shape[-2:])} differ in size.")
    left, top, side = view_window(region_box(mask), context, min_side)
    crop = _crop_padded(image.float(), left, top, side)
    mask_crop = _crop_padded(mask.float(), left, top, side)
    return resize(crop, size, interpolation), mask_coverage(mask_crop, size)[0]


def region_views(images: torch.Tensor, masks, size: tuple[int, int], interpolation: str = "bilinear",
                 context: float = CONTEXT_SCALE, min_side: int = MIN_SIDE_PX) -> tuple[torch.Tensor, torch.Tensor]:
    """`region_view` of each (image, mask) pair: (N x 3 x h x w, N x h x w)."""
    if images.dim() == 3:
        images = images[None]
    masks = torch.as_tensor(np.asarray(masks) if not torch.is_tensor(masks) else masks)
    if masks.dim() == 2:
        masks = masks[None]
    if images.shape[0] != masks.shape[0]:
        raise AlphaClipError(f"{images.shape[0]} images but {masks.shape[0]} masks.")
    views = [region_view(image, mask, size, interpolation, context, min_side) for image, mask in zip(images, masks)]
    return torch.stack([v[0] for v in views]), torch.stack([v[1] for v in views])
