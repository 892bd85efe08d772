"""DRAEM-style anomalies: a thresholded Perlin-noise map filled with a foreign texture.

DRAEM (Zavrtanik et al. 2021) draws Perlin noise at a random scale, rotates it, keeps the pixels above
0.5 as the anomaly region and blends a texture image in there:
    out = image * (1 - M) + (1 - beta) * texture * M + beta * image * M
The noise gives blob- and streak-shaped regions that rectangles cannot, which complements NSA.
"""

from __future__ import annotations

import math

import numpy as np

from defectclip.synth import _images as images  # the image helpers every synthesis shares

# If every noise draw stays under the threshold (likely on tiny images or with a high threshold), the
# top this-fraction of the last draw becomes the region, so a call always yields an anomaly.
FALLBACK_REGION_FRACTION = 0.02


def _fade(t: np.ndarray) -> np.ndarray:
    """Perlin's quintic 6t^5 - 15t^4 + 10t^3: zero first and second derivative at cell edges, no creases."""
    return t * t * t * (t * (t * 6.0 - 15.0) + 10.0)


def _gradient_noise(u: np.ndarray, v: np.ndarray, gradients: np.ndarray) -> np.ndarray:
    """Perlin noise at lattice coordinates (u, v) >= 0, given unit gradients of shape (U, V, 2).

    Each point takes the dot products of its four surrounding corner gradients with the offsets to
    those corners and interpolates them with the fade curve; all points are handled at once.
    """
    row, col = np.floor(u).astype(np.intp), np.floor(v).astype(np.intp)
    du, dv = (u - row).astype(np.float32), (v - col).astype(np.float32)
    # Flat indices into separate component arrays: much faster than 2-D fancy indexing of (U, V, 2).
    lattice_width = gradients.shape[1]
    flat = row * lattice_width + col
    grad_u = np.ascontiguousarray(gradients[..., 0], dtype=np.float32).ravel()
    grad_v = np.ascontiguousarray(gradients[..., 1], dtype=np.float32).ravel()

    def corner(dr: int, dc: int) -> np.ndarray:
        index = flat + (dr * lattice_width + dc)
        return grad_u[index] * (du - dr) + grad_v[index] * (dv - dc)

    n00, n10, n01, n11 = corner(0, 0), corner(1, 0), corner(0, 1), corner(1, 1)
    fu, fv = _fade(du), _fade(dv)
    near = n00 + fu * (n10 - n00)
    far = n01 + fu * (n11 - n01)
    return near + fv * (far - near)


def perlin_noise(
    shape: tuple[int, int],
    resolution: tuple[float, float],
    rng: images.RngLike = None,
    *,
    angle: float = 0.0,
) -> np.ndarray:
    """2-D Perlin noise of `shape` with `resolution` = (cells along the height, cells along the width).

    `angle` (radians) rotates the lattice, so anisotropic resolutions give slanted streaks. Any shape
    works (the lattice need not divide it). Values lie in about [-1, 1]. Returns float32.
    """
    height, width = shape
    res_y, res_x = (float(r) for r in resolution)
    if height < 1 or width < 1 or res_y <= 0 or res_x <= 0:
        raise ValueError(f"shape and resolution must be positive; got {shape!r}, {resolution!r}")
    generator = images.make_rng(rng)
    # Pixel centres in unit coordinates centred on the image, so the rotation pivots on the centre.
    y, x = np.meshgrid(
        (np.arange(height) + 0.5) / height - 0.5, (np.arange(width) + 0.5) / width - 0.5, indexing="ij"
    )
    cos, sin = math.cos(angle), math.sin(angle)
    u = (cos * y - sin * x) * res_y
    v = (sin * y + cos * x) * res_x
    u -= u.min()
    v -= v.min()
    lattice = (int(u.max()) + 2, int(v.max()) + 2)
    directions = generator.uniform(0.0, 2.0 * math.pi, size=lattice)
    gradients = np.stack([np.cos(directions), np.sin(directions)], axis=-1)
    # Raw 2-D gradient noise spans [-sqrt(1/2), sqrt(1/2)]; scaling by sqrt(2) gives about [-1, 1], the
    # range DRAEM's 0.5 threshold was chosen for.
    return np.float32(math.sqrt(2.0)) * _gradient_noise(u, v, gradients)


