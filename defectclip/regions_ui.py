"""Turning a predicted defect mask and a user's click into the region to describe.

Pure numpy/scipy functions, so the app's behaviour on a click is tested without a browser.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

CLICK_SNAP_PX = 15  # a click this close to a predicted region selects it
DEFAULT_DISK_RADIUS = 16  # a click far from every region describes a disk around it


def predicted_regions(mask: np.ndarray, min_area: int = 4) -> list[np.ndarray]:
    """Connected components (8-connected) of a predicted defect mask, largest first.

    Specks below `min_area` pixels are dropped: they are smoothing noise, not defects a user can point at.
    """
    labels, count = ndimage.label(np.asarray(mask, bool), structure=np.ones((3, 3), bool))
    regions = [labels == i for i in range(1, count + 1)]
    regions = [r for r in regions if r.sum() >= min_area]
    return sorted(regions, key=lambda r: -int(r.sum()))


def distance_to_region(region: np.ndarray, x: int, y: int) -> float:
    """Euclidean distance in pixels from (x, y) to the nearest pixel of `region` (0 inside it)."""
    ys, xs = np.nonzero(region)
    if len(xs) == 0:
        return float("inf")
    return float(np.sqrt(((xs - x) ** 2 + (ys - y) ** 2).min()))


def disk_mask(shape: tuple[int, int], x: int, y: int, radius: int = DEFAULT_DISK_RADIUS) -> np.ndarray:
    yy, xx = np.ogrid[: shape[0], : shape[1]]
    return (xx - x) ** 2 + (yy - y) ** 2 <= radius**2


def region_from_click(
    regions: list[np.ndarray],
    shape: tuple[int, int],
    x: int,
    y: int,
    snap_px: float = CLICK_SNAP_PX,
    disk_radius: int = DEFAULT_DISK_RADIUS,
) -> tuple[np.ndarray, int | None]:
    """The region a click at (x, y) means, and its index in `regions` (None for a disk).

    A click inside a region, or within `snap_px` of one, selects the nearest region; otherwise the
    user pointed at something the model did not flag, so a disk around the click is described.
    """
    height, width = shape
    if not (0 <= x < width and 0 <= y < height):
        raise ValueError(f"Click ({x}, {y}) is outside the {width}x{height} image.")
    if regions:
        distances = [distance_to_region(r, x, y) for r in regions]
        nearest = int(np.argmin(distances))
        if distances[nearest] <= snap_px:
            return regions[nearest], nearest
    return disk_mask(shape, x, y, disk_radius), None
