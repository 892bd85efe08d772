"""Natural Synthetic Anomalies (NSA): patches from another normal image, Poisson-blended in.

TAB (§3.1) builds its abnormal training images this way: crop a patch from a normal image of the same
category, resize it randomly, blend it into the input with Poisson image editing (Pérez et al. 2003) so
it has no hard seam, and repeat a few times. Blending keeps the patch's gradients but adopts the
target's colour at the border, which makes the defects look natural rather than pasted.
"""

from __future__ import annotations

import cv2
import numpy as np

from defectclip.synth._images import RngLike
from defectclip.synth.cutpaste import PatchBox, PatchSampling, synthesize_with_patches


def poisson_paste(image: np.ndarray, patch: np.ndarray, box: PatchBox) -> np.ndarray:
    """New content of `box` after blending `patch` (box-sized, uint8 RGB) into `image` (NORMAL_CLONE).

    OpenCV solves the Poisson equation on the patch's rectangle with the target's pixels as boundary
    values, so the outer ring of the box (2 px in practice) keeps the target's values.
    """
    # seamlessClone puts the centre of the mask's bounding box at `center`; with a full mask that
    # centre is (width // 2, height // 2) inside the patch, which lines the patch up with the box.
    center = (box.left + box.width // 2, box.top + box.height // 2)
    # A fresh mask every call: OpenCV 5.0 writes into the mask array it is given (it zeroes the border
    # and erodes it in place), so reusing one makes every second call blend almost nothing.
    mask = np.full(patch.shape[:2], 255, dtype=np.uint8)
    blended = cv2.seamlessClone(patch, image, mask, center, cv2.NORMAL_CLONE)
    return blended[box.slices]


def nsa(image: np.ndarray, source: np.ndarray, rng: RngLike = None, **options) -> tuple[np.ndarray, np.ndarray]:
    """Blend 1-3 random patches cut from `source` into `image` with Poisson image editing.

    image, source: uint8 (H, W, 3) RGB or gray (H, W) / (H, W, 1), each side >= 16 px; sizes may
    differ; `source` should be another normal image of the same category. A gray image (all channels
    equal) receives gray patches. rng: Generator, seed or None. Options (keywords) are the
    fields of `PatchSampling` (patch side 5-40% of the image by default; set `min_target_std`, e.g. 5.0, to keep
    patches off plain background).

    Returns (anomalous image with the same shape and dtype as `image`, H x W bool mask of exactly the
    pixels whose value changed).
    """
    return synthesize_with_patches(image, source, rng, PatchSampling(**options), poisson_paste)
