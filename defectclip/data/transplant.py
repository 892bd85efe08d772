"""Transplanted defects: a real defect region cut from one image and Poisson-blended into a normal one.

The paper trains on synthetic defects made from normal images; cutting real defect regions (with
their ground-truth masks) and blending them elsewhere is the cheapest way to get more region /
caption pairs of the same type without inventing defect appearance. Poisson blending keeps the
defect's own gradients and takes the target's brightness at the edge, so the seam does not give the
defect away. It is solved here (a sparse linear system per patch) rather than with OpenCV's
`seamlessClone`: on real defects that one returned the target almost unchanged (a blowhole 15 grey
levels darker than its surroundings came out within 2 levels of the target), so transplanted defects
had silently vanished.

Where a region lands matters as much as how: most defects of a part sit at a place of their own (a
break or a frayed edge on the part's border, a crack running in from it), and one blended into the
middle of another image looks like no real defect. `region_anchor` records where a region sits in its
source image (the borders its box touches, the relative position of its centre) and
`transplant_region(..., anchor=...)` places it at the same place in the target: touching the same
borders, elsewhere at the same relative position, or, when that spot is taken, sliding along the
borders it keeps.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from .regions import as_bool_mask, bounding_box

MAX_PLACEMENT_TRIES = 200
# A box edge this close to the image border (px, or this fraction of the side if larger) touches it:
# ground-truth masks are often drawn a pixel or two short of the border.
BORDER_TOLERANCE_PX = 2
BORDER_TOLERANCE_FRACTION = 0.01


@dataclass(frozen=True)
class RegionAnchor:
    """Where a region sits in its source image. `touches`: per axis (x, then y), whether its box
    touches the (low, high) border. `centre`: its box centre as a fraction of the image's (width,
    height)."""

    touches: tuple[tuple[bool, bool], tuple[bool, bool]]
    centre: tuple[float, float]


def region_anchor(region_mask) -> RegionAnchor:
    """The anchor of a region given as a mask over its whole source image."""
    region = as_bool_mask(region_mask)
    x0, y0, x1, y1 = bounding_box(region)
    height, width = region.shape
    touches = []
    for low, high, side in ((x0, x1, width), (y0, y1, height)):
        tolerance = max(BORDER_TOLERANCE_PX, BORDER_TOLERANCE_FRACTION * side)
        touches.append((low <= tolerance, high >= side - tolerance))
    return RegionAnchor((touches[0], touches[1]), ((x0 + x1) / 2 / width, (y0 + y1) / 2 / height))


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
    `margin`: the blend gives the defect some of the source's surroundings to fade through. It leaves
    a frame of at least one pixel in the patch, where the Poisson solve reads its boundary. The
    image is reflected at its border so regions touching it keep their context.
    """
    pad = margin + 1
    padded_image = cv2.copyMakeBorder(image, pad, pad, pad, pad, cv2.BORDER_REFLECT_101)
    padded_region = np.pad(region, pad)
    x0, y0, x1, y1 = bounding_box(region)
    window = (slice(y0, y1 + 2 * pad), slice(x0, x1 + 2 * pad))  # bbox +- pad, in padded coordinates
    patch_region = padded_region[window]
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * margin + 1, 2 * margin + 1))
    clone_mask = cv2.dilate(patch_region.astype(np.uint8), kernel).astype(bool)
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
        if _fits(_place(region, target_shape, x, y), allowed):
            return x, y
    raise ValueError(f"No place in the target where the defect lies inside `allowed` after {MAX_PLACEMENT_TRIES} tries.")


def _anchored_start(touches: tuple[bool, bool], centre: float, extent: int, side: int) -> int:
    """The region box's start on one axis: flush with the border(s) it touched, else at the same
    relative position, kept inside the image."""
    if touches[0] and touches[1]:
        return (side - extent) // 2
    if touches[0]:
        return 0
    if touches[1]:
        return side - extent
    return int(np.clip(round(centre * side - extent / 2), 0, side - extent))


