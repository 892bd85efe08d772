"""Self-similarity: how unlike the rest of its own image each patch is, with no training and no reference.

A product no model was trained on still has a surface that repeats itself: grain, weave, machining marks,
the same tile texture from corner to corner. A patch that matches nothing elsewhere in its own image is
therefore suspect. Each patch (the frozen tower's PatchCore features) is compared with every patch of the
same image except those around its own place (the few-shot single-reference hold-out,
`few_shot.Holdout`), and its distance to the nearest one is its score.

Parts are often mirror-symmetric: a tile's left edge looks like its right edge mirrored, not like anything
else in the image. So the patches of the image's left-right and top-bottom mirror images are candidates
too, again except those that show the patch's own neighbourhood (else a symmetric defect would match its
own reflection).

It needs nothing but the image, so it carries over to any object; it cannot see a defect that covers most
of the image or repeats across it, and it flags what is unique by design (a label, a single hole).
So it is used beside another map, not alone: a trained reference-free model's (CLIP-ADA's `self_similarity`
blend; measured on both development objects in benchmarks/results/clip_ada_transfer.md) and a few-shot
bank's (scoring/blend.py; benchmarks/results/few_shot.md).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..towers import VisionTower
from .few_shot import as_uint8_rgb, block_distances, embed_patches, neighbourhood, patch_grid, patch_map
from .patchcore import PatchCore

# The model input side. Self-similarity alone (without mirrors), full test sets: 224 / 320 / 448 px gave
# magnetic tile image AUROC 67.0 / 70.4 / 69.4 and steel strip pixel AUROC 72.8 / 73.9 / 75.0
# (clip_ada_transfer.md, session 17): 320 and 448 tie on the mean of the two, and 448 costs twice as much
# (every patch meets every other, so the cost grows with the square of the patch count). Averaging sizes
# did not help. With the two mirror images at 320 px: 76.4 and 75.0.
DEFAULT_IMAGE_SIZE = 320


class SelfSimilarity:
    """Training-free anomaly maps from one frozen vision tower (shared, never copied)."""

    def __init__(self, tower: str | VisionTower, image_size: int = DEFAULT_IMAGE_SIZE, mirrors: bool = True,
                 device: str | torch.device = "cpu"):
        # A PatchCore that is never fitted: only its features, patch grid and map smoothing are used.
        self.scorer = PatchCore(tower, image_size=image_size, coreset_ratio=1.0, device=device,
                                photometric="none", inference="exact")
        self.mirrors = mirrors
        self._excluded: dict[tuple[int, int], list[torch.Tensor]] = {}

    @property
    def image_size(self) -> int:
        return int(self.scorer.preprocess.size[0])

    @torch.no_grad()
    def map(self, image: Any) -> np.ndarray:
        """H x W float32 at the image's own size: each pixel's patch distance to its nearest look-alike
        elsewhere in the same image or its mirror images (larger = more unlike its own surface)."""
        pixels = as_uint8_rgb(image)
        views = [pixels, *((np.ascontiguousarray(pixels[:, ::-1]), np.ascontiguousarray(pixels[::-1])) if self.mirrors else ())]
        blocks = embed_patches(self.scorer, views)
        excluded = self.excluded(patch_grid(self.scorer, blocks[0].shape[0]))
        nearest = torch.stack([block_distances(blocks[0], [block], mask)[:, 0] for block, mask in zip(blocks, excluded)])
        return patch_map(self.scorer, nearest.amin(0), pixels.shape[:2]).astype(np.float32)

    def excluded(self, grid: tuple[int, int]) -> list[torch.Tensor]:
        """Per view, P x P: True where view patch j shows the query patch i's own neighbourhood."""
        if grid not in self._excluded:
            own = neighbourhood(grid)
            height, width = grid
            rows, cols = torch.arange(height * width) // width, torch.arange(height * width) % width
            # patch j of the left-right mirror shows the original's (row j, width - 1 - col j), and so on
            left_right = rows * width + (width - 1 - cols)
            top_bottom = (height - 1 - rows) * width + cols
            self._excluded[grid] = [own, own[:, left_right], own[:, top_bottom]][: 3 if self.mirrors else 1]
        return self._excluded[grid]
