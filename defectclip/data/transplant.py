"""Transplanted defects: a real defect region cut from one image and Poisson-blended into a normal one.

The paper trains on synthetic defects made from normal images; cutting real defect regions (with
their ground-truth masks) and blending them elsewhere is the cheapest way to get more region /
caption pairs of the same type without inventing defect appearance. Poisson blending
(`cv2.seamlessClone`) keeps the defect's own gradients and takes the target's brightness at the edge,
so the seam does not give the defect away.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from .regions import as_bool_mask, bounding_box

MAX_PLACEMENT_TRIES = 200


@dataclass
class TransplantedDefect:
    """`image`: the target with the defect blended in (uint8, the target's shape).
    `mask`: H x W bool, the defect's pixels at their new place. `defect`: the type, unchanged.
    `offset`: (x, y) of the region's bounding box's top-left corner in the target."""

    image: np.ndarray
    mask: np.ndarray
    defect: str
    offset: tuple[int, int]


def _as_rgb_uint8(image: np.ndarray, what: str) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"{what} must be uint8 (load files with defectclip.data.load_image_array), got {image.dtype}")
    if image.ndim == 2:
        return np.repeat(image[..., None], 3, axis=2)
    if image.ndim == 3 and image.shape[2] == 3:
        return image
    raise ValueError(f"{what} must be H x W or H x W x 3, got shape {image.shape}")


def _cut_patch(image: np.ndarray, region: np.ndarray, margin: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Crop the region's bounding box plus `margin` + 1 pixels from the source.

    Returns (patch, region inside the patch, clone mask). The clone mask is the region dilated by
    `margin`: seamlessClone keeps the pixels on the edge of its mask's bounding box equal to the
    target (they are the boundary condition), so the region must sit strictly inside it to be
    placed whole; the extra ring also gives the blend some of the source's surroundings to fade
    through. The image is reflected at its border so regions touching it keep their context, and
    one more pixel is added because seamlessClone clears the outermost row and column of its mask.
    """
    pad = margin + 1
    padded_image = cv2.copyMakeBorder(image, pad, pad, pad, pad, cv2.BORDER_REFLECT_101)
    padded_region = np.pad(region, pad)
    x0, y0, x1, y1 = bounding_box(region)
    window = (slice(y0, y1 + 2 * pad), slice(x0, x1 + 2 * pad))  # bbox +- pad, in padded coordinates
    patch_region = padded_region[window]
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * margin + 1, 2 * margin + 1))
    clone_mask = cv2.dilate(patch_region.astype(np.uint8), kernel)
    return padded_image[window], patch_region, clone_mask


def _fits(placed_region: np.ndarray, allowed: np.ndarray | None) -> bool:
    return allowed is None or bool(allowed[placed_region].all())


def _choose_offset(
    target_shape: tuple[int, int], box_size: tuple[int, int], region: np.ndarray, allowed: np.ndarray | None,
    rng: np.random.Generator,
) -> tuple[int, int]:
    """A uniformly random top-left corner for the clone mask's box so that the box lies inside the
    target and, when `allowed` is given, every region pixel lands on an allowed pixel."""
    height, width = target_shape
    box_h, box_w = box_size
    if box_h > height or box_w > width:
        raise ValueError(
            f"The defect with its blending margin is {box_w}x{box_h} px, larger than the {width}x{height} target."
        )
    for _ in range(MAX_PLACEMENT_TRIES):
        x, y = int(rng.integers(0, width - box_w + 1)), int(rng.integers(0, height - box_h + 1))
        placed = np.zeros(target_shape, dtype=bool)
        placed[y : y + box_h, x : x + box_w] = region
        if _fits(placed, allowed):
            return x, y
    raise ValueError(f"No place in the target where the defect lies inside `allowed` after {MAX_PLACEMENT_TRIES} tries.")


