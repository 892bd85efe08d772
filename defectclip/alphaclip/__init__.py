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

What the tower looks at for one region (a crop around it, with its mask) is made by `view.region_view`,
one function for training, evaluation and the app.

`AlphaDescriber` pairs that tower with a frozen text tower and ranks candidate captions for a region.
The package keeps one idea per module, as peft does: `config` (constants, the error), `alpha` (mask ->
alpha map, the alpha stem), `tower` (the alpha image tower), `lora` (LoRA targets), `checkpoint`
(official-checkpoint conversion) and `describer` (AlphaDescriber, an artifact).

A folder written by `save_pretrained` holds `describer_config.json`, `describer.safetensors` (alpha
conv, RGB conv, projection) and `adapter/` (PEFT LoRA, `PeftModel.save_pretrained` format), or, for a
merged export, `model.safetensors` with every weight of the image tower and no adapter.
"""

from .alpha import AlphaStem, alpha_context, coverage_to_alpha, mask_coverage, mask_to_alpha, zero_alpha_conv
from .checkpoint import load_alphaclip_checkpoint, official_to_tower_keys
from .config import (ADAPTER_DIR, ALPHA_MEAN, ALPHA_STD, CONFIG_NAME, DEFAULT_TEMPERATURE, FORMAT,
                     MERGED_WEIGHTS_NAME, OFFICIAL_WEIGHTS, WEIGHTS_NAME, AlphaClipError, UnknownObjectError)
from .describer import AlphaDescriber
from .lora import apply_lora, lora_config, lora_targets
from .tower import AlphaImageTower, build_alpha_tower
from .view import CONTEXT_SCALE, MIN_SIDE_PX, region_box, region_view, region_views, view_window

__all__ = [
    "ADAPTER_DIR", "ALPHA_MEAN", "ALPHA_STD", "CONFIG_NAME", "DEFAULT_TEMPERATURE", "FORMAT", "MERGED_WEIGHTS_NAME",
    "OFFICIAL_WEIGHTS", "WEIGHTS_NAME", "AlphaClipError", "AlphaDescriber", "AlphaImageTower", "AlphaStem",
    "alpha_context", "apply_lora", "build_alpha_tower", "load_alphaclip_checkpoint", "lora_config", "lora_targets",
    "mask_coverage", "mask_to_alpha", "official_to_tower_keys", "zero_alpha_conv",
    "CONTEXT_SCALE", "MIN_SIDE_PX", "UnknownObjectError", "coverage_to_alpha", "region_box", "region_view",
    "region_views", "view_window",
]