def _anchored_offset(anchor: RegionAnchor, region: np.ndarray, target_shape: tuple[int, int],
                     allowed: np.ndarray | None, rng: np.random.Generator) -> tuple[int, int]:
    """Top-left corner of the region's box in the target: the anchored place, else (taken by
    `allowed`) a random place on the axes the region does not touch a border of."""
    height, width = target_shape
    x0, y0, x1, y1 = bounding_box(region)
    cut = region[y0:y1, x0:x1]
    box_h, box_w = cut.shape
    if box_h > height or box_w > width:
        raise ValueError(f"The defect is {box_w}x{box_h} px, larger than the {width}x{height} target.")
    (touch_x, touch_y), (centre_x, centre_y) = anchor.touches, anchor.centre
    x = _anchored_start(touch_x, centre_x, box_w, width)
    y = _anchored_start(touch_y, centre_y, box_h, height)
    free_x, free_y = not any(touch_x), not any(touch_y)
    for attempt in range(MAX_PLACEMENT_TRIES):
        if attempt:
            if not (free_x or free_y):
                break
            x = int(rng.integers(0, width - box_w + 1)) if free_x else x
            y = int(rng.integers(0, height - box_h + 1)) if free_y else y
        if _fits(_place(cut, target_shape, x, y), allowed):
            return x, y
    raise ValueError("No place in the target at the defect's own borders that lies inside `allowed`.")


def _place(box_mask: np.ndarray, shape: tuple[int, int], x: int, y: int) -> np.ndarray:
    """An H x W mask with `box_mask` at top-left (x, y); the parts outside the image are dropped."""
    placed = np.zeros(shape, dtype=bool)
    top, left = max(y, 0), max(x, 0)
    bottom, right = min(y + box_mask.shape[0], shape[0]), min(x + box_mask.shape[1], shape[1])
    if bottom > top and right > left:
        placed[top:bottom, left:right] = box_mask[top - y : bottom - y, left - x : right - x]
    return placed


