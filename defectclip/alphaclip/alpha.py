"""The alpha input: region masks as an alpha map, and the stem that adds an alpha convolution to the RGB one."""

from __future__ import annotations

import contextlib
import contextvars
import copy
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from .config import ALPHA_MEAN, ALPHA_STD, AlphaClipError


# --------------------------------------------------------------------------------------------------
# the alpha map


def mask_coverage(masks: torch.Tensor | np.ndarray, size: Sequence[int]) -> torch.Tensor:
    """H x W or N x H x W masks (bool or 0..1) -> N x h x w float coverage in [0, 1] at the model size.

    The resize is area-like (bilinear with antialiasing) rather than nearest: a 3-pixel speck shrunk
    by 2x keeps a fractional alpha instead of vanishing, and AlphaCLIP's own mask transform resizes
    soft too.
    """
    masks = torch.as_tensor(np.asarray(masks) if not torch.is_tensor(masks) else masks)
    if masks.dim() == 2:
        masks = masks[None]
    if masks.dim() != 3:
        raise AlphaClipError(f"Expected masks shaped H x W or N x H x W, got {tuple(masks.shape)}")
    masks = masks.float()[:, None]
    if tuple(masks.shape[-2:]) != tuple(size):
        masks = F.interpolate(masks, size=tuple(size), mode="bilinear", align_corners=False, antialias=True)
    return masks[:, 0].clamp(0.0, 1.0)


def coverage_to_alpha(coverage: torch.Tensor) -> torch.Tensor:
    """N x h x w coverage in [0, 1] -> N x 1 x h x w alpha input, normalised (m - 0.5) / 0.26."""
    return (coverage.float()[:, None] - ALPHA_MEAN) / ALPHA_STD


def mask_to_alpha(masks: torch.Tensor | np.ndarray, size: Sequence[int]) -> torch.Tensor:
    """Masks -> N x 1 x h x w alpha input: coverage at the model size, normalised (m - 0.5) / 0.26."""
    return coverage_to_alpha(mask_coverage(masks, size))


# --------------------------------------------------------------------------------------------------
# the alpha stem: RGB conv + alpha conv


# The alpha map of the forward pass in progress. A context variable, not a module attribute, so
# concurrent requests in different threads (the Gradio app) never see each other's masks.
_CURRENT_ALPHA: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar("alpha_map", default=None)


@contextlib.contextmanager
def alpha_context(alpha: torch.Tensor) -> Iterator[None]:
    """Make `alpha` the map every AlphaStem reads during the `with` block."""
    token = _CURRENT_ALPHA.set(alpha)
    try:
        yield
    finally:
        _CURRENT_ALPHA.reset(token)


def zero_alpha_conv(rgb: nn.Conv2d) -> nn.Conv2d:
    """A one-channel, bias-free copy of `rgb`'s geometry with zero weights.

    Copying the module (rather than building an nn.Conv2d from its arguments) keeps subclasses such as
    timm's Conv2dSame, whose padding lives in forward(), computing on the same grid as the RGB conv.
    """
    if rgb.groups != 1:
        raise AlphaClipError(f"The input convolution has groups={rgb.groups}; an alpha channel needs groups=1.")
    alpha = copy.deepcopy(rgb)
    alpha.in_channels = 1
    alpha.weight = nn.Parameter(torch.zeros(rgb.out_channels, 1, *rgb.kernel_size, dtype=rgb.weight.dtype))
    alpha.register_parameter("bias", None)
    return alpha


class AlphaStem(nn.Module):
    """The tower's input convolution plus AlphaCLIP's alpha convolution: rgb(x) + alpha(alpha_map)."""

    def __init__(self, rgb: nn.Conv2d, alpha: nn.Conv2d | None = None):
        super().__init__()
        self.rgb = rgb
        self.alpha = alpha if alpha is not None else zero_alpha_conv(rgb)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha = _CURRENT_ALPHA.get()
        if alpha is None:
            raise AlphaClipError("An alpha tower needs a mask: call it as tower(images, alpha), not tower.base(images).")
        if alpha.shape[0] != x.shape[0] or alpha.shape[-2:] != x.shape[-2:]:
            raise AlphaClipError(f"Alpha map {tuple(alpha.shape)} does not match images {tuple(x.shape)}.")
        return self.rgb(x) + self.alpha(alpha.to(dtype=x.dtype, device=x.device))


def freeze_batchnorm_stats(module: nn.Module) -> None:
    """Keep BatchNorm running statistics fixed while the rest trains.

    The base weights are frozen under LoRA; letting BN statistics drift would change the base without
    being saved in the adapter, so a reloaded model would not reproduce the trained one.
    """
    for child in module.modules():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            child.eval()