def fractal_noise(
    shape: tuple[int, int],
    resolution: tuple[float, float],
    rng: images.RngLike = None,
    *,
    octaves: int = 1,
    persistence: float = 0.5,
    angle: float = 0.0,
) -> np.ndarray:
    """Sum of `octaves` Perlin layers, each at twice the resolution and `persistence` times the amplitude.

    One octave is plain Perlin noise (DRAEM's choice); more add fine detail to the region outlines.
    """
    octaves = images.check_positive_int("octaves", octaves)
    generator = images.make_rng(rng)
    total = np.zeros(shape, dtype=np.float32)
    for octave in range(octaves):
        scale = 2.0**octave
        layer = perlin_noise(shape, (resolution[0] * scale, resolution[1] * scale), generator, angle=angle)
        total += persistence**octave * layer
    return total


def _random_noise_map(
    shape: tuple[int, int],
    rng: np.random.Generator,
    scale_exponents: tuple[int, int],
    octaves: int,
    rotate: bool,
) -> np.ndarray:
    """Noise at resolution (2^a, 2^b), a and b drawn independently as in DRAEM, at a random angle."""
    low, high = scale_exponents
    resolution = (2.0 ** rng.integers(low, high + 1), 2.0 ** rng.integers(low, high + 1))
    # DRAEM rotates by -90..90 degrees; rotating the lattice gives the same variety without resampling.
    angle = rng.uniform(-math.pi / 2, math.pi / 2) if rotate else 0.0
    return fractal_noise(shape, resolution, rng, octaves=octaves, angle=angle)


def blend_texture(image: np.ndarray, texture: np.ndarray, region: np.ndarray, beta: float) -> np.ndarray:
    """DRAEM's blend: inside `region`, beta * image + (1 - beta) * texture; outside it, the image as is."""
    mixed = beta * image.astype(np.float32) + (1.0 - beta) * texture.astype(np.float32)
    output = image.copy()
    output[region] = np.clip(np.rint(mixed[region]), 0, 255).astype(np.uint8)
    return output


def perlin(
    image: np.ndarray,
    texture: np.ndarray,
    rng: images.RngLike = None,
    *,
    scale_exponents: tuple[int, int] = (0, 5),
    threshold: float = 0.5,
    beta_range: tuple[float, float] = (0.1, 1.0),
    octaves: int = 1,
    rotate: bool = True,
    max_tries: int = 10,
) -> tuple[np.ndarray, np.ndarray]:
    """Blend `texture` into `image` inside a thresholded Perlin-noise region (DRAEM-style).

    image: uint8 (H, W, 3) RGB or gray (H, W) / (H, W, 1), each side >= 16 px. texture: any uint8 RGB or
    gray image, resized to the image (gray targets get a gray texture). rng: Generator, seed or None.
    scale_exponents: inclusive range of k for noise resolution 2^k per axis. threshold: noise level
        above which a pixel joins the region (noise spans about [-1, 1]).
    beta_range: [low, high) of beta, the weight the original image keeps inside the region (DRAEM
        draws beta in [0, 0.8)); values near 1 give faint anomalies.
    octaves: Perlin octaves (1 = DRAEM). rotate: rotate the noise by a random angle in [-90, 90) degrees.
    max_tries: noise draws before falling back to the top 2% of the last draw if all were empty.

    Returns (anomalous image with the same shape and dtype as `image`, H x W bool mask of exactly the
    pixels whose value changed).
    """
    target = images.to_rgb(image, "image")
    filler = images.match_color_mode(images.to_rgb(texture, "texture", min_side=1), target)
    low_beta, high_beta = images.check_range("beta_range", beta_range, 0.0, 1.0)
    exponents = images.check_int_range("scale_exponents", scale_exponents, lower=0)
    tries = images.check_positive_int("max_tries", max_tries)
    octaves = images.check_positive_int("octaves", octaves)
    if not math.isfinite(threshold):
        raise ValueError(f"threshold must be a finite number; got {threshold!r}")
    generator = images.make_rng(rng)
    height, width = target.shape[:2]
    filler = images.resize_rgb(filler, height, width)

    for _ in range(tries):
        noise = _random_noise_map((height, width), generator, exponents, octaves, rotate)
        beta = generator.uniform(low_beta, high_beta)
        region = noise > threshold
        if not region.any():
            continue
        output = blend_texture(target, filler, region, beta)
        mask = images.changed_pixels(target, output)
        if mask.any():
            return images.like_input(output, image), mask
    region = noise >= np.quantile(noise, 1.0 - FALLBACK_REGION_FRACTION)
    output = blend_texture(target, filler, region, generator.uniform(low_beta, high_beta))
    return images.like_input(output, image), images.changed_pixels(target, output)
