"""Split a defect mask into its individual regions with DBSCAN (the paper's split masks).

A ground-truth mask marks every defective pixel of one type, but a region describer is asked about one
defect at a time, so the mask is cut into regions: one DBSCAN cluster of foreground pixel coordinates
is one region. DBSCAN rather than connected components because annotators leave small gaps inside one
defect (a dotted scratch, a crack drawn in strokes) and isolated specks beside it; DBSCAN bridges gaps
up to `eps` pixels and treats specks too sparse to be a defect of their own as noise.

Rules (every one tested):
- every foreground pixel ends in exactly one region: noise pixels join their nearest cluster;
- if DBSCAN finds no cluster at all (only sparse specks), all foreground is one region;
- regions smaller than `min_area` pixels are dropped and counted;
- regions are ordered by their first pixel in raster order, so the output is deterministic.

Large masks stay fast: at most `max_points` pixels are clustered, one random pixel per s x s cell
(see `_grid_subsample`; eps and min_samples are adapted to the cell size), then every foreground pixel
takes the cluster of the kept pixel of its cell or, where that one is noise, of its nearest clustered
pixel (KD-tree).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import sklearn
from scipy.spatial import cKDTree
from sklearn.cluster import DBSCAN

# Defaults, in pixels of the mask's own resolution:
# - EPS = 5: gaps of up to 5 px inside one defect are bridged (annotation strokes and dotted scratches
#   leave gaps of 1-4 px), while defects drawn farther apart stay separate regions.
# - MIN_SAMPLES = 5 foreground pixels within EPS (the pixel itself included) make a core pixel. A
#   one-pixel-wide line has 11 such pixels when straight and 7 when diagonal, so thin scratches and
#   cracks are real clusters; specks of 1-4 isolated pixels are noise and join their nearest cluster.
# - MIN_AREA = 16 px (a 4 x 4 patch): a region smaller than that cannot be described on its own.
# - MAX_POINTS = 1000: scikit-learn's DBSCAN costs about 3 ms per call plus about 6 us per clustered
#   pixel at EPS = 5 on this 2-core CPU, so one mask stays under about 10 ms whatever its size
#   (NEU-Seg masks hold about 3,000 px on average, up to 40,000). Masks up to 1,000 px are clustered
#   pixel by pixel; a 3,000 px mask at stride 2, where EPS = 5 still applies unchanged.
DEFAULT_EPS = 5.0
DEFAULT_MIN_SAMPLES = 5
DEFAULT_MIN_AREA = 16
DEFAULT_MAX_POINTS = 1000


@dataclass
class RegionSplit:
    """The regions of one mask.

    `regions`: H x W bool masks, disjoint, ordered by first pixel in raster order.
    `dropped`: how many regions were below `min_area`; `dropped_pixels`: their total area.
    `stride`: the subsampling cell size used (1 = every pixel was clustered); `eps_used`: the
    DBSCAN radius actually used, larger than the requested eps only for coarse strides.
    """

    regions: list[np.ndarray]
    dropped: int = 0
    dropped_pixels: int = 0
    stride: int = 1
    eps_used: float = DEFAULT_EPS

    def __len__(self) -> int:
        return len(self.regions)

    def label_map(self) -> np.ndarray:
        """H x W int32: 0 background (and dropped regions), 1..N the regions in order."""
        if not self.regions:
            raise ValueError("No regions, so no shape to build a label map from.")
        labels = np.zeros(self.regions[0].shape, dtype=np.int32)
        for number, region in enumerate(self.regions, start=1):
            labels[region] = number
        return labels


@dataclass
class SampleRegions:
    """The regions of every defect type of one image; iterates like a list of (defect, region mask).
    `splits` keeps each type's RegionSplit (dropped counts, stride, eps used)."""

    regions: list[tuple[str, np.ndarray]] = field(default_factory=list)
    splits: dict[str, RegionSplit] = field(default_factory=dict)

    def __iter__(self) -> Iterator[tuple[str, np.ndarray]]:
        return iter(self.regions)

    def __len__(self) -> int:
        return len(self.regions)

    def __getitem__(self, index: int) -> tuple[str, np.ndarray]:
        return self.regions[index]

    @property
    def dropped(self) -> dict[str, int]:
        return {defect: split.dropped for defect, split in self.splits.items()}

    @property
    def total_dropped(self) -> int:
        return sum(split.dropped for split in self.splits.values())


