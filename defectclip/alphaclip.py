"""AlphaCLIP region describer: an image tower that also reads a region mask (the alpha channel).

AlphaCLIP (Sun et al., CVPR 2024) adds one convolution for the alpha channel beside the RGB input
convolution and sums their outputs, so the rest of the network sees "RGB features + where to look".
Here that works over any tower from `defectclip.towers`:

- open_clip ViTs: the patch embedding `conv1` gets the alpha convolution (the official layout);
- timm CNNs (`offline:efficientnet_lite0`, `tiny:cnn`): the stem convolution gets it, before the stem's
  BatchNorm, as AlphaCLIP's own ResNet does.

The alpha convolution starts at zero when the weights do not contain one, so an untuned tower
computes exactly what its base computes. The alpha map is the region mask resized to the model size
and normalised as (m - 0.5) / 0.26 (AlphaCLIP's mask transform): inside the region 1.92, outside -1.92.

`AlphaDescriber` pairs that tower with a frozen text tower and ranks candidate captions for a region.
A folder written by `save_pretrained` holds `describer_config.json`, `describer.safetensors` (alpha
conv, RGB conv, projection) and `adapter/` (PEFT LoRA, `PeftModel.save_pretrained` format), or, for a
merged export, `model.safetensors` with every weight of the image tower and no adapter.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .data.transforms import Preprocess, build_transform, resize
from .errors import DefectclipError
from .io import atomic_dir, read_json, read_json_object, read_safetensors, write_json_atomic
from .towers import TextTower, VisionTower, build_text_tower, build_vision_tower

ALPHA_MEAN = 0.5
ALPHA_STD = 0.26
CONFIG_NAME = "describer_config.json"
WEIGHTS_NAME = "describer.safetensors"
MERGED_WEIGHTS_NAME = "model.safetensors"
ADAPTER_DIR = "adapter"
FORMAT = "defectclip-alphaclip-describer"
DEFAULT_TEMPERATURE = 0.07


class AlphaClipError(DefectclipError):
    """A checkpoint, folder or input that does not fit the describer; the message says what is wrong."""


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


def mask_to_alpha(masks: torch.Tensor | np.ndarray, size: Sequence[int]) -> torch.Tensor:
    """Masks -> N x 1 x h x w alpha input: coverage at the model size, normalised (m - 0.5) / 0.26."""
    return (mask_coverage(masks, size)[:, None] - ALPHA_MEAN) / ALPHA_STD


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
    return tower


# --------------------------------------------------------------------------------------------------
# the describer


def _as_image_tensor(image) -> torch.Tensor:
    """PIL image, H x W (x 3) uint8 array or 3 x H x W float tensor in [0, 1] -> 3 x H x W float."""
    if torch.is_tensor(image):
        tensor = image.float()
    else:
        array = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
        if array.ndim == 2:
            array = np.repeat(array[..., None], 3, axis=-1)
        tensor = torch.from_numpy(np.array(array, copy=True)).permute(2, 0, 1).float()
        tensor = tensor / 255.0 if array.dtype == np.uint8 else tensor
    if tensor.dim() != 3 or tensor.shape[0] != 3:
        raise AlphaClipError(f"Expected an RGB image, got a tensor shaped {tuple(tensor.shape)}.")
    return tensor


class AlphaDescriber(nn.Module):
    """Rank captions for one region of an image.

    - `embed_regions(images, masks)` -> L2-normalised region embeddings (N, D)
    - `describe(image, mask, candidates)` -> [(caption, probability), ...] best first
    - `candidates_for(object)` -> the caption set saved with the model for that object
    Probabilities are softmax(cosine / temperature) over the candidates, temperature from training.
    """

    def __init__(self, image: AlphaImageTower, text: TextTower, config: dict):
        super().__init__()
        self.image = image
        self.text = text
        self.config = config
        self.transform = build_transform(image.preprocess)
        self._caption_cache: dict[str, torch.Tensor] = {}
        self._set_peft_model(None)

    def _set_peft_model(self, peft_model) -> None:
        # The PeftModel wraps the image tower's own model (LoRA is injected in place), so registering
        # it as a submodule would list every weight twice; it is kept as a plain attribute instead.
        self.__dict__["peft_model"] = peft_model

    # -- construction ------------------------------------------------------------------------------

    @classmethod
    def build(cls, vision: str, text: str, image_size: int | None = None, seed: int = 0,
              temperature: float = DEFAULT_TEMPERATURE, candidates: dict[str, list[str]] | None = None) -> "AlphaDescriber":
        """A fresh, untuned describer: alpha conv zero, no adapter, projection initialised from `seed`."""
        text_tower = build_text_tower(text)
        image_tower = build_alpha_tower(vision, text_tower.dim, image_size, projection_seed=seed)
        config = {
            "format": FORMAT, "version": 1, "vision": vision, "text": text, "image_size": image_size,
            "preprocess": image_tower.preprocess.to_dict(), "projection_seed": seed,
            "temperature": temperature, "candidates": dict(candidates or {}), "merged": False, "lora": None,
        }
        return cls(image_tower.eval(), text_tower.eval(), config)

    def attach_adapter(self, r: int = 64, alpha: int = 64, dropout: float = 0.1, pattern: str | None = None):
        """Add fresh LoRA layers (the paper's r/alpha/dropout) to the image tower; return the PeftModel."""
        config = lora_config(self.image, r, alpha, dropout, pattern)
        targets = sorted(config.target_modules)  # before PEFT rewrites the set into shorter suffixes
        self._set_peft_model(apply_lora(self.image, config))
        self.config["lora"] = {"r": r, "alpha": alpha, "dropout": dropout, "targets": targets}
        return self.peft_model

    @property
    def temperature(self) -> float:
        return float(self.config["temperature"])

    # -- inference ---------------------------------------------------------------------------------

    def prepare(self, images: torch.Tensor, masks) -> tuple[torch.Tensor, torch.Tensor]:
        """[0, 1] images (N x 3 x H x W) and masks (N x H x W) -> model pixels and alpha map."""
        pixels = self.transform(images)
        alpha = mask_to_alpha(masks, self.image.preprocess.size)
        return pixels, alpha

    @torch.no_grad()
    def embed_regions(self, images: torch.Tensor, masks) -> torch.Tensor:
        """One embedding per (image, mask) pair; images N x 3 x H x W in [0, 1], masks N x H x W."""
        if images.dim() == 3:
            images = images[None]
        device = next(self.image.parameters()).device
        pixels, alpha = self.prepare(images.float(), masks)
        return self.image(pixels.to(device), alpha.to(device))

    @torch.no_grad()
    def embed_captions(self, captions: Sequence[str]) -> torch.Tensor:
        """Text embeddings, cached per caption (the text tower is frozen)."""
        missing = [c for c in dict.fromkeys(captions) if c not in self._caption_cache]
        if missing:
            for caption, embedding in zip(missing, self.text.encode(missing)):
                self._caption_cache[caption] = embedding
        return torch.stack([self._caption_cache[c] for c in captions])

    def candidates_for(self, object_name: str) -> list[str]:
        try:
            return list(self.config["candidates"][object_name])
        except KeyError:
            known = sorted(self.config["candidates"])
            raise AlphaClipError(f"No candidate captions saved for object {object_name!r}; known objects: {known}") from None

    @torch.no_grad()
    def caption_probabilities(self, region_embeddings: torch.Tensor, candidates: Sequence[str]) -> torch.Tensor:
        text = self.embed_captions(candidates).to(region_embeddings.device)
        return (region_embeddings @ text.T / self.temperature).softmax(dim=-1)

    @torch.no_grad()
    def describe(self, image, mask, candidates: Sequence[str]) -> list[tuple[str, float]]:
        """Candidate captions for the region `mask` of `image`, with probabilities, best first."""
        if not candidates:
            raise AlphaClipError("describe() needs at least one candidate caption.")
        mask = np.asarray(mask.cpu() if torch.is_tensor(mask) else mask).astype(bool)
        if not mask.any():
            raise AlphaClipError("The region mask is empty: mark at least one pixel.")
        tensor = _as_image_tensor(image)
        if tuple(mask.shape) != tuple(tensor.shape[-2:]):
            raise AlphaClipError(f"Mask {mask.shape} and image {tuple(tensor.shape[-2:])} differ in size.")
        probabilities = self.caption_probabilities(self.embed_regions(tensor[None], mask[None]), candidates)[0]
        ranked = sorted(zip(candidates, probabilities.tolist()), key=lambda pair: -pair[1])
        return [(caption, float(p)) for caption, p in ranked]

    # -- saving and loading --------------------------------------------------------------------------

    def save_pretrained(self, folder: str | Path, merged: bool = False) -> Path:
        """Write the describer folder atomically (see the module docstring for its contents)."""
        from safetensors.torch import save_file

        with atomic_dir(folder) as staging:
            config = dict(self.config, merged=merged)
            if merged:
                save_file(_contiguous(self._merged_tower_state()), str(staging / MERGED_WEIGHTS_NAME))
                save_file(_contiguous(self._projection_state()), str(staging / WEIGHTS_NAME))
            else:
                save_file(_contiguous(self.image.describer_state()), str(staging / WEIGHTS_NAME))
                if self.peft_model is not None:
                    self.peft_model.save_pretrained(str(staging / ADAPTER_DIR))
            write_json_atomic(staging / CONFIG_NAME, config)
        return Path(folder)

    def _projection_state(self) -> dict[str, torch.Tensor]:
        return {f"projection.{k}": v for k, v in self.image.projection.state_dict().items()}

    def _merged_tower_state(self) -> dict[str, torch.Tensor]:
        """Every image-tower weight with LoRA folded in, computed on a copy so this model keeps its adapter."""
        if self.peft_model is None:
            return dict(self.image.base.model.state_dict())
        merged = copy.deepcopy(self.peft_model).merge_and_unload()
        return dict(merged.state_dict())

    @classmethod
    def from_pretrained(cls, folder: str | Path, *, untuned: bool = False, keep_head: bool = False,
                        merge_adapter: bool = True, root: str | Path | None = None,
                        allow_absolute_tower: bool = True) -> "AlphaDescriber":
        """Reload a saved describer; outputs equal the saved model's.

        The adapter is merged into the base weights once (`merge_adapter=False` keeps it separate, to
        train on): faster, and steady. Unmerged, PEFT's MultiheadAttention LoRA adds the LoRA delta
        to the packed q/k/v weight before every forward and subtracts it after, so the base weights
        pick up float rounding on every call. Merged outputs equal unmerged ones to float rounding.
        `untuned=True` rebuilds the same base towers without what training changed (alpha conv zero,
        no adapter, base RGB conv, projection at its seeded initial value): the zero-shot baseline.
        `keep_head=True` with it keeps the trained projection: a mask-blind linear-probe baseline.
        """
        folder = _describer_folder(Path(folder))
        config = read_json_object(folder / CONFIG_NAME, "an AlphaCLIP describer")
        if config.get("format") != FORMAT:
            raise AlphaClipError(f"{folder} is not an AlphaCLIP describer folder (format {config.get('format')!r}).")
        vision, text = check_describer_config(config, folder, root, allow_absolute_tower)
        try:
            describer = cls.build(vision, text, config.get("image_size"), config["projection_seed"],
                                  config["temperature"], config["candidates"])
        except DefectclipError:
            raise
        except Exception as err:  # noqa: BLE001 - a damaged bundled tower fails inside timm / json
            raise AlphaClipError(f"Cannot build the describer of {folder}: {type(err).__name__}: {err}") from err
        describer.config = dict(config)
        try:
            return describer._load_weights(folder, untuned, keep_head, merge_adapter)
        except (RuntimeError, KeyError) as err:  # torch's load_state_dict on misshapen tensors
            raise AlphaClipError(f"The weights in {folder} do not fit its describer_config.json: {err}") from err

    def _load_weights(self, folder: Path, untuned: bool, keep_head: bool, merge_adapter: bool) -> "AlphaDescriber":
        describer, config = self, self.config
        if untuned:
            if keep_head:
                describer.image.projection.load_state_dict(_read_projection(folder / WEIGHTS_NAME), strict=True)
            describer.config.update(lora=None, merged=False)
            return describer
        if config.get("merged"):
            describer._load_merged(folder)
        else:
            describer._load_adapter(folder, merge_adapter)
        return describer.eval()

    def _load_adapter(self, folder: Path, merge_adapter: bool) -> None:
        self.image.load_describer_state(read_safetensors(folder / WEIGHTS_NAME))
        if self.config.get("lora"):
            from peft import PeftModel

            adapter = folder / ADAPTER_DIR
            if not (adapter / "adapter_model.safetensors").is_file() or any(adapter.glob("*.bin")):
                # PEFT falls back to torch.load for adapter_model.bin: weights are read from safetensors only.
                raise AlphaClipError(f"{adapter} must hold adapter_model.safetensors (and no .bin pickle files).")
            try:
                peft_model = PeftModel.from_pretrained(self.image.base.model, str(adapter))
            except Exception as err:  # noqa: BLE001 - PEFT raises many kinds for a damaged adapter folder
                raise AlphaClipError(f"Cannot load the LoRA adapter in {adapter}: {type(err).__name__}: {err}") from err
            self._set_peft_model(peft_model)
            if merge_adapter:
                with warnings.catch_warnings():
                    # PEFT merges a MultiheadAttention's out_proj together with the attention, then visits
                    # the out_proj layer again and warns that it is merged already: expected, harmless.
                    warnings.filterwarnings("ignore", message="All adapters are already merged")
                    self.peft_model.merge_adapter()

    def _load_merged(self, folder: Path) -> None:
        state = read_safetensors(folder / MERGED_WEIGHTS_NAME)
        _check_keys(set(state), set(self.image.base.model.state_dict()), f"merged weights in {folder}")
        self.image.base.model.load_state_dict(state, strict=True)
        self.image.projection.load_state_dict(_read_projection(folder / WEIGHTS_NAME), strict=True)
        self.config["lora"] = None


def check_describer_config(config: dict, folder: Path, root: str | Path | None,
                           allow_absolute_tower: bool) -> tuple[str, str]:
    """Types and ranges of describer_config.json; returns the vision and text specs, confined to the artifact."""
    from .schema import MAX_MODEL_SIDE, Config, confine_local_dir

    schema = Config(config, folder / CONFIG_NAME)
    schema.number("image_size", 1, MAX_MODEL_SIDE, integer=True, optional=True)
    schema.number("projection_seed", 0, None, integer=True)
    schema.number("temperature", 0.0, 100.0, low_open=True)
    candidates = schema.require("candidates")
    if not isinstance(candidates, dict) or not all(
        isinstance(name, str) and isinstance(captions, list) and captions and all(isinstance(c, str) and c for c in captions)
        for name, captions in candidates.items()
    ):
        schema.fail("must map object names to non-empty lists of captions", "candidates")
    lora = config.get("lora")
    if lora is not None:
        sub = schema.sub("lora")
        sub.number("r", 1, 1024, integer=True)
        sub.number("alpha", 0.0, None, low_open=True)
        sub.number("dropout", 0.0, 1.0)
        sub.strings("targets")
    vision, text = (
        confine_local_dir(schema.string(role), folder, root, allow_absolute=allow_absolute_tower, where=f"{role} tower")
        for role in ("vision", "text")
    )
    return vision, text


def _describer_folder(folder: Path) -> Path:
    """A describer folder itself, or a training --output-dir holding one in `model/`."""
    if not (folder / CONFIG_NAME).is_file() and (folder / "model" / CONFIG_NAME).is_file():
        return folder / "model"
    return folder


def _read_projection(path: Path) -> dict[str, torch.Tensor]:
    return {k.removeprefix("projection."): v for k, v in read_safetensors(path).items() if k.startswith("projection.")}


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses shared or non-contiguous storage; saved tensors are independent copies."""
    return {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}



# --------------------------------------------------------------------------------------------------
# split-mask caption datasets (written by `python -m hub.datasets build`)


@dataclass
class RegionRecord:
    """One image of a split-mask caption dataset with its regions, at full resolution."""

    image: torch.Tensor  # 3 x H x W float in [0, 1]
    object: str
    masks: np.ndarray  # N x H x W bool, one per region
    defects: list[str]
    captions: list[str]


def _pil_to_tensor(image) -> torch.Tensor:
    return _as_image_tensor(image.convert("RGB"))


def _region_mask(image) -> np.ndarray:
    """A region mask stored as an image (any mode) -> H x W bool, non-zero = inside."""
    array = np.asarray(image)
    return (array.max(axis=-1) if array.ndim == 3 else array) > 0


def iter_region_records(dataset_dir: str | Path, split: str) -> Iterator[RegionRecord]:
    """Every image of `split` that has at least one region, decoded."""
    for row in open_region_split(dataset_dir, split):
        regions = row["regions"]
        if not regions:
            continue
        yield RegionRecord(
            image=_pil_to_tensor(row["image"]),
            object=row["object"],
            masks=np.stack([_region_mask(region["mask"]) for region in regions]),
            defects=[region["defect"] for region in regions],
            captions=[region["caption"] for region in regions],
        )


def open_region_split(dataset_dir: str | Path, split: str):
    from datasets import load_from_disk

    dataset = load_from_disk(str(dataset_dir))
    if split not in dataset:
        raise AlphaClipError(f"{dataset_dir} has no split {split!r}; it has {sorted(dataset)}.")
    return dataset[split]


@dataclass
class RegionTable:
    """Every region of a split, resized to the model input once, for fast training.

    `images` (M x 3 x H x W uint8) holds each image once; region r is image `region_image[r]` with
    mask coverage `coverage[r]` (H x W uint8, 255 = fully inside) and caption
    `captions[caption_index[r]]`.
    """

    images: torch.Tensor
    region_image: torch.Tensor
    coverage: torch.Tensor
    caption_index: torch.Tensor
    captions: list[str]
    region_object: list[str] = field(default_factory=list)
    region_defect: list[str] = field(default_factory=list)


def _to_uint8(tensor: torch.Tensor) -> torch.Tensor:
    return (tensor * 255.0).round().clamp(0, 255).to(torch.uint8)


def load_region_table(dataset_dir: str | Path, split: str, preprocess: Preprocess) -> RegionTable:
    """Decode a split and resize images (preprocess interpolation) and masks (coverage) to the model size."""
    images, region_image, coverage, caption_ids = [], [], [], []
    captions: dict[str, int] = {}
    objects, defects = [], []
    for record in iter_region_records(dataset_dir, split):
        images.append(_to_uint8(resize(record.image, preprocess.size, preprocess.interpolation)))
        coverage.append(_to_uint8(mask_coverage(record.masks, preprocess.size)))
        for caption, defect in zip(record.captions, record.defects):
            region_image.append(len(images) - 1)
            caption_ids.append(captions.setdefault(caption, len(captions)))
            objects.append(record.object)
            defects.append(defect)
    if not images:
        raise AlphaClipError(f"Split {split!r} of {dataset_dir} has no regions to train on.")
    return RegionTable(
        images=torch.stack(images), region_image=torch.tensor(region_image), coverage=torch.cat(coverage),
        caption_index=torch.tensor(caption_ids), captions=list(captions), region_object=objects, region_defect=defects,
    )



CANDIDATES_FILE = "candidates.json"  # written beside the dataset by `python -m hub.datasets build`


def read_dataset_candidates(dataset_dir: str | Path) -> dict[str, list[str]]:
    """{object: [candidate captions]} stored with a split-mask caption dataset."""
    path = Path(dataset_dir) / CANDIDATES_FILE
    if not path.is_file():
        raise AlphaClipError(f"{path} not found: build the dataset with `python -m hub.datasets build`, which writes it.")
    candidates = read_json(path)
    if not isinstance(candidates, dict) or not all(isinstance(v, list) and v for v in candidates.values()):
        raise AlphaClipError(f"{path} must map each object to a non-empty list of captions.")
    return {str(name): [str(c) for c in captions] for name, captions in candidates.items()}
