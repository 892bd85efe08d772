"""Patch features: the requested stages of a vision tower, optionally 3 x 3 averaged, the coarser maps
upsampled to the finest one and concatenated (one feature vector per patch), where each patch's
feature is centred in the model input, the sizes a model input and an image must have, and the
features of a group of windows (`ViewBatch`) as one extraction hands them to fitting and scoring.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..data import Preprocess, resize
from ..towers import VisionTower
from . import native
from .errors import ScoringError
from .inference import inference_tower
from .photometric import apply_affine
from .plan import Box


def default_layers(tower: VisionTower, reductions: Sequence[int]) -> list[str]:
    """The tower's stages at the given strides (the deepest stage of each stride).

    Mid-level stages (stride 8 and 16) are local enough to localise small defects and generic
    enough that ImageNet features transfer to industrial images (PatchCore, PaDiM). Towers without a
    pyramid (ViTs: every block has the patch stride) get as many consecutive middle blocks instead.
    """
    by_reduction: dict[int, str] = {}
    for stage in tower.stages.values():
        by_reduction[stage.reduction] = stage.name
    if all(r in by_reduction for r in reductions):
        return [by_reduction[r] for r in reductions]
    names = tower.stage_names
    count = min(len(reductions), len(names))
    start = max(0, (len(names) - count) // 2)
    return names[start : start + count]


def check_layers(tower: VisionTower, layers: Sequence[str]) -> list[str]:
    layers = list(layers)
    if not layers:
        raise ScoringError("layers is empty; name at least one stage of the tower.")
    unknown = [name for name in layers if name not in tower.stages]
    if unknown:
        raise ScoringError(f"Unknown layers {unknown} for tower {tower.spec}; it has {tower.stage_names}.")
    if len(set(layers)) != len(layers):
        raise ScoringError(f"layers {layers} names a stage twice.")
    return layers


def coarsest_stride(tower: VisionTower, layers: Sequence[str]) -> int:
    return max(tower.stages[name].reduction for name in layers)


# tower -> {(layers, model size, local averaging): centre offset}; weak keys, so a dropped tower
# takes its entries with it. Towers are frozen inside scorers, so the offsets cannot go stale.
_CENTRE_OFFSETS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


class PatchFeatures:
    """Tower stages -> one feature vector per patch, shaped N x C x h x w at the finest stage's grid."""

    def __init__(self, tower: VisionTower, layers: Sequence[str], preprocess: Preprocess, local_average: bool,
                 inference: str = "exact"):
        """`inference`: how the tower runs, a resolved mode of `inference.resolve_inference` ("exact":
        the tower as it is; "folded": BatchNorm folded into the convolutions; "bf16": that, in bfloat16)."""
        self.tower = tower
        self.layers = list(layers)
        self.preprocess = preprocess
        self.local_average = local_average
        self.inference = inference
        self.min_size = coarsest_stride(tower, layers)
        self._centre_offset: tuple[float, float] | None = None
        self._affine: tuple[torch.Tensor, torch.Tensor] | None = None
        check_model_size(preprocess.size, self.min_size, tower.spec)

    def model_input(self, images: list[torch.Tensor], device: torch.device, dtype: torch.dtype = torch.float32,
                    affines: Sequence[tuple[float, float] | None] | None = None) -> torch.Tensor:
        """Resize and normalise a list of differently sized images into one batch of `dtype`;
        `affines`: a (gain, offset) per image applied after the resize (photometric matching)."""
        for image in images:
            check_image_size(image, self.min_size, self.tower.spec)
        size, interpolation = self.preprocess.size, self.preprocess.interpolation
        # Each image is resized on its own (sizes differ); the batch is normalised with one op rather
        # than a few per image, which mattered on a busy CPU where every op waits for both threads.
        resized = [resize(image, size, interpolation) for image in images]
        if affines is not None:
            resized = [apply_affine(image, affine) for image, affine in zip(resized, affines)]
        scale, shift = self._normalization(device)
        if dtype == torch.bfloat16 and device.type == "cpu" and native.available()[0]:
            # One pass instead of four (normalise, lay out, round): 0.6 -> ~0.1 ms an image at 224 px.
            return native.normalized_channels_last([image.float() for image in resized], scale, shift)
        batch = resized[0].unsqueeze(0) if len(resized) == 1 else torch.stack(resized)
        batch = torch.addcmul(shift, batch.to(device, torch.float32), scale)  # (x - mean) / std in one pass
        if batch.device.type == "cpu":
            # oneDNN's convolutions run 1.5-1.8x faster on channels-last input on this project's CPU
            # (EfficientNet-Lite0 to blocks.4, 224 px: 33 vs 59 ms an image, one thread); the
            # features differ only by float rounding (~5e-5).
            batch = batch.contiguous(memory_format=torch.channels_last)
        # Rounded after the layout change: converting and re-laying out a 3-channel image in one copy
        # took twice as long (0.20 vs 0.11 ms at 224 px).
        return batch.to(dtype)

    def _normalization(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """1 / std and -mean / std as 1 x 3 x 1 x 1 float32 tensors, made once per device."""
        if self._affine is None or self._affine[0].device != device:
            mean = torch.tensor(self.preprocess.mean, dtype=torch.float64)
            std = torch.tensor(self.preprocess.std, dtype=torch.float64)
            self._affine = ((1.0 / std).float().view(1, -1, 1, 1).to(device), (-mean / std).float().view(1, -1, 1, 1).to(device))
        return self._affine

    @torch.no_grad()
    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        return self.embed(batch)

    def centre_offset(self) -> tuple[float, float]:
        """Where patch (i, j)'s feature is centred in the model input: (s i + dy, s j + dx) pixels.

        Measured once per scorer by back-propagation (see `measure_centre_offset`) rather than assumed:
        a padded CNN's patches sit pixels up-left of the grid cell a resize would give them
        (EfficientNet-Lite0's blocks.2 + blocks.4: about -9 and -8 px instead of +3.5), and small
        defects scored a cell away from where they are lose most of their pixel-level overlap.
        """
        if self._centre_offset is None:
            # Shared by every scorer on the same tower object: the app's few-shot mode builds one
            # PatchCore per reference image, and each would otherwise measure it again.
            known = _CENTRE_OFFSETS.setdefault(self.tower, {})
            key = (tuple(self.layers), tuple(self.preprocess.size), self.local_average)
            if key not in known:
                # Measured on the exact tower whatever the inference mode, so every mode places its
                # scores at the same pixels (bfloat16 gradients would move the centroid a little).
                device = next(iter(self.tower.parameters())).device
                known[key] = measure_centre_offset(lambda x: self.embed(x, exact=True), self.preprocess.size, device)
            self._centre_offset = known[key]
        return self._centre_offset

    def runner(self, exact: bool = False) -> VisionTower:
        """The tower `embed` runs: the exact one, or its inference copy (rebuilt if the weights changed)."""
        return self.tower if exact else inference_tower(self.tower, self.inference, self.layers)

    def embed(self, batch: torch.Tensor, exact: bool = False, runner: VisionTower | None = None) -> torch.Tensor:
        """Patch features of a model-input batch. `runner`: the tower from `runner(exact)`, when the
        caller embeds many batches in one go (checking the weights per batch cost ~0.4 ms an image)."""
        tower = runner if runner is not None else self.runner(exact)
        maps = tower.forward_features(batch.to(input_dtype(tower)), self.layers)
        if self.local_average and _native_maps(maps.values()):
            # The same averaging, upsampling and concatenation in one call instead of six ops and
            # their copies (~0.4 ms an image at 224 px on one CPU thread, where the numbers are ~100 KB).
            return native.patch_features(list(maps.values()))
        # bfloat16 maps are widened before the averaging and upsampling: those ops are cheap, and in
        # float32 they add no rounding of their own.
        maps = {name: m.float() for name, m in maps.items()}
        if self.local_average:
            # PatchCore's locally aware patch features: each patch also sees its 3 x 3 neighbourhood,
            # which adds context without the resolution loss of a deeper stage.
            maps = {name: F.avg_pool2d(m, 3, stride=1, padding=1) for name, m in maps.items()}
        finest = max(maps.values(), key=lambda m: m.shape[-2] * m.shape[-1]).shape[-2:]
        aligned = [
            m if m.shape[-2:] == finest else F.interpolate(m, size=finest, mode="bilinear", align_corners=False)
            for m in maps.values()
        ]
        return torch.cat(aligned, dim=1)


def _native_maps(maps) -> bool:
    """Whether native.patch_features can take these stage maps: bfloat16 channels-last CPU tensors
    (what the bfloat16 inference tower produces on an AMX CPU) and the kernels built here."""
    return all(
        m.dtype == torch.bfloat16 and m.device.type == "cpu" and m.is_contiguous(memory_format=torch.channels_last)
        for m in maps
    ) and native.available()[0]


def input_dtype(tower: VisionTower) -> torch.dtype:
    """The dtype `tower` takes its input in: that of its weights."""
    parameter = next(iter(tower.parameters()), None)
    return parameter.dtype if parameter is not None else torch.float32


@dataclass
class ViewBatch:
    """Features of a ViewGroup's windows (V x C x h x w, one per window, in `windows` order) and the
    sizes of the images they came from; what `FeatureScorer.embed` yields and `fit_embedded` /
    `predict_embedded` take."""

    embedding: torch.Tensor
    windows: list[tuple[int, Box]]
    image_sizes: list[tuple[int, int]]


def check_model_size(size: Sequence[int], min_size: int, spec: str) -> None:
    if min(size) < min_size:
        raise ScoringError(
            f"image_size {tuple(size)} is too small for {spec}: its coarsest requested stage has stride "
            f"{min_size}, so the model input must be at least {min_size} x {min_size} pixels."
        )


def check_image_size(image: torch.Tensor, min_size: int, spec: str) -> None:
    """Reject images smaller than one patch of the coarsest stage: upscaling them invents the detail
    the features would describe, so any score would be meaningless."""
    height, width = image.shape[-2:]
    if min(height, width) < min_size:
        raise ScoringError(
            f"Image of {width} x {height} pixels is too small for {spec}: the coarsest feature stage has "
            f"stride {min_size}, so images must be at least {min_size} x {min_size} pixels."
        )


CENTRE_PROBE_SEED = 0


def measure_centre_offset(embed, model_size: Sequence[int], device: torch.device) -> tuple[float, float]:
    """(dy, dx) such that patch (i, j) of `embed`'s grid is centred at pixel (s_y i + dy, s_x j + dx).

    The centre is the centroid of |d feature / d input| for a few interior patches of a seeded
    random image: where the patch's feature actually looks. A resize of the patch grid assumes
    (s - 1) / 2, right for a ViT's unpadded patches but not for padded convolutions.
    """
    height, width = (int(v) for v in model_size)
    generator = torch.Generator().manual_seed(CENTRE_PROBE_SEED)
    probe = torch.randn(1, 3, height, width, generator=generator).to(device).requires_grad_(True)
    rows, cols = torch.arange(height, device=device), torch.arange(width, device=device)
    offsets = []
    with torch.enable_grad():
        grid = embed(probe)
        h, w = grid.shape[-2:]
        stride_y, stride_x = height / h, width / w
        for step in (-1, 0, 1):
            i, j = min(max(h // 2 + step, 0), h - 1), min(max(w // 2 + step, 0), w - 1)
            (gradient,) = torch.autograd.grad(grid[0, :, i, j].sum(), probe, retain_graph=True)
            weight = gradient.abs().sum(dim=(0, 1))
            total = weight.sum()
            if not torch.isfinite(total) or total <= 0:
                continue
            centre_y = float((weight.sum(1) * rows).sum() / total)
            centre_x = float((weight.sum(0) * cols).sum() / total)
            offsets.append((centre_y - stride_y * i, centre_x - stride_x * j))
    if not offsets:  # no gradient reached the input: keep the resize convention
        return ((stride_y - 1) / 2, (stride_x - 1) / 2)
    return tuple(float(np.mean([o[axis] for o in offsets])) for axis in (0, 1))
