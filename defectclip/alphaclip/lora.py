"""LoRA on the alpha image tower: which layers are targets (PEFT), and how the adapter is attached."""

from __future__ import annotations

import re

import torch.nn as nn
from .config import AlphaClipError
from .tower import AlphaImageTower


# --------------------------------------------------------------------------------------------------
# LoRA targets


def lora_targets(tower: AlphaImageTower, pattern: str | None = None) -> list[str]:
    """Module names (relative to `tower.base.model`) that receive LoRA.

    ViT: every nn.MultiheadAttention (PEFT 0.21 wraps it whole and adapts both the packed q/k/v
    `in_proj_weight`, which is a bare Parameter and not an nn.Linear, and `out_proj`; targeting
    `out_proj` on its own would be silently ignored because MultiheadAttention never calls its
    forward) plus every other nn.Linear of the blocks (open_clip's `mlp.c_fc` / `mlp.c_proj`, timm's
    `qkv` / `proj` / `fc1` / `fc2`).
    CNN: every Conv2d with groups == 1. Depthwise convolutions are left out: PEFT needs the rank to be
    divisible by the group count (r = 64 vs 32..1152 channels) and cannot merge grouped LoRA.
    The input convolution never gets LoRA: it is trained directly (RGB conv at its own small
    learning rate, alpha conv at the larger one), as in AlphaCLIP.
    `pattern` (a regular expression, re.search) keeps only the matching names, e.g. the last stages
    of a CNN when compute is short.
    """
    model = tower.base.model
    stem_prefix = tower.stem_name + "."
    attention = [name for name, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    targets = []
    for name, module in model.named_modules():
        if name.startswith(stem_prefix) or name == tower.stem_name:
            continue
        if tower.is_vit:
            inside_attention = any(name.startswith(a + ".") for a in attention)
            is_head = re.match(r"^(head|fc_norm|classifier)\b", name) is not None
            if isinstance(module, nn.MultiheadAttention) or (isinstance(module, nn.Linear) and not inside_attention and not is_head):
                targets.append(name)
        elif isinstance(module, nn.Conv2d) and module.groups == 1:
            targets.append(name)
    if pattern is not None:
        targets = [name for name in targets if re.search(pattern, name)]
    if not targets:
        raise AlphaClipError(f"No LoRA target found in {tower.base.spec}" + (f" matching {pattern!r}." if pattern else "."))
    return targets


def lora_config(tower: AlphaImageTower, r: int = 64, alpha: int = 64, dropout: float = 0.1, pattern: str | None = None):
    """The paper's LoRA (Table 3: r = 64, alpha = 64, dropout 0.1) over `lora_targets`."""
    from peft import LoraConfig

    targets = lora_targets(tower, pattern)
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none")


def apply_lora(tower: AlphaImageTower, config):
    """Inject LoRA layers into the tower's model in place; return the PeftModel (for saving/merging).

    PEFT freezes every base weight; the alpha conv, RGB conv and projection are trained directly,
    so their gradients are switched back on here.
    """
    from peft import get_peft_model

    peft_model = get_peft_model(tower.base.model, config)
    for module in (tower.stem, tower.projection):
        module.requires_grad_(True)
    return peft_model
