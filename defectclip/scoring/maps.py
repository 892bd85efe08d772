"""Anomaly maps: patch scores -> model-input size -> Gaussian smoothing -> each image's own size."""

from __future__ import annotations

import functools
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_SIGMA = 4.0


def gaussian_kernel(sigma: float) -> torch.Tensor:
    """1-D Gaussian truncated at 4 sigma, summing to 1."""
    radius = int(4.0 * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return kernel / kernel.sum()


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian smoothing of N x H x W maps with mirrored borders."""
    if sigma <= 0:
        return maps
    kernel = gaussian_kernel(sigma).to(maps.device, maps.dtype)
    radius = kernel.numel() // 2
    x = maps[:, None]
    # Reflection needs the map to be wider than the kernel's radius; tiny maps repeat their edge.
    mode = "reflect" if min(maps.shape[-2:]) > radius else "replicate"
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode=mode), kernel.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode=mode), kernel.view(1, 1, -1, 1))
    return x[:, 0]


def interpolation_matrix(out_length: int, in_length: int, offset: float) -> torch.Tensor:
    """out x in linear interpolation weights placing input sample k at output position s k + offset
    (s = out / in), holding the end values beyond the first and last samples."""
    stride = out_length / in_length
    position = ((torch.arange(out_length, dtype=torch.float64) - offset) / stride).clamp(0, in_length - 1)
    lower = position.floor().long().clamp(max=max(in_length - 2, 0))
    upper_weight = (position - lower).float()
    matrix = torch.zeros(out_length, in_length)
    rows = torch.arange(out_length)
    matrix[rows, lower] = 1.0 - upper_weight
    if in_length > 1:
        matrix[rows, lower + 1] += upper_weight
    return matrix


@functools.lru_cache(maxsize=16)
def map_operators(
    height: int, width: int, h: int, w: int, offset_y: float, offset_x: float, sigma: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """H x h and W x w matrices A, B with gaussian_blur(R S C^T) = A S B^T for every h x w patch map S.

    Interpolation (R, C: see interpolation_matrix) and the separable blur are both linear, so the
    blur folds into the two matrices once per model size (A = G_y R, B = G_x C): a map then costs
    two small matrix products instead of two padded convolutions over H x W pixels (measured 2 ms of
    a 23 ms predict on one CPU thread at 224 px).
    """
    rows = interpolation_matrix(height, h, offset_y)
    cols = interpolation_matrix(width, w, offset_x)
    if sigma <= 0:
        return rows, cols
    kernel = gaussian_kernel(sigma)
    radius = kernel.numel() // 2
    mode = "reflect" if min(height, width) > radius else "replicate"  # as gaussian_blur decides for the map
    return _blur_columns(rows, kernel, mode), _blur_columns(cols, kernel, mode)


def _blur_columns(matrix: torch.Tensor, kernel: torch.Tensor, mode: str) -> torch.Tensor:
    """Each column of an L x n matrix smoothed along L, padded the way gaussian_blur pads a map."""
    radius = kernel.numel() // 2
    columns = F.pad(matrix.T[:, None, :], (radius, radius), mode=mode)
    return F.conv1d(columns, kernel.view(1, 1, -1))[:, 0].T.contiguous()


def patch_scores_to_maps(
    patch_scores: torch.Tensor,
    model_size: Sequence[int],
    image_sizes: Sequence[Sequence[int]],
    sigma: float,
    centre_offset: tuple[float, float] | None = None,
) -> list[np.ndarray]:
    """N x h x w patch scores -> one H x W float32 map per image, at that image's own size.

    Each patch score is placed at its feature's centre (`centre_offset`, see PatchFeatures; None =
    the plain resize convention) and interpolated linearly in between. Smoothing happens at the
    model-input size, where sigma = 4 px is the papers' setting: the result then does not depend
    on the camera's resolution, and every image costs the same.
    """
    (height, width), (h, w) = model_size, patch_scores.shape[-2:]
    if centre_offset is None:
        centre_offset = ((height / h - 1) / 2, (width / w - 1) / 2)
    rows, cols = map_operators(int(height), int(width), h, w, float(centre_offset[0]), float(centre_offset[1]), float(sigma))
    maps = rows.to(patch_scores) @ patch_scores @ cols.to(patch_scores).T
    out = []
    for smoothed, size in zip(maps, image_sizes):
        if tuple(size) != tuple(model_size):
            smoothed = F.interpolate(smoothed[None, None], size=tuple(size), mode="bilinear", align_corners=False)[0, 0]
        out.append(smoothed.float().cpu().numpy())
    return out