def as_bool_mask(mask) -> np.ndarray:
    """numpy array or torch tensor, any dtype -> H x W bool numpy array (non-zero = foreground)."""
    if hasattr(mask, "detach"):
        mask = mask.detach().cpu().numpy()
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"Expected an H x W mask, got shape {mask.shape}")
    return mask.astype(bool, copy=False)


def _smallest_stride(coords: np.ndarray, max_points: int) -> int:
    """Smallest cell size s such that at most `max_points` s x s cells hold foreground."""
    stride = max(1, math.isqrt(len(coords) // max_points))  # exact for a solid blob
    while len(np.unique(_cell_ids(coords, stride))) > max_points:
        stride += 1
    return stride


def _cell_ids(coords: np.ndarray, stride: int) -> np.ndarray:
    cells = coords // stride
    return cells[:, 0].astype(np.int64) * (1 << 32) + cells[:, 1]


def _grid_subsample(coords: np.ndarray, max_points: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, int]:
    """Keep one randomly chosen foreground pixel per s x s cell, with s the smallest stride that keeps
    at most `max_points` pixels.

    Returns (indices of the kept pixels into coords, for every pixel the position of its cell's kept
    pixel in that list, stride). At stride 1 every pixel is kept and stands for itself.

    One pixel per cell rather than a plain random sample: a plain sample leaves holes in thin
    scratches, and a scratch with holes wider than eps breaks into several regions. With one pixel per
    cell every occupied cell is represented, so pixels that touch in the mask stay within
    (2s - 1) * sqrt(2) of each other in the sample (see `_effective_eps`).
    """
    if len(coords) <= max_points:
        return np.arange(len(coords)), np.arange(len(coords)), 1
    stride = _smallest_stride(coords, max_points)
    order = rng.permutation(len(coords))
    # np.unique returns the first occurrence of each cell in the shuffled order: a random pixel per cell.
    _, first, inverse = np.unique(_cell_ids(coords[order], stride), return_index=True, return_inverse=True)
    stand_in = np.empty(len(coords), dtype=np.int64)
    stand_in[order] = inverse
    return order[first], stand_in, stride


def _effective_eps(eps: float, stride: int) -> float:
    """At stride s, kept pixels of two touching cells can be (2s - 1) * sqrt(2) apart; eps must reach
    that or a thin defect would fall apart. Costs: gaps below that distance are bridged too."""
    return eps if stride == 1 else max(eps, (2 * stride - 1) * math.sqrt(2.0))


def _effective_min_samples(min_samples: int, stride: int) -> int:
    """A kept pixel stands for up to stride**2 pixels of a solid area, so min_samples pixels are about
    min_samples / stride**2 kept pixels; at least 2, so a lone cell is still a speck (noise).

    (DBSCAN's sample_weight would count the cells' pixels exactly, but scikit-learn sums weights in a
    Python loop, doubling the cost per point.)"""
    return min_samples if stride == 1 else max(2, math.ceil(min_samples / stride**2))


def _cluster(points: np.ndarray, eps: float, min_samples: int) -> np.ndarray:
    """DBSCAN labels of the kept pixels, -1 = noise.

    Pixel coordinates are finite and the parameters were checked in `split_regions`, so
    scikit-learn's own checks are skipped: on masks of a few hundred points they cost as much as
    the clustering itself."""
    with sklearn.config_context(assume_finite=True, skip_parameter_validation=True):
        return DBSCAN(eps=eps, min_samples=min_samples).fit(points).labels_


def _assign_to_nearest_cluster(
    coords: np.ndarray, points: np.ndarray, labels: np.ndarray, stand_in: np.ndarray
) -> np.ndarray:
    """Cluster label for every foreground pixel.

    A pixel whose cell's kept pixel (its stand-in) is clustered takes that cluster. The stand-in is
    within (s - 1) * sqrt(2) of the pixel, and a clustered point of another cluster nearer than that
    would be within eps of the stand-in, where DBSCAN would have joined the two (ties between border
    points aside), so this is the nearest cluster, found by a lookup instead of a KD-tree query per
    pixel. Pixels whose stand-in is noise (at stride 1: the noise pixels themselves) take the cluster
    of their nearest clustered point, found with a KD-tree.
    """
    clustered = labels >= 0
    if not clustered.any():
        return np.zeros(len(coords), dtype=np.int64)  # no cluster at all: all foreground is one region
    pixel_labels = labels[stand_in]
    orphans = pixel_labels < 0
    if orphans.any():
        _, nearest = cKDTree(points[clustered]).query(coords[orphans], k=1)
        pixel_labels[orphans] = labels[clustered][nearest]
    return pixel_labels


def _regions_in_raster_order(shape: tuple[int, int], coords: np.ndarray, pixel_labels: np.ndarray) -> list[np.ndarray]:
    """One bool mask per label, ordered by each label's first pixel in raster order.
    `coords` come from np.argwhere, which is already raster-ordered."""
    _, first_index = np.unique(pixel_labels, return_index=True)
    regions = []
    for label in pixel_labels[np.sort(first_index)]:
        members = coords[pixel_labels == label]
        region = np.zeros(shape, dtype=bool)
        region[members[:, 0], members[:, 1]] = True
        regions.append(region)
    return regions


def split_regions(
    mask,
    eps: float = DEFAULT_EPS,
    min_samples: int = DEFAULT_MIN_SAMPLES,
    min_area: int = DEFAULT_MIN_AREA,
    max_points: int = DEFAULT_MAX_POINTS,
    seed: int = 0,
) -> RegionSplit:
    """Split one H x W mask (bool, 0/1, 0/255; numpy or torch) into DBSCAN regions.

    `eps` (pixels) and `min_samples` are DBSCAN's; `min_area` drops regions with fewer pixels;
    `max_points` bounds how many pixels are clustered; `seed` drives that subsample.
    """
    if eps <= 0 or min_samples < 1 or max_points < 1 or min_area < 0:
        raise ValueError(
            f"Need eps > 0, min_samples >= 1, max_points >= 1, min_area >= 0; got eps={eps}, "
            f"min_samples={min_samples}, max_points={max_points}, min_area={min_area}."
        )
    mask = as_bool_mask(mask)
    coords = np.argwhere(mask)
    if len(coords) == 0:
        return RegionSplit([], eps_used=float(eps))

    kept, stand_in, stride = _grid_subsample(coords, max_points, np.random.default_rng(seed))
    eps_used = _effective_eps(float(eps), stride)
    points = coords[kept]
    labels = _cluster(points, eps_used, _effective_min_samples(min_samples, stride))
    pixel_labels = _assign_to_nearest_cluster(coords, points, labels, stand_in)

    regions, dropped, dropped_pixels = [], 0, 0
    for region in _regions_in_raster_order(mask.shape, coords, pixel_labels):
        area = int(region.sum())
        if area < min_area:
            dropped, dropped_pixels = dropped + 1, dropped_pixels + area
        else:
            regions.append(region)
    return RegionSplit(regions, dropped, dropped_pixels, stride, eps_used)


def split_sample_regions(masks_by_type: dict[str, object], **split_kwargs) -> SampleRegions:
    """Split each defect type's mask on its own: a region never mixes two types.

    Returns the (defect type, region mask) pairs, types in the dict's order, with each type's
    RegionSplit. `split_kwargs` go to `split_regions`.
    """
    result = SampleRegions()
    for defect, mask in masks_by_type.items():
        split = split_regions(mask, **split_kwargs)
        result.regions.extend((defect, region) for region in split.regions)
        result.splits[defect] = split
    return result


def bounding_box(region: np.ndarray) -> list[int]:
    """[x0, y0, x1, y1] of a region's pixels, x1 / y1 exclusive (pixel edges, like array slicing)."""
    rows = np.flatnonzero(region.any(axis=1))
    cols = np.flatnonzero(region.any(axis=0))
    if len(rows) == 0:
        raise ValueError("An empty region has no bounding box.")
    return [int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1]


# ------------------------------------------------------------------------------------------- normal regions

# Normal regions keep this many pixels between themselves and every defect pixel, so a "no defect"
# region never holds a defect's blurred edge or an annotator's tight outline; measured in image pixels.
NORMAL_CLEARANCE_PX = 6
NORMAL_PLACEMENT_TRIES = 30


def crop_to_box(region: np.ndarray) -> np.ndarray:
    """A region mask cut to its bounding box: a shape that can be placed anywhere."""
    x0, y0, x1, y1 = bounding_box(region)
    return np.asarray(region[y0:y1, x0:x1], bool)


def disk_shape(radius: int) -> np.ndarray:
    """A filled disk of `radius` px, the shape the app describes when a click lands away from every region."""
    yy, xx = np.ogrid[-radius : radius + 1, -radius : radius + 1]
    return xx**2 + yy**2 <= radius**2


def clear_area(defects: np.ndarray, clearance: int = NORMAL_CLEARANCE_PX) -> np.ndarray:
    """H x W bool: pixels farther than `clearance` px from every defect pixel (all True without defects)."""
    from scipy import ndimage

    defects = np.asarray(defects, bool)
    if not defects.any():
        return np.ones(defects.shape, bool)
    return ndimage.distance_transform_edt(~defects) > clearance


def place_normal_region(defects: np.ndarray, shape: np.ndarray, rng: np.random.Generator,
                        clearance: int = NORMAL_CLEARANCE_PX, tries: int = NORMAL_PLACEMENT_TRIES) -> np.ndarray | None:
    """A region of `shape` (a bool mask cut to its box) placed where the image has no defect, or None.

    `defects` (H x W bool) is the union of every defect mask of the image (all False for a good image).
    The shape lands at a uniformly random place where all its pixels are farther than `clearance` px
    from every defect pixel; None when `tries` random places all fail (or the shape does not fit).
    """
    allowed = clear_area(defects, clearance)
    height, width = allowed.shape
    shape = np.asarray(shape, bool)
    box_h, box_w = shape.shape
    if box_h > height or box_w > width or not shape.any():
        return None
    for _ in range(tries):
        y, x = int(rng.integers(0, height - box_h + 1)), int(rng.integers(0, width - box_w + 1))
        if allowed[y : y + box_h, x : x + box_w][shape].all():
            region = np.zeros((height, width), bool)
            region[y : y + box_h, x : x + box_w] = shape
            return region
    return None


def sample_normal_regions(defects: np.ndarray, shapes: list[np.ndarray], count: int, rng: np.random.Generator,
                          clearance: int = NORMAL_CLEARANCE_PX) -> list[np.ndarray]:
    """Up to `count` normal regions of one image, each with a shape drawn at random from `shapes`.

    Shapes come from real defect regions of the same object (and disks like the app's click), so a
    normal region differs from a defect by what lies under it, not by its outline.
    """
    regions = []
    for _ in range(count * 3):  # a large shape may not fit; draw another
        if len(regions) == count or not shapes:
            break
        region = place_normal_region(defects, shapes[int(rng.integers(len(shapes)))], rng, clearance)
        if region is not None:
            regions.append(region)
    return regions
