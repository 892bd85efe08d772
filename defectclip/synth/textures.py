"""Generic defect-free textures for pretraining: surfaces no development data set covers.

A trunk pretrained on one or two real objects learns their texture; generated surfaces of other
kinds (grain, brushed stripes, weaves) give the text-aligned loss normal images whose only
regularity is the texture itself, so what it can learn there is "a local break of the regularity".
Each texture is a pure function of (kind, size, seed): the same call gives the same uint8 H x W x 3
gray image, in any process, so datasets need store only the seed.
"""

from __future__ import annotations

import math

import numpy as np

from defectclip.synth import _images as images
from defectclip.synth.perlin import fractal_noise

# kind -> the object name its prompts use ("a photo of a flawless <name>"): readable English.
TEXTURE_OBJECTS = {
    "grain": "grainy metal surface",
    "stripes": "brushed metal surface",
    "weave": "woven fabric",
}
TEXTURE_KINDS = tuple(TEXTURE_OBJECTS)


def _to_uint8_gray(values: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Scale to a random mean grey and contrast (as products differ in brightness), as H x W x 3 uint8."""
    values = (values - values.mean()) / (values.std() + 1e-6)
    mean, contrast = rng.uniform(70, 190), rng.uniform(12, 40)
    gray = np.clip(np.rint(mean + contrast * values), 0, 255).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=2)


def _grain(size: int, rng: np.random.Generator) -> np.ndarray:
    """Multi-octave Perlin noise plus fine pixel noise: sand-blasted or cast metal."""
    cells = float(2 ** rng.integers(2, 5))
    noise = fractal_noise((size, size), (cells, cells), rng, octaves=4, persistence=0.6)
    return noise + rng.uniform(0.05, 0.3) * rng.standard_normal((size, size)).astype(np.float32)


def _stripes(size: int, rng: np.random.Generator) -> np.ndarray:
    """Parallel streaks of random direction and period with noisy amplitude: brushed or rolled metal."""
    angle = rng.uniform(0, math.pi)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    along = x * math.cos(angle) + y * math.sin(angle)
    across = -x * math.sin(angle) + y * math.cos(angle)
    period = rng.uniform(3, 16)
    wobble = fractal_noise((size, size), (2.0, 2.0), rng, octaves=2)
    streaks = np.sin(2 * math.pi * across / period + 2.0 * wobble)
    # Streaks of brushed metal vary in strength along their length, never across it.
    return streaks * (1 + 0.5 * np.sin(2 * math.pi * along / (size * rng.uniform(0.5, 2)))) + 0.3 * wobble


def _weave(size: int, rng: np.random.Generator) -> np.ndarray:
    """Two crossing thread families: a plain weave of random pitch and slight skew."""
    pitch = rng.uniform(4, 12)
    skew = rng.uniform(-0.2, 0.2)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    warp = np.sin(2 * math.pi * (x + skew * y) / pitch)
    weft = np.sin(2 * math.pi * (y - skew * x) / pitch)
    over = np.sign(np.sin(math.pi * (x + skew * y) / pitch) * np.sin(math.pi * (y - skew * x) / pitch))
    threads = np.where(over > 0, warp, weft)
    return threads + 0.4 * fractal_noise((size, size), (4.0, 4.0), rng, octaves=3)


_MAKERS = {"grain": _grain, "stripes": _stripes, "weave": _weave}


def make_texture(kind: str, size: int, seed: int) -> np.ndarray:
    """A defect-free size x size gray texture (uint8, H x W x 3) of `kind`, fully determined by `seed`."""
    if kind not in _MAKERS:
        raise ValueError(f"unknown texture kind {kind!r}; valid kinds: {', '.join(TEXTURE_KINDS)}")
    size = images.check_positive_int("size", size)
    if size < images.MIN_IMAGE_SIDE:
        raise ValueError(f"size must be at least {images.MIN_IMAGE_SIDE} pixels; got {size}")
    rng = np.random.default_rng([int(seed), TEXTURE_KINDS.index(kind)])
    return _to_uint8_gray(_MAKERS[kind](size, rng).astype(np.float32), rng)
