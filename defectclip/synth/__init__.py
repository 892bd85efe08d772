"""Synthetic anomalies for pretraining and evaluation: each method returns (image, mask).

Every method takes a normal uint8 image, a second image (`other`: the NSA/CutPaste source, or the
Perlin texture) and a seed or numpy Generator, and returns the anomalous image (same shape and dtype)
plus an H x W bool mask of exactly the pixels whose value changed. Same seed, same output.

    >>> image, mask = synthesize("nsa", normal, other_normal, rng=0)

Note: the package attributes `nsa`, `cutpaste` and `perlin` are the functions, which shadow the
submodules of the same names; reach module contents with `from defectclip.synth.nsa import ...`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from defectclip.synth._images import MIN_IMAGE_SIDE, RngLike
from defectclip.synth.cutpaste import PatchSampling, cutpaste
from defectclip.synth.nsa import nsa
from defectclip.synth.perlin import fractal_noise, perlin, perlin_noise

Synthesis = Callable[..., tuple[np.ndarray, np.ndarray]]

SYNTHESES: dict[str, Synthesis] = {"nsa": nsa, "cutpaste": cutpaste, "perlin": perlin}


def synthesize(
    name: str, image: np.ndarray, other: np.ndarray, rng: RngLike = None, **options: object
) -> tuple[np.ndarray, np.ndarray]:
    """Run the synthesis called `name` (a key of SYNTHESES); `options` go to that method."""
    try:
        method = SYNTHESES[name]
    except (KeyError, TypeError):
        valid = ", ".join(sorted(SYNTHESES))
        raise ValueError(f"unknown synthesis {name!r}; valid names: {valid}") from None
    return method(image, other, rng, **options)


__all__ = [
    "MIN_IMAGE_SIDE",
    "SYNTHESES",
    "PatchSampling",
    "cutpaste",
    "fractal_noise",
    "nsa",
    "perlin",
    "perlin_noise",
    "synthesize",
]
