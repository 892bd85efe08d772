"""The alpha image tower: any defectclip vision tower with an alpha stem and a projection to the text space."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.transforms import Preprocess
from ..towers import VisionTower, build_vision_tower
from .config import AlphaClipError
from .alpha import AlphaStem, alpha_context, freeze_batchnorm_stats


# --------------------------------------------------------------------------------------------------
# the alpha image tower


def _seeded_linear(in_features: int, out_features: int, seed: int) -> nn.Linear:
    """The same initial projection for a given seed, so 'untuned' is reproducible after training."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Linear(in_features, out_features)


class AlphaImageTower(nn.Module):
    """A VisionTower whose input convolution also reads the alpha map, projected to the text dim.

    `forward(pixels, alpha)` -> L2-normalised embeddings (N, embed_dim); `pooled(pixels, alpha)` -> the
    base tower's pooled output before the projection (equal to the plain tower's while alpha is zero
    and no adapter is active). The base tower is copied, never modified in place: open_clip towers are
    cached per spec and shared with the text tower.
    """

    def __init__(self, base: VisionTower, embed_dim: int, projection_seed: int = 0):
        super().__init__()
        self.base = copy.deepcopy(base)
        self.stem_name = base.first_conv_name
        self.base.model.set_submodule(self.stem_name, AlphaStem(self.base.first_conv))
        self.embed_dim = embed_dim
        self.projection_seed = projection_seed
        self.projection = self._make_projection(embed_dim, projection_seed)

    def _make_projection(self, embed_dim: int, seed: int) -> nn.Module:
        # open_clip ViTs already end in CLIP's image projection; a CNN's pooled trunk features, or a
        # ViT paired with a text tower of another width, need a learned map into the text space.
        if self.base.is_vit and self.base.num_features == embed_dim:
            return nn.Identity()
        return _seeded_linear(self.base.num_features, embed_dim, seed)

    @property
    def stem(self) -> AlphaStem:
        return self.base.model.get_submodule(self.stem_name)

    @property
    def preprocess(self) -> Preprocess:
        return self.base.preprocess

    @property
    def is_vit(self) -> bool:
        return self.base.is_vit

    def train(self, mode: bool = True) -> "AlphaImageTower":
        """Training mode for LoRA dropout, with BatchNorm statistics always frozen (see freeze_batchnorm_stats)."""
        super().train(mode)
        freeze_batchnorm_stats(self)
        return self

    def pooled(self, pixels: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        with alpha_context(alpha):
            return self.base(pixels)

    def forward(self, pixels: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.projection(self.pooled(pixels, alpha)), dim=-1)

    def describer_state(self) -> dict[str, torch.Tensor]:
        """The weights trained outside LoRA: alpha conv, RGB conv and projection."""
        state = {f"alpha_conv.{k}": v for k, v in self.stem.alpha.state_dict().items()}
        state.update({f"rgb_conv.{k}": v for k, v in self.stem.rgb.state_dict().items()})
        state.update({f"projection.{k}": v for k, v in self.projection.state_dict().items()})
        return state

    def load_describer_state(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of describer_state, strict: a missing or extra tensor is an error."""
        parts = {"alpha_conv": self.stem.alpha, "rgb_conv": self.stem.rgb, "projection": self.projection}
        expected = set(self.describer_state())
        _check_keys(set(state), expected, "describer weights")
        for prefix, module in parts.items():
            module.load_state_dict({k.split(".", 1)[1]: v for k, v in state.items() if k.startswith(prefix + ".")}, strict=True)


def _check_keys(found: set[str], expected: set[str], what: str) -> None:
    missing, extra = sorted(expected - found), sorted(found - expected)
    if missing or extra:
        raise AlphaClipError(f"{what} do not fit the model: missing {missing[:10]}, unexpected {extra[:10]}.")


def build_alpha_tower(vision_spec: str, embed_dim: int, image_size: int | None = None, projection_seed: int = 0) -> AlphaImageTower:
    """The alpha tower for a vision spec, projecting to `embed_dim` (the text tower's width)."""
    base = build_vision_tower(vision_spec)
    if image_size is not None and tuple(base.preprocess.size) != (image_size, image_size):
        if base.is_vit:
            # A ViT's positional embedding fixes its grid; resizing it would change the base model.
            raise AlphaClipError(f"{vision_spec} is a ViT trained at {base.preprocess.size}; it cannot run at {image_size} px.")
        base.preprocess = base.preprocess.with_size(image_size)
    return AlphaImageTower(base, embed_dim, projection_seed)