def poisson_blend(patch: np.ndarray, inside: np.ndarray, target: np.ndarray, x: int, y: int) -> np.ndarray:
    """`target` with `patch` blended in where `inside` (the patch's shape, bool) holds, the patch's
    top-left at (x, y): Poisson image editing with the patch's own gradients as the guide.

    Inside, the result is the patch plus a correction h that is harmonic (discrete Laplacian 0) and
    equals target - patch on the pixels next to the inside; so every difference within the patch
    (the defect against its surroundings) is kept and its edge meets the target. `inside` must leave
    a frame of at least one pixel of the patch; the patch may stick out of the target (the target is
    reflected there), and pixels outside `inside` are the target's own.

    `defectclip.synth.poisson_torch.poisson_blend` solves the same equations batched with a fixed
    number of conjugate-gradient steps (sized for NSA's patches, up to ~100 px); real regions here
    reach several hundred px (uneven areas), so this one solves exactly, once, on the CPU.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.linalg import splu

    inside = np.asarray(inside, bool)
    if inside[0].any() or inside[-1].any() or inside[:, 0].any() or inside[:, -1].any():
        raise ValueError("The blend area must leave a frame of at least one pixel around it in the patch.")
    height, width = inside.shape
    pad = max(0, -x, -y, x + width - target.shape[1], y + height - target.shape[0])
    padded = cv2.copyMakeBorder(target, pad, pad, pad, pad, cv2.BORDER_REFLECT_101)
    window = (slice(y + pad, y + pad + height), slice(x + pad, x + pad + width))
    under = padded[window].astype(np.float64)
    guide = patch.astype(np.float64)
    difference = under - guide  # what h must equal next to the inside

    index = -np.ones(inside.shape, dtype=np.int64)
    index[inside] = np.arange(int(inside.sum()))
    rows, cols = np.nonzero(inside)
    entries_row, entries_col, entries_value = [index[rows, cols]], [index[rows, cols]], [np.full(len(rows), 4.0)]
    rhs = np.zeros((len(rows), difference.shape[2]))
    for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        neighbour = index[rows + dy, cols + dx]
        known = neighbour < 0
        rhs[known] += difference[rows[known] + dy, cols[known] + dx]
        entries_row.append(index[rows[~known], cols[~known]])
        entries_col.append(neighbour[~known])
        entries_value.append(np.full(int((~known).sum()), -1.0))
    size = len(rows)
    laplacian = coo_matrix((np.concatenate(entries_value), (np.concatenate(entries_row), np.concatenate(entries_col))),
                           shape=(size, size)).tocsc()
    correction = splu(laplacian).solve(rhs)
    blended = under.copy()
    blended[rows, cols] = guide[rows, cols] + correction
    padded[window] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    return padded[pad : pad + target.shape[0], pad : pad + target.shape[1]]


def transplant_region(
    source_image: np.ndarray,
    region_mask,
    target_image: np.ndarray,
    defect: str = "",
    seed: int | np.random.Generator = 0,
    margin: int = 3,
    allowed=None,
    anchor: RegionAnchor | bool | None = None,
) -> TransplantedDefect:
    """Cut `region_mask` out of `source_image` and blend it into `target_image`: at a random place, or
    with `anchor` (see `region_anchor`; `True` takes it from `region_mask`) at the place it had.

    Images are uint8, H x W x 3 (RGB) or H x W (gray; the result is then gray too). `allowed`
    (optional H x W bool over the target) restricts where the defect may land, e.g. to the object's
    foreground. An anchored region may touch the target's border. The returned mask holds exactly the
    region's pixels at their new place; the `margin`-pixel ring around them is blended with the
    source's surroundings but is not defect.
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

    if anchor is False:
        anchor = None
    elif anchor is True:
        anchor = region_anchor(region)
    patch, patch_region, clone_mask = _cut_patch(source, region, margin)
    # Placement works on the clone mask's box; the patch holds a frame around it.
    bx, by, bw, bh = cv2.boundingRect(clone_mask.astype(np.uint8))
    box_region = patch_region[by : by + bh, bx : bx + bw]
    if anchor is None:
        x, y = _choose_offset(target.shape[:2], (bh, bw), box_region, allowed, rng)
    else:  # the region's box is placed; the clone box around it may then stick out of the target
        region_x, region_y = _anchored_offset(anchor, box_region, target.shape[:2], allowed, rng)
        box_x0, box_y0 = bounding_box(box_region)[:2]
        x, y = region_x - box_x0, region_y - box_y0
    patch_x, patch_y = x - bx, y - by
    image = poisson_blend(patch, clone_mask, target, patch_x, patch_y)
    mask = _place(patch_region, target.shape[:2], patch_x, patch_y)
    if np.asarray(target_image).ndim == 2:
        image = image[..., 0]
    region_box = bounding_box(mask)
    return TransplantedDefect(image, mask, defect, (region_box[0], region_box[1]))


def blend_regions_into(canvas: np.ndarray, masks: list[np.ndarray], labels: list, donors, rng: np.random.Generator,
                       clearance: int = 6, margin: int = 3) -> tuple[np.ndarray, list[np.ndarray], list]:
    """Blend each donor region into `canvas`, away from every region already there: a mixed-type image.

    `donors` is a sequence of (source image uint8, region mask, label[, anchor]); with an anchor (see
    `region_anchor`: the region's place in its whole source image, when the donor is a crop of it) the
    region lands at that place, else at a random one. A donor is placed where all its pixels are more
    than `clearance` px from every earlier region (the canvas's own `masks` and the donors placed
    before it); one that does not fit anywhere is skipped. Returns the image, all masks (the canvas's
    first) and their labels.
    """
    from .regions import clear_area

    image, masks, labels = canvas, list(masks), list(labels)
    for source, region, label, *anchor in donors:
        defects = np.stack(masks).any(axis=0) if masks else np.zeros(image.shape[:2], bool)
        try:
            placed = transplant_region(source, region, image, str(label), seed=rng, margin=margin,
                                       allowed=clear_area(defects, clearance), anchor=anchor[0] if anchor else None)
        except ValueError:  # too large for the canvas, or no clear place left
            continue
        image, masks, labels = placed.image, masks + [placed.mask], labels + [label]
    return image, masks, labels