def transplant_region(
    source_image: np.ndarray,
    region_mask,
    target_image: np.ndarray,
    defect: str = "",
    seed: int | np.random.Generator = 0,
    margin: int = 3,
    allowed=None,
) -> TransplantedDefect:
    """Cut `region_mask` out of `source_image` and blend it into `target_image` at a random place.

    Images are uint8, H x W x 3 (RGB) or H x W (gray; the result is then gray too). `allowed`
    (optional H x W bool over the target) restricts where the defect may land, e.g. to the object's
    foreground. The returned mask holds exactly the region's pixels at their new place; the
    `margin`-pixel ring around them is blended with the source's surroundings but is not defect.
    """
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    region = as_bool_mask(region_mask)
    source = _as_rgb_uint8(source_image, "source_image")
    target = _as_rgb_uint8(target_image, "target_image")
    if region.shape != source.shape[:2]:
        raise ValueError(f"region_mask is {region.shape}, but source_image is {source.shape[:2]}")
    if not region.any():
        raise ValueError("region_mask is empty: there is no defect to transplant.")
    if margin < 1:
        raise ValueError(f"margin must be >= 1 (the blend needs a ring around the defect), got {margin}")
    allowed = None if allowed is None else as_bool_mask(allowed)

    patch, patch_region, clone_mask = _cut_patch(source, region, margin)
    # seamlessClone centres the bounding box of the clone mask on `center`; crop everything to that box
    # so the placement arithmetic below is exact.
    bx, by, bw, bh = cv2.boundingRect(clone_mask)
    patch, patch_region, clone_mask = (a[by : by + bh, bx : bx + bw] for a in (patch, patch_region, clone_mask))
    x, y = _choose_offset(target.shape[:2], (bh, bw), patch_region, allowed, rng)
    # seamlessClone clears the outer ring of its mask argument, so hand it the box with a 1 px frame.
    framed_patch = cv2.copyMakeBorder(patch, 1, 1, 1, 1, cv2.BORDER_REPLICATE)
    framed_mask = np.pad(clone_mask * 255, 1)
    blended = cv2.seamlessClone(framed_patch, target, framed_mask, (x + bw // 2, y + bh // 2), cv2.NORMAL_CLONE)

    # The Poisson solve recomputes its whole box; keep the target's own pixels outside the clone mask
    # so nothing but the defect and its blending ring differs from the target.
    placed_clone = np.zeros(target.shape[:2], dtype=bool)
    placed_clone[y : y + bh, x : x + bw] = clone_mask.astype(bool)
    image = np.where(placed_clone[..., None], blended, target)
    mask = np.zeros(target.shape[:2], dtype=bool)
    mask[y : y + bh, x : x + bw] = patch_region
    if np.asarray(target_image).ndim == 2:
        image = image[..., 0]
    region_box = bounding_box(mask)
    return TransplantedDefect(image, mask, defect, (region_box[0], region_box[1]))


def blend_regions_into(canvas: np.ndarray, masks: list[np.ndarray], labels: list, donors, rng: np.random.Generator,
                       clearance: int = 6, margin: int = 3) -> tuple[np.ndarray, list[np.ndarray], list]:
    """Blend each donor region into `canvas`, away from every region already there: a mixed-type image.

    `donors` is a sequence of (source image uint8, region mask, label). A donor is placed where all its
    pixels are more than `clearance` px from every earlier region (the canvas's own `masks` and the
    donors placed before it); one that does not fit anywhere is skipped. Returns the image, all masks
    (the canvas's first) and their labels.
    """
    from .regions import clear_area

    image, masks, labels = canvas, list(masks), list(labels)
    for source, region, label in donors:
        defects = np.stack(masks).any(axis=0) if masks else np.zeros(image.shape[:2], bool)
        try:
            placed = transplant_region(source, region, image, str(label), seed=rng, margin=margin,
                                       allowed=clear_area(defects, clearance))
        except ValueError:  # too large for the canvas, or no clear place left
            continue
        image, masks, labels = placed.image, masks + [placed.mask], labels + [label]
    return image, masks, labels
