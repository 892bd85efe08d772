"""Batched Poisson image blending in torch, so NSA-style synthesis can run on a GPU.

For each image, the blended values f inside the region Ω solve Pérez et al.'s discrete Poisson equation
with the source's gradients as the guidance field (OpenCV's NORMAL_CLONE) and the target's pixels as
boundary values:

    for p in Ω:  4 f_p - sum_{q in N(p) ∩ Ω} f_q = sum_{q in N(p), q ∉ Ω} t_q + (4 s_p - sum_{q in N(p)} s_q)

The left side is a masked 5-point Laplacian, which is symmetric positive definite on Ω, so conjugate
gradients solves every (image, channel) system of the batch at once with a fixed iteration count (no
data-dependent stopping), on the bounding window of the batch's regions. Masks may have any shape.

Differences from cv2.seamlessClone: OpenCV erodes the mask by a few pixels and takes the target's
gradients in that band, so near the region's edge results differ by a few grey levels; inside they agree
(see tests/test_synth.py for the measured tolerance).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# Conjugate gradients on the 5-point Laplacian needs about 2 iterations per pixel of region width: on
# random-noise images (a hard case) a 100-px square is within 0.02 grey levels of a direct sparse solve
# after 200 iterations and 0.0005 after 300, so 300 covers the 100-px patches NSA draws on 256-px images.
DEFAULT_ITERATIONS = 300


def _neighbour_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of the four edge neighbours of every pixel, zero outside the image. x: (..., H, W)."""
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1))
    return padded[..., :-2, 1:-1] + padded[..., 2:, 1:-1] + padded[..., 1:-1, :-2] + padded[..., 1:-1, 2:]


def _masked_laplacian(x: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """The system matrix applied to x: (4 x_p - sum of neighbours inside Ω) for p in Ω, 0 elsewhere."""
    return region * (4.0 * x - _neighbour_sum(region * x))


def _interior_region(mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, 1, H, W) float region: the mask without the image's outer ring, which has no neighbours
    on one side and therefore stays a fixed boundary value."""
    region = mask.reshape(mask.shape[0], 1, height, width).to(torch.float32).clone()
    region[..., 0, :] = 0
    region[..., -1, :] = 0
    region[..., :, 0] = 0
    region[..., :, -1] = 0
    return region


def _batched_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(dim=(-2, -1), keepdim=True)


def _conjugate_gradients(
    apply_matrix: Callable[[torch.Tensor], torch.Tensor], rhs: torch.Tensor, start: torch.Tensor, iterations: int
) -> torch.Tensor:
    """Solve A x = rhs for every (image, channel) system at once; A must be symmetric positive definite."""
    x = start
    residual = rhs - apply_matrix(x)
    direction = residual
    residual_norm = _batched_dot(residual, residual)
    tiny = torch.finfo(rhs.dtype).tiny
    for _ in range(iterations):
        product = apply_matrix(direction)
        curvature = _batched_dot(direction, product)
        # Converged systems (and empty regions) have zero curvature: step 0 instead of dividing by 0.
        step = torch.where(curvature > tiny, residual_norm / curvature.clamp_min(tiny), 0.0)
        x = x + step * direction
        residual = residual - step * product
        new_norm = _batched_dot(residual, residual)
        momentum = torch.where(residual_norm > tiny, new_norm / residual_norm.clamp_min(tiny), 0.0)
        direction = residual + momentum * direction
        residual_norm = new_norm
    return x


@torch.no_grad()  # synthesis needs no gradients, and a graph through hundreds of CG steps is large
def poisson_blend(
    target: torch.Tensor,
    source: torch.Tensor,
    mask: torch.Tensor,
    *,
    iterations: int = DEFAULT_ITERATIONS,
) -> torch.Tensor:
    """Blend `source` into `target` inside `mask` with Poisson image editing (NORMAL_CLONE), batched.

    target, source: (B, C, H, W), same shape, on the same device; uint8 (0-255) or floating point.
        `source` holds the patch already placed where it goes (values outside the mask are ignored).
    mask: (B, H, W) or (B, 1, H, W) bool/0-1: the region to blend. Pixels on the image's outer ring are
        never changed (they have no neighbour on one side and act as boundary values).
    iterations: conjugate-gradient steps (a fixed count: the only host synchronisation is one lookup
        of the region's bounding box, used to solve on that window instead of the whole image).

    Returns a tensor shaped and typed like `target` (uint8 in, rounded and clamped uint8 out; floats are
    not clamped; float16 and bfloat16 are solved in float32) whose pixels outside the mask equal
    `target` exactly.
    """
    if target.shape != source.shape or target.ndim != 4:
        raise ValueError(
            f"target and source must both be (B, C, H, W); got {tuple(target.shape)} and {tuple(source.shape)}"
        )
    batch, _, height, width = target.shape
    if mask.shape not in ((batch, height, width), (batch, 1, height, width)):
        raise ValueError(
            f"mask must be (B, H, W) or (B, 1, H, W) matching {tuple(target.shape)}; got {tuple(mask.shape)}"
        )
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0; got {iterations}")

    # Half precision cannot hold the residuals CG needs, so low-precision inputs are solved in float32.
    compute_dtype = torch.float64 if target.dtype == torch.float64 else torch.float32
    region = _interior_region(mask, height, width).to(target.device, compute_dtype)
    window = _region_window(region)
    if window is None:
        return target.clone()
    rows, cols = window
    dst = target[..., rows, cols].to(compute_dtype)
    src = source[..., rows, cols].to(compute_dtype)
    solved = _solve_window(dst, src, region[..., rows, cols], iterations)
    blended = target.clone()
    if target.is_floating_point():
        blended[..., rows, cols] = solved.to(target.dtype)
    else:
        blended[..., rows, cols] = solved.round().clamp(0, 255).to(target.dtype)
    return blended


def _region_window(region: torch.Tensor) -> tuple[slice, slice] | None:
    """Rows and columns of the batch's combined region plus a 1-pixel frame, or None if it is empty.

    Solving only there skips the untouched rest of the image (NSA patches cover a small part of it);
    finding the window costs one host synchronisation per call."""
    covered = region.amax(dim=(0, 1)) > 0
    row_hits = torch.nonzero(covered.any(dim=1)).flatten().tolist()
    col_hits = torch.nonzero(covered.any(dim=0)).flatten().tolist()
    if not row_hits:
        return None
    # The region never touches the image's outer ring, so the frame stays inside the image.
    return slice(row_hits[0] - 1, row_hits[-1] + 2), slice(col_hits[0] - 1, col_hits[-1] + 2)


def _solve_window(dst: torch.Tensor, src: torch.Tensor, region: torch.Tensor, iterations: int) -> torch.Tensor:
    """Blended values for a window whose 1-pixel frame lies outside the region (so it is boundary)."""
    guidance = 4.0 * src - _neighbour_sum(src)  # sum of source gradients leaving each pixel
    known_boundary = _neighbour_sum((1.0 - region) * dst)  # target values next to the region
    rhs = region * (guidance + known_boundary)
    solution = _conjugate_gradients(
        lambda x: _masked_laplacian(x, region), rhs, start=region * src, iterations=iterations
    )
    return torch.where(region.bool(), solution, dst)
