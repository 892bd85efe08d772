"""Official AlphaCLIP checkpoints (.pth, read with weights_only=True): key conversion and strict loading."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..towers import VisionTower
from .config import AlphaClipError, OFFICIAL_WEIGHTS
from .tower import AlphaImageTower, _check_keys


# --------------------------------------------------------------------------------------------------
# official AlphaCLIP checkpoints


_OFFICIAL_RENAMES = (
    # AlphaCLIP's own Attention keeps q/k/v in an nn.Linear named in_proj; OpenAI CLIP and open_clip
    # keep the same tensors as bare Parameters in nn.MultiheadAttention.
    (re.compile(r"\.attn\.in_proj\.weight$"), ".attn.in_proj_weight"),
    (re.compile(r"\.attn\.in_proj\.bias$"), ".attn.in_proj_bias"),
)


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop 'module.' (DistributedDataParallel) and 'visual.' (a full CLIP state dict) prefixes."""
    out = {}
    for key, value in state.items():
        for prefix in ("module.", "visual."):
            key = key.removeprefix(prefix)
        out[key] = value
    return out


def official_to_tower_keys(state: dict[str, torch.Tensor], stem_name: str = "conv1") -> dict[str, torch.Tensor]:
    """Rename AlphaCLIP's visual keys to the alpha tower's open_clip ViT keys.

    'conv1.weight' -> '<stem>.rgb.weight', 'conv1_alpha.weight' -> '<stem>.alpha.weight', the packed
    attention projection to nn.MultiheadAttention's names; everything else (class_embedding,
    positional_embedding, ln_pre, transformer.resblocks.N.{ln_1, ln_2, attn.out_proj, mlp.c_fc,
    mlp.c_proj}, ln_post, proj) is named the same in both.
    """
    mapped = {}
    for key, value in _strip_prefixes(state).items():
        if key == "conv1.weight":
            key = f"{stem_name}.rgb.weight"
        elif key == "conv1_alpha.weight":
            key = f"{stem_name}.alpha.weight"
        for pattern, replacement in _OFFICIAL_RENAMES:
            key = pattern.sub(replacement, key)
        if key in mapped:
            raise AlphaClipError(f"Checkpoint key {key!r} appears twice after removing prefixes.")
        mapped[key] = value
    return mapped


def _read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    state = torch.load(Path(path), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise AlphaClipError(f"{path} is not a state dict of tensors.")
    return state


def load_alphaclip_checkpoint(path: str | Path, tower: AlphaImageTower | VisionTower) -> AlphaImageTower:
    """Load AlphaCLIP's released visual weights (.pth) into an open_clip ViT alpha tower.

    Every tensor must land and every tower weight must be covered, with equal shapes; anything left
    over or missing is an error naming the keys (a LoRA-trained or ResNet checkpoint, a wrong size).
    A plain VisionTower is wrapped first. Returns the alpha tower.
    """
    if isinstance(tower, VisionTower):
        tower = AlphaImageTower(tower, tower.num_features)
    if not tower.is_vit or tower.stem_name != "conv1":
        raise AlphaClipError(f"Official AlphaCLIP checkpoints are CLIP ViTs; {tower.base.spec} is not an open_clip ViT.")
    mapped = official_to_tower_keys(_read_state_dict(path), tower.stem_name)
    target = tower.base.model.state_dict()
    _check_keys(set(mapped), set(target), f"AlphaCLIP checkpoint {path}")
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(target[k].shape)}" for k, v in mapped.items() if v.shape != target[k].shape]
    if wrong:
        raise AlphaClipError(f"AlphaCLIP checkpoint {path} has tensors of the wrong shape: {wrong[:5]}")
    tower.base.model.load_state_dict(mapped, strict=True)
    tower.weights_from = OFFICIAL_WEIGHTS  # provenance: a describer saving this tower records it for its card
    return tower
