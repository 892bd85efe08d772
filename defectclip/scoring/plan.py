"""Input plans: how an image of any size becomes model input, and how its maps come back.

- `resize` (the default): the whole image is resized to the model size. Cheap, and right when a
  defect covers a good part of the image; but a defect of 0.2 % of a 640 px image shrinks to a
  feature cell or less at 256 px, and every scorer is then at chance.
- `tiles`: the image is cut, at its own resolution, into `tile` x `tile` windows that overlap by
  `overlap` pixels; each window is scored as an image of its own and the window maps are stitched
  back into one map of the full image (averaged where windows overlap). A small defect keeps its
  pixels; the cost grows with the image's area instead of being fixed.

The model size of a tile is the scorer's `image_size` (by default the tile size itself, so tiles are
scored at native resolution; a smaller `image_size` scores them downscaled).

Images above `MAX_IMAGE_PIXELS` are refused with a message, in both plans: the full-resolution map
alone takes 4 bytes a pixel, and a tiled scan of such an image would take minutes on a CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from ..data.images import MAX_IMAGE_PIXELS  # the image readers' limit: 40 MP, ~660 tiles of 256 px
from .errors import ScoringError

MODES = ("resize", "tiles")


@dataclass(frozen=True)
class Box:
    """A window of an image: rows top:bottom, columns left:right (pixels, end exclusive)."""

    top: int
    left: int
    bottom: int
    right: int

    @property
    def size(self) -> tuple[int, int]:
        return self.bottom - self.top, self.right - self.left


@dataclass(frozen=True)
class InputPlan:
    """`InputPlan()` resizes; `InputPlan("tiles", tile=256, overlap=32)` tiles at native resolution."""

    mode: str = "resize"
    tile: int | None = None
    overlap: int = 0

    def __post_init__(self):
        if self.mode not in MODES:
            raise ScoringError(f"Unknown input plan {self.mode!r}; use one of {MODES}.")
        if self.mode == "resize":
            if self.tile is not None or self.overlap:
                raise ScoringError("A resize plan takes no tile or overlap; use mode='tiles' to tile.")
            return
        if self.tile is None or self.tile < 1:
            raise ScoringError(f"A tiles plan needs a positive tile size in pixels, got {self.tile}.")
        if not 0 <= self.overlap < self.tile:
            raise ScoringError(
                f"overlap must be at least 0 and smaller than the tile ({self.tile} px), got {self.overlap}."
            )

    @property
    def is_tiled(self) -> bool:
        return self.mode == "tiles"

    def windows(self, height: int, width: int) -> list[Box]:
        """The windows an image of this size is scored in, in raster order."""
        check_image_pixels(height, width)
        if not self.is_tiled:
            return [Box(0, 0, height, width)]
        rows, cols = tile_starts(height, self.tile, self.overlap), tile_starts(width, self.tile, self.overlap)
        return [
            Box(top, left, min(top + self.tile, height), min(left + self.tile, width))
            for top in rows
            for left in cols
        ]

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "tile": self.tile, "overlap": self.overlap}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "InputPlan":
        unknown = set(data) - {"mode", "tile", "overlap"}
        if unknown:
            raise ScoringError(f"Unknown input-plan keys {sorted(unknown)}; expected mode, tile, overlap.")
        return cls(data.get("mode", "resize"), data.get("tile"), int(data.get("overlap") or 0))

    def describe(self) -> str:
        return "resize" if not self.is_tiled else f"tiles:{self.tile}:{self.overlap}"


def parse_plan(plan: "InputPlan | str | dict | None") -> InputPlan:
    """An InputPlan from itself, None (resize), a dict (a saved config) or a spec string:
    'resize', 'tiles:<tile>' or 'tiles:<tile>:<overlap>' (overlap defaults to an eighth of the tile)."""
    if plan is None:
        return InputPlan()
    if isinstance(plan, InputPlan):
        return plan
    if isinstance(plan, dict):
        return InputPlan.from_dict(plan)
    if not isinstance(plan, str):
        raise ScoringError(f"plan must be an InputPlan, a dict or a string, got {type(plan).__name__}.")
    parts = plan.strip().split(":")
    if parts == ["resize"]:
        return InputPlan()
    if parts[0] == "tiles" and len(parts) in (2, 3):
        try:
            tile = int(parts[1])
            overlap = int(parts[2]) if len(parts) == 3 else tile // 8
        except ValueError:
            raise ScoringError(f"Cannot read input plan {plan!r}: tile and overlap are whole pixels, e.g. 'tiles:256:32'.") from None
        return InputPlan("tiles", tile, overlap)
    raise ScoringError(f"Cannot read input plan {plan!r}; use 'resize', 'tiles:<tile>' or 'tiles:<tile>:<overlap>'.")


def check_image_pixels(height: int, width: int) -> None:
    if height * width > MAX_IMAGE_PIXELS:
        raise ScoringError(
            f"Image of {width} x {height} pixels ({height * width / 1e6:.1f} MP) is above the "
            f"{MAX_IMAGE_PIXELS / 1e6:.0f} MP limit; crop it into parts (or downscale it) and score those."
        )


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Window starts along one axis: the first at 0, the last flush with the far edge, the rest evenly
    spread so that neighbours overlap by at least `overlap` pixels. A length of at most one tile is
    one window (the whole length; it is then resized to the model size like any input)."""
    if length <= tile:
        return [0]
    stride = tile - overlap
    count = math.ceil((length - tile) / stride) + 1
    return sorted({int(round(x)) for x in np.linspace(0, length - tile, count)})


def crop(image: torch.Tensor, box: Box) -> torch.Tensor:
    return image[..., box.top : box.bottom, box.left : box.right]


def stitch(maps: Sequence[np.ndarray], boxes: Sequence[Box], size: tuple[int, int]) -> np.ndarray:
    """Window maps -> one H x W map, the mean of the windows covering each pixel.

    The mean rather than the maximum: a window edge sees a cut-off context (and the CNN's zero
    padding), and averaging with the neighbour that sees the same pixels in its interior damps that
    edge response instead of keeping it.
    """
    if len(maps) == 1 and tuple(maps[0].shape) == tuple(size):
        return maps[0]
    total = np.zeros(size, dtype=np.float32)
    count = np.zeros(size, dtype=np.float32)
    for window_map, box in zip(maps, boxes):
        total[box.top : box.bottom, box.left : box.right] += window_map
        count[box.top : box.bottom, box.left : box.right] += 1.0
    return total / np.maximum(count, 1.0)
