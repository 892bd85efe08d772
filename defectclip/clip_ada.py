"""CLIP-ADA: a learnable text prompt, a linear patch projection and anomaly-region refinement.

The vision and text towers stay frozen. What trains (0.4M parameters per step with ViT-B-16):
- one linear projection per prediction step, from the chosen feature stage's channels to the text dim;
- `n_ctx` context vectors that replace placeholder tokens inside one prompt template shared by every
  category ("a photo of a [ctx] with defects for anomaly detection"), CoOp-style;
- the scale (inverse temperature) of the cosine similarity.

Step 0 predicts the coarse map: sigmoid(scale * cos(projected patch feature, prompt embedding)). Each
refinement step multiplies the input image by the previous step's map (upsampled to the image), encodes it
again and predicts with its own projection. Training minimises BCE(coarse) + lambda * sum BCE(refined) on
synthetic anomalies; inference takes the last step's map, upsamples it to the input image, smooths it with a
Gaussian and scores the image by the mean of the top-K map values.

Optionally (`self_similarity` in the config, set by `fit_self_similarity`) the map is blended with a
training-free one: how unlike the rest of its own image each patch is (defectclip.scoring.self_similarity).
What a head learned on one object carries over to another only in part; the blend is for the new products
the reference-free mode exists for (clip_ada_transfer.md). With `flip_views` > 1 CLIP-ADA's map is the mean
of the maps of the image's mirror images (and with 8 of the same transposed), each taken back; the blend's
statistics and the threshold are then fitted on such averaged maps.

Artifact: `config.json` (tower specs, layer, prompt, refinement steps, preprocessing, threshold, blend) plus
`model.safetensors` with only the trainable tensors; the frozen towers are rebuilt from their specs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from .data.images import image_to_tensor
from .data.transforms import Preprocess, build_transform
from .artifacts import Artifact
from .errors import ArtifactError
from .io import read_json_object, read_safetensors, unknown_keys, write_json_atomic
from .results import AnomalyResult
from .scoring.blend import check_statistics, on_first_scale, pixel_sample
from .towers import TextTower, Tokens, TowerError, VisionTower, build_text_tower, build_vision_tower

MODEL_TYPE = "clip_ada"
FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

CTX_SLOT = "[ctx]"
DEFAULT_TEMPLATE = f"a photo of a {CTX_SLOT} with defects for anomaly detection"
DEFAULT_TOWER = "open_clip:ViT-B-16/laion400m_e32"
CTX_INITS = ("random", "word")
# Two different single-token words: tokenizing the template once with each and comparing the ids finds the
# slots without knowing the tokenizer's special tokens or how it splits the rest of the template.
PLACEHOLDER_WORDS = ("x", "z")
# CoOp's initialisation of random context vectors: small next to the word embeddings around them.
CTX_INIT_STD = 0.02
# Why a scale, and why learnable: a cosine lies in [-1, 1], so sigmoid(cos) alone stays in [0.27, 0.73]; BCE
# could never push normal pixels towards 0 and the maps would stay low-contrast. How sharp the map should be
# depends on the tower and layer (how far apart a linear projection can push normal and defective patches),
# so the scale is learned -- one scalar -- starting at CLIP's own 1 / 0.07 and clamped to [1, 100] like CLIP's
# logit scale. A global scale does not change AUROC/AP rankings, but it does change the threshold and the
# refinement input (the sigmoid map multiplies the image), which is why it is not left at 1.
DEFAULT_SCALE = 1.0 / 0.07
MIN_SCALE, MAX_SCALE = 1.0, 100.0
# The paper's K = 500 is for 256 x 256 images; other sizes keep the same fraction of the image area.
TOP_K_REFERENCE_AREA = 256 * 256
# How many mirror images of the input a map is averaged over (`flip_views`): the image itself, then its
# left-right, top-bottom and both-ways mirrors, then (8) the same four transposed (rows become columns: the
# quarter turns and the diagonal mirrors), in that order. Each view is a full pass of the head.
FLIP_VIEWS = (1, 2, 4, 8)


@dataclass
class ClipADAConfig:
    """Everything needed to rebuild a model before its weights are loaded."""

    vision: str = DEFAULT_TOWER
    text: str = DEFAULT_TOWER
    layer: str | None = None  # vision stage name; None = the tower's middle stage
    n_ctx: int = 4
    template: str = DEFAULT_TEMPLATE
    learnable_prompt: bool = True
    ctx_init: str = "random"  # "random" (CoOp) or "word": every slot starts as ctx_word's embedding
    ctx_word: str = "object"  # what the fixed prompt puts in the slot, and the "word" initialisation
    refine_steps: int = 1
    image_size: list[int] | None = None  # [height, width]; None = the vision tower's native size
    learnable_scale: bool = True
    scale: float = DEFAULT_SCALE  # initial value when learnable, the constant otherwise
    sigma: float = 4.0  # Gaussian smoothing of the full-resolution map, in pixels
    top_k: int = 500  # at a 256 x 256 input image; scaled with the input image's area
    threshold: float = 0.5
    self_similarity: dict | None = None  # SelfSimilarityBlend fields; None = CLIP-ADA's map alone
    # The map averaged over this many mirror images of the input (FLIP_VIEWS), each mirrored back. A linear
    # head on a CNN's patches is not mirror-invariant, so the views disagree where the head is unsure and
    # their mean is a steadier map: trained on magnetic tile, never-seen steel strip pixel AUROC 76.3 with one
    # view, 77.9 with the four mirrors, 81.6 with the transposes too (clip_ada_transfer.md, session 20, three
    # seeds). 1 (older configs) = the image alone.
    flip_views: int = 1

    def __post_init__(self) -> None:
        if self.n_ctx < 1:
            raise ValueError(f"n_ctx must be at least 1, got {self.n_ctx}")
        if self.template.count(CTX_SLOT) != 1:
            raise ValueError(f"template must contain {CTX_SLOT!r} exactly once, got {self.template!r}")
        if self.ctx_init not in CTX_INITS:
            raise ValueError(f"ctx_init must be one of {CTX_INITS}, got {self.ctx_init!r}")
        if self.refine_steps not in (0, 1, 2):
            raise ValueError(f"refine_steps must be 0, 1 or 2, got {self.refine_steps}")
        if not MIN_SCALE <= self.scale <= MAX_SCALE:
            raise ValueError(f"scale must be in [{MIN_SCALE}, {MAX_SCALE}], got {self.scale}")
        if self.flip_views not in FLIP_VIEWS:
            raise ValueError(f"flip_views must be one of {FLIP_VIEWS}, got {self.flip_views}")
        if self.top_k < 1 or self.sigma < 0:
            raise ValueError(f"top_k must be >= 1 and sigma >= 0, got {self.top_k} and {self.sigma}")
        if self.image_size is not None:
            self.image_size = _as_size(self.image_size)
        if self.self_similarity is not None:
            SelfSimilarityBlend(**self.self_similarity)  # unknown keys or bad values fail here, not at predict

    @classmethod
    def from_dict(cls, data: dict) -> "ClipADAConfig":
        unknown, known = unknown_keys(cls, data)
        if unknown:
            raise ValueError(f"Unknown CLIP-ADA config keys {unknown}; known keys: {sorted(known)}")
        return cls(**data)


def _as_size(size: int | Sequence[int]) -> list[int]:
    pair = [int(size)] * 2 if isinstance(size, (int, np.integer)) else [int(s) for s in size]
    if len(pair) != 2 or min(pair) < 1:
        raise ValueError(f"image_size must be [height, width] with positive values, got {size}")
    return pair


@dataclass
class SelfSimilarityBlend:
    """How CLIP-ADA's map and the self-similarity map are added.

    Each map is put in standard deviations of its pixels over the images the model was fitted on (a new
    object is read on the training object's scale: no label and no image of the new product needed; on
    the development objects the new object's own statistics gave the same AUROC), CLIP-ADA's probability
    as a logit. Equal weights: nothing on a held-out object could choose others. Their mean is put back on
    CLIP-ADA's own logit scale (its fitted mean and spread) and through the sigmoid, so the blend keeps the
    (0, 1) probability scale that the threshold, the app's slider and its legend use, without saturating:
    a plain sigmoid of the sum put every image's top pixels at 1.0.
    """

    image_size: int
    clip_mean: float
    clip_std: float
    self_mean: float
    self_std: float
    mirrors: bool = True  # the self-similarity map also looks at the image's mirror images

    def __post_init__(self) -> None:
        check_statistics(self.image_size, [self.clip_mean, self.self_mean], [self.clip_std, self.self_std])

    @classmethod
    def fitted(cls, image_size: int, mirrors: bool, clip_maps: Sequence[np.ndarray],
               self_maps: Sequence[np.ndarray]) -> "SelfSimilarityBlend":
        clip = pixel_sample(logit(m) for m in clip_maps)
        similar = pixel_sample(self_maps)
        return cls(int(image_size), float(clip.mean()), float(clip.std()) or 1.0,
                   float(similar.mean()), float(similar.std()) or 1.0, bool(mirrors))

    def blend(self, probability_map: np.ndarray, self_map: np.ndarray) -> np.ndarray:
        blended = on_first_scale(logit(probability_map), self.clip_mean, self.clip_std, self_map, self.self_mean, self.self_std)
        return (1.0 / (1.0 + np.exp(-blended))).astype(np.float32)


def logit(probability_map: np.ndarray) -> np.ndarray:
    """log(p / (1 - p)), p kept inside [1e-4, 1 - 1e-4] (float32 sigmoids saturate to exactly 0 or 1)."""
    p = np.clip(np.asarray(probability_map, dtype=np.float64), 1e-4, 1 - 1e-4)
    return np.log(p / (1 - p))


# --------------------------------------------------------------------------------------------------
# frozen towers that never enter a state dict


class FrozenTowers(nn.Module):
    """The vision and text towers: frozen, always in eval mode, and left out of state dicts.

    They are rebuilt from their spec strings, so checkpoints and artifacts carry only what trains (KBs, not
    the towers' hundreds of MB). They are still registered submodules, so `.to()` and Accelerate's device
    placement move them with the rest of the model.
    """

    def __init__(self, vision: VisionTower, text: TextTower):
        super().__init__()
        self.vision = vision
        self.text = text
        self.requires_grad_(False)
        self.eval()
        self._load_prefix = ""
        self.register_state_dict_post_hook(_drop_keys_under_prefix)
        self.register_load_state_dict_pre_hook(_remember_load_prefix)
        self.register_load_state_dict_post_hook(_forgive_missing_tower_keys)

    def train(self, mode: bool = True) -> "FrozenTowers":
        # Dropout or batch-norm statistics updates would change the "frozen" features while training.
        return super().train(False)


def _drop_keys_under_prefix(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    for key in [k for k in state_dict if k.startswith(prefix)]:
        del state_dict[key]


def _remember_load_prefix(module: FrozenTowers, state_dict, prefix: str, *args) -> None:
    # The post-hook below is not told where in the model this module sits; this pre-hook is.
    module._load_prefix = prefix


def _forgive_missing_tower_keys(module: FrozenTowers, incompatible) -> None:
    prefix = module._load_prefix
    incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if not k.startswith(prefix)]


# --------------------------------------------------------------------------------------------------
# prompts


def locate_slots(text: TextTower, template: str, n_ctx: int) -> tuple[Tokens, int]:
    """Tokenize `template` with n_ctx placeholder words in its slot; return the tokens and the first slot.

    The template is tokenized twice, with two different single-token placeholder words; the positions where
    the ids differ are the slots. That works for any tokenizer (CLIP BPE, BERT WordPiece) and notices a
    slot the tokenizer truncated away.
    """
    filled = [text.tokenize([template.replace(CTX_SLOT, " ".join([word] * n_ctx))]) for word in PLACEHOLDER_WORDS]
    first, second = filled[0].input_ids[0], filled[1].input_ids[0]
    slots = torch.nonzero(first != second).flatten().tolist() if first.shape == second.shape else []
    if len(slots) != n_ctx or slots != list(range(slots[0], slots[0] + n_ctx)):
        raise ValueError(
            f"{text.spec}: expected {n_ctx} consecutive context slots in {template!r}, found positions {slots} "
            "(was the template cut off at the tokenizer's maximum length?)"
        )
    return filled[0], slots[0]


def word_token_ids(text: TextTower, word: str) -> list[int]:
    """The ids of `word`'s own tokens: those of `tokenize([word])` minus special tokens and padding."""
    empty = text.tokenize([""])
    specials = set(empty.input_ids[0][empty.attention_mask[0].bool()].tolist())
    tokens = text.tokenize([word])
    ids = [i for i in tokens.input_ids[0][tokens.attention_mask[0].bool()].tolist() if i not in specials]
    if not ids:
        raise ValueError(f"{text.spec}: {word!r} tokenizes to no word tokens.")
    return ids


class LearnablePrompt(nn.Module):
    """`n_ctx` trainable vectors that replace the slot's placeholder token embeddings in the template."""

    def __init__(self, text: TextTower, template: str, n_ctx: int, ctx_init: str, ctx_word: str):
        super().__init__()
        tokens, start = locate_slots(text, template, n_ctx)
        self.start, self.n_ctx = start, n_ctx
        with torch.no_grad():
            embeds = text.token_embedding(tokens.input_ids)
        # Not persistent: all three are rebuilt from the template and the tower.
        self.register_buffer("input_ids", tokens.input_ids, persistent=False)
        self.register_buffer("attention_mask", tokens.attention_mask, persistent=False)
        self.register_buffer("template_embeds", embeds, persistent=False)
        self.ctx = nn.Parameter(self.initial_context(text, n_ctx, embeds.shape[-1], ctx_init, ctx_word))

    @staticmethod
    def initial_context(text: TextTower, n_ctx: int, width: int, ctx_init: str, ctx_word: str) -> torch.Tensor:
        if ctx_init == "word":
            with torch.no_grad():
                vector = text.token_embedding(torch.tensor(word_token_ids(text, ctx_word))).mean(0)
            return vector.repeat(n_ctx, 1).clone()
        return torch.randn(n_ctx, width) * CTX_INIT_STD

    def forward(self, text: TextTower) -> torch.Tensor:
        """The prompt's L2-normalised text embedding (dim,), differentiable in the context vectors."""
        before = self.template_embeds[:, : self.start]
        after = self.template_embeds[:, self.start + self.n_ctx :]
        embeds = torch.cat([before, self.ctx[None].to(before.dtype), after], dim=1)
        return text.encode_tokens(Tokens(self.input_ids, self.attention_mask), inputs_embeds=embeds)[0]


class FixedPrompt(nn.Module):
    """The ablation: the template with `ctx_word` in the slot, encoded once; nothing trains."""

    def __init__(self, text: TextTower, template: str, ctx_word: str):
        super().__init__()
        self.sentence = template.replace(CTX_SLOT, ctx_word)
        self.register_buffer("embedding", text.encode([self.sentence])[0], persistent=False)

    def forward(self, text: TextTower) -> torch.Tensor:
        return self.embedding


# --------------------------------------------------------------------------------------------------
# the model


def default_layer(vision: VisionTower) -> str:
    """The middle stage: deep enough for context, shallow enough for detail (the paper's argument)."""
    names = vision.stage_names
    return names[len(names) // 2]


def top_k_for(height: int, width: int, reference_k: int = 500) -> int:
    """K for an H x W map: `reference_k` at 256 x 256, scaled with the area, at least 1."""
    return max(1, round(reference_k * height * width / TOP_K_REFERENCE_AREA))


def top_k_mean(anomaly_map: np.ndarray | torch.Tensor, k: int) -> float:
    """The mean of the k largest values (all values when the map has fewer than k)."""
    values = torch.as_tensor(np.asarray(anomaly_map)).flatten().float()
    return float(torch.topk(values, min(k, values.numel())).values.mean())


class ClipADA(Artifact, nn.Module):
    """CLIP-ADA on frozen towers; see the module docstring. Build with `ClipADA(config)` or `ClipADA.from_pretrained`."""

    hub_files = (CONFIG_NAME, WEIGHTS_NAME)
    card_kind = "clip_ada"

    def __init__(self, config: ClipADAConfig, vision: VisionTower | None = None, text: TextTower | None = None):
        super().__init__()
        vision = vision if vision is not None else build_vision_tower(config.vision)
        text = text if text is not None else build_text_tower(config.text)
        if (vision.spec, text.spec) != (config.vision, config.text):
            raise ValueError(
                f"Towers {vision.spec!r} / {text.spec!r} were passed for a config naming {config.vision!r} / {config.text!r}."
            )
        self.config = config
        self.layer = config.layer or default_layer(vision)
        if self.layer not in vision.stages:
            raise ValueError(f"Layer {self.layer!r} is not a stage of {vision.spec}; choose one of {vision.stage_names}.")
        self.preprocess = self._preprocess_for(vision, config.image_size)
        self.towers = FrozenTowers(vision, text)
        self.prompt = self._build_prompt(text, config)
        channels = vision.stages[self.layer].channels
        # One projection per prediction step; the paper's refinement layers do not share weights.
        self.projections = nn.ModuleList(nn.Linear(channels, text.dim) for _ in range(1 + config.refine_steps))
        log_scale = torch.tensor(math.log(config.scale))
        if config.learnable_scale:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale, persistent=False)
        self.transform = build_transform(self.preprocess)
        self._similarity = None  # built on first use from the frozen vision tower (not a submodule, no weights)

    @staticmethod
    def _preprocess_for(vision: VisionTower, image_size: list[int] | None) -> Preprocess:
        preprocess = vision.preprocess if image_size is None else vision.preprocess.with_size(tuple(image_size))
        if vision.is_vit and tuple(preprocess.size) != tuple(vision.preprocess.size):
            # A ViT's position embeddings are fixed to its native grid; other sizes would fail inside it.
            raise ValueError(f"{vision.spec} is a ViT and runs at its native size {vision.preprocess.size} only.")
        return preprocess

    @staticmethod
    def _build_prompt(text: TextTower, config: ClipADAConfig) -> nn.Module:
        if config.learnable_prompt:
            return LearnablePrompt(text, config.template, config.n_ctx, config.ctx_init, config.ctx_word)
        return FixedPrompt(text, config.template, config.ctx_word)

    # -------------------------------------------------------------------------------- the forward pass

    @property
    def refine_steps(self) -> int:
        return len(self.projections) - 1

    @property
    def threshold(self) -> float:
        """The decision threshold on image scores (and map values), saved in config.json; every scorer
        the app lists has one, so the reference-free model answers like PatchCore and PaDiM."""
        return float(self.config.threshold)

    @threshold.setter
    def threshold(self, value: float) -> None:
        self.config.threshold = float(value)

    @property
    def scale(self) -> torch.Tensor:
        return self.log_scale.exp().clamp(MIN_SCALE, MAX_SCALE)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())

    def text_embedding(self) -> torch.Tensor:
        return self.prompt(self.towers.text)

    def stage_features(self, images: torch.Tensor) -> torch.Tensor:
        """The frozen tower's chosen stage, N x C x h x w. No gradient: nothing before it trains."""
        with torch.no_grad():
            return self.towers.vision.forward_features(images, [self.layer])[self.layer]

    def similarity_logits(self, features: torch.Tensor, step: int, text: torch.Tensor) -> torch.Tensor:
        """scale * cos(projected patch, text) -> N x h x w logits (the sigmoid comes in the loss / maps)."""
        projected = self.projections[step](features.permute(0, 2, 3, 1).to(self.projections[step].weight.dtype))
        return self.scale * (F.normalize(projected, dim=-1) @ text.to(projected.dtype))

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Normalised N x 3 x H x W model inputs -> logits N x h x w per step, coarse first, refined last.

        Each refinement step multiplies the (normalised) input by the previous map: suppressed pixels become
        the dataset mean, a neutral input, rather than black, which is itself a strong pattern. The map is
        detached there: the coarse head has its own loss, and not back-propagating through the frozen image
        encoder keeps training at one forward pass per step and no encoder activations in memory.
        """
        text = self.text_embedding()
        logits = [self.similarity_logits(self.stage_features(images), 0, text)]
        for step in range(1, self.refine_steps + 1):
            attention = upsample(torch.sigmoid(logits[-1].detach()), images.shape[-2:])
            logits.append(self.similarity_logits(self.stage_features(images * attention[:, None]), step, text))
        return logits

    # -------------------------------------------------------------------------------- inference

    @torch.no_grad()
    def probability_maps(self, images: Sequence[np.ndarray | torch.Tensor], batch_size: int = 8) -> list[torch.Tensor]:
        """The last step's sigmoid map at feature resolution (h x w) for each image, any input sizes."""
        self.eval()
        device = self.log_scale.device
        maps = []
        for start in range(0, len(images), batch_size):
            batch = torch.stack([self.transform(image_to_tensor(im)) for im in images[start : start + batch_size]])
            maps.extend(torch.sigmoid(self(batch.to(device))[-1]).float().cpu())
        return maps

    def smooth(self, full_map: np.ndarray) -> np.ndarray:
        """An H x W map at the input image's size, Gaussian-smoothed (sigma 0: as it is)."""
        return gaussian_filter(full_map, sigma=self.config.sigma) if self.config.sigma > 0 else full_map

    def image_score(self, anomaly_map: np.ndarray) -> float:
        return top_k_mean(anomaly_map, top_k_for(*anomaly_map.shape, self.config.top_k))

    @property
    def blend(self) -> SelfSimilarityBlend | None:
        """The self-similarity blend saved in the config, if any."""
        settings = self.config.self_similarity
        return None if settings is None else SelfSimilarityBlend(**settings)

    def similarity(self, image_size: int, mirrors: bool = True):
        """The self-similarity maker on this model's frozen vision tower (defectclip.scoring.self_similarity)."""
        from .scoring.self_similarity import SelfSimilarity

        current = self._similarity
        if current is None or (current.image_size, current.mirrors) != (image_size, mirrors):
            self._similarity = SelfSimilarity(self.towers.vision, image_size, mirrors, device=self.log_scale.device)
        return self._similarity

    def clip_maps(self, images: Sequence[np.ndarray | torch.Tensor], batch_size: int = 8) -> list[np.ndarray]:
        """CLIP-ADA's own probability maps at each image's size (no blend), each the mean over the
        config's `flip_views` mirror images of the input, mirrored back."""
        views = self.config.flip_views
        mirrored = [mirror(image, view) for image in images for view in range(views)]
        # Upsampling and the Gaussian are linear and commute with flips and transposes, so the views are
        # averaged at full size first and smoothed once, not once per view (the same map to float rounding).
        full = [upsample(prob[None], image_size_of(image))[0].numpy() for image, prob in zip(mirrored, self.probability_maps(mirrored, batch_size))]
        return [self.smooth(np.mean([unmirror(full[start + view], view) for view in range(views)], axis=0).astype(np.float32))
                for start in range(0, len(full), views)]

    def predict(self, images: Sequence[np.ndarray | torch.Tensor], batch_size: int = 8) -> list[AnomalyResult]:
        """Images (3 x H x W float in [0, 1], or H x W x 3 uint8), any sizes -> one AnomalyResult each."""
        images = list(images)
        maps = self.clip_maps(images, batch_size)
        blend = self.blend
        if blend is not None:
            similarity = self.similarity(blend.image_size, blend.mirrors)
            maps = [blend.blend(m, similarity.map(image)) for m, image in zip(maps, images)]
        return [AnomalyResult.from_map(m, self.image_score(m), self.config.threshold) for m in maps]

    def fit_self_similarity(self, images: Sequence[np.ndarray | torch.Tensor], image_size: int | None = None,
                            mirrors: bool = True, batch_size: int = 8) -> SelfSimilarityBlend:
        """Blend self-similarity into every later map, on the scale of these images' maps (the images the
        model was trained on, defective ones included: no label is read). Recalibrate the threshold after."""
        from .scoring.self_similarity import DEFAULT_IMAGE_SIZE

        images = list(images)
        if not images:
            raise ValueError("fit_self_similarity needs at least one image of the product the model was trained on.")
        similarity = self.similarity(int(image_size or DEFAULT_IMAGE_SIZE), mirrors)
        blend = SelfSimilarityBlend.fitted(similarity.image_size, mirrors, self.clip_maps(images, batch_size),
                                           [similarity.map(image) for image in images])
        self.config.self_similarity = asdict(blend)
        return blend

    def calibrate_threshold(self, normal_images: Sequence, quantile: float = 0.99, batch_size: int = 8) -> float:
        """Set the threshold to a high quantile of the image scores of defect-free images; return it.

        Scores are top-K means of the map, so the same value also serves as the pixel threshold of the mask.
        Without normal images the threshold stays at the sigmoid's midpoint, 0.5.
        """
        if not 0 < quantile <= 1:
            raise ValueError(f"quantile must be in (0, 1], got {quantile}")
        normal_images = list(normal_images)
        if normal_images:
            scores = [r.score for r in self.predict(normal_images, batch_size)]
            self.config.threshold = float(np.quantile(scores, quantile))
        return self.config.threshold

    def calibrate_synthetic(self, normal_images: Sequence[np.ndarray], seed: int = 0, batch_size: int = 8) -> str:
        """Set the threshold the way few-shot PatchCore sets its own: between the scores of the normal
        images and of NSA / CutPaste defects made from them (defectclip.scoring.few_shot.place_threshold).
        Needs no labelled defect; returns the rule that placed it."""
        from .scoring.few_shot import place_threshold, synthetic_copies

        normal_images = list(normal_images)
        if not normal_images:
            raise ValueError("calibrate_synthetic needs at least one defect-free image of the product.")
        normal = [r.score for r in self.predict(normal_images, batch_size)]
        defective = [r.score for r in self.predict(synthetic_copies(normal_images, seed), batch_size)]
        self.config.threshold, rule = place_threshold(normal, defective)
        return rule

    # -------------------------------------------------------------------------------- saving and loading

    def config_dict(self) -> dict:
        resolved = asdict(self.config) | {"layer": self.layer, "image_size": list(self.preprocess.size)}
        return {
            "model_type": MODEL_TYPE,
            "format_version": FORMAT_VERSION,
            "trainable_parameters": self.num_trainable_parameters(),
            "preprocess": self.preprocess.to_dict(),
            "config": resolved,
        }

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        # state_dict() holds exactly the trainable tensors: the towers drop themselves, buffers are transient.
        return {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}

    def _write_artifact(self, folder: Path, **options) -> None:
        from safetensors.torch import save_file

        write_json_atomic(folder / CONFIG_NAME, self.config_dict())
        save_file(self.trainable_state_dict(), str(folder / WEIGHTS_NAME), metadata={"format": "pt"})

    @classmethod
    def _read_artifact(cls, folder: Path, device: str | torch.device = "cpu",
                       vision: VisionTower | None = None, text: TextTower | None = None,
                       root: str | Path | None = None, allow_absolute_tower: bool = True) -> "ClipADA":
        """Strict about missing or unexpected keys. `vision` / `text` reuse towers already built from the same
        specs (the app and tests save rebuilds). The config is checked (types, ranges, finite numbers) before
        anything is built; a `local-dir:` tower must lie inside `root` (default: the folder), see
        `defectclip.schema.confine_local_dir`.
        """
        saved = read_json_object(folder / CONFIG_NAME, "a CLIP-ADA")
        if saved.get("model_type") != MODEL_TYPE:
            raise ArtifactError(f"{folder} holds a {saved.get('model_type')!r} model, not {MODEL_TYPE!r}.")
        config = check_saved_config(saved, folder, root, allow_absolute_tower)
        try:
            model = cls(config, vision=vision, text=text)
        except (ArtifactError, TowerError):
            raise
        except Exception as err:  # noqa: BLE001 - a damaged bundled tower fails inside timm / json
            raise ArtifactError(f"Cannot build the CLIP-ADA model of {folder}: {type(err).__name__}: {err}") from err
        if "preprocess" in saved:
            model.preprocess = Preprocess.from_dict(saved["preprocess"])
            model.transform = build_transform(model.preprocess)
        model.load_trainable(folder / WEIGHTS_NAME)
        return model.to(device).eval()

    def load_trainable(self, weights: Path) -> None:
        if not weights.is_file():
            raise ArtifactError(f"{weights} not found: a CLIP-ADA artifact needs {WEIGHTS_NAME}.")
        state = read_safetensors(weights)
        expected = self.state_dict()
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ArtifactError(f"{weights} does not match the config: missing keys {missing}, unexpected keys {unexpected}.")
        wrong = [f"{k} {tuple(v.shape)} vs {tuple(expected[k].shape)}" for k, v in state.items() if v.shape != expected[k].shape]
        if wrong:
            raise ArtifactError(f"{weights} has tensors of the wrong shape for its config: {wrong[:5]}.")
        self.load_state_dict(state, strict=True)


def check_saved_config(saved: dict, folder: Path, root: str | Path | None, allow_absolute_tower: bool) -> ClipADAConfig:
    """A saved CLIP-ADA config.json -> ClipADAConfig, every entry checked; tower specs confined to the artifact."""
    from .schema import MAX_MODEL_SIDE, MAX_SIGMA, Config, check_preprocess, confine_local_dir

    path = folder / CONFIG_NAME
    outer = Config(saved, path)
    outer.number("format_version", FORMAT_VERSION, FORMAT_VERSION, integer=True)
    if "preprocess" in saved:
        check_preprocess(outer.sub("preprocess"))
    inner = outer.sub("config")
    inner.only_keys(f.name for f in fields(ClipADAConfig))
    data = dict(inner.data)
    for role in ("vision", "text"):
        if role in data:
            data[role] = confine_local_dir(data[role], folder, root, allow_absolute=allow_absolute_tower, where=f"{role} tower")
    checks = {
        "n_ctx": lambda k: inner.number(k, 1, 64, integer=True),
        "refine_steps": lambda k: inner.number(k, 0, 2, integer=True),
        "learnable_prompt": inner.boolean, "learnable_scale": inner.boolean,
        "scale": lambda k: inner.number(k, MIN_SCALE, MAX_SCALE),
        "sigma": lambda k: inner.number(k, 0.0, MAX_SIGMA),
        "top_k": lambda k: inner.number(k, 1, MAX_MODEL_SIDE**2, integer=True),
        "threshold": lambda k: inner.number(k),
        "template": inner.string, "ctx_word": inner.string, "ctx_init": lambda k: inner.string(k, CTX_INITS),
        "layer": lambda k: inner.string(k, optional=True),
        "image_size": lambda k: None if data[k] is None else inner.numbers(k, 2, 1, MAX_MODEL_SIDE, integer=True),
        "self_similarity": lambda k: None if data[k] is None else check_blend(inner.sub(k), MAX_MODEL_SIDE),
        "flip_views": lambda k: inner.number(k, 1, max(FLIP_VIEWS), integer=True),
    }
    for key, check in checks.items():
        if key in data:
            check(key)
    try:
        return ClipADAConfig.from_dict(data)
    except (ValueError, TypeError) as err:
        raise ArtifactError(f"{path}: {err}") from err


def check_blend(blend, max_side: int) -> None:
    """A saved self-similarity blend: exactly its fields, finite numbers, positive spreads."""
    blend.only_keys(f.name for f in fields(SelfSimilarityBlend))
    blend.number("image_size", 32, max_side, integer=True)
    for key in ("clip_mean", "self_mean"):
        blend.number(key)
    for key in ("clip_std", "self_std"):
        blend.number(key, 0, low_open=True)
    if "mirrors" in blend.data:
        blend.boolean("mirrors")


def mirror(image: np.ndarray | torch.Tensor, view: int) -> np.ndarray | torch.Tensor:
    """View 0: the image itself; 1: mirrored left-right; 2: top-bottom; 3: both; 4-7: views 0-3, then
    transposed. A 3 x H x W tensor, an H x W x 3 array or an H x W map; `unmirror` takes a view's map back."""
    flipped = _flip(image, view % 4)
    return _transpose(flipped) if view >= 4 else flipped


def unmirror(view_map: np.ndarray | torch.Tensor, view: int) -> np.ndarray | torch.Tensor:
    """The inverse of `mirror`: a map made on view `view` back on the image's own grid (each flip is its own
    inverse, and so is the transpose, but a transposed flip is undone in the other order)."""
    return _flip(_transpose(view_map) if view >= 4 else view_map, view % 4)


def _flip(image: np.ndarray | torch.Tensor, flips: int) -> np.ndarray | torch.Tensor:
    if flips == 0:
        return image
    if isinstance(image, torch.Tensor):
        return image.flip({1: [-1], 2: [-2], 3: [-2, -1]}[flips])
    return np.ascontiguousarray({1: image[:, ::-1], 2: image[::-1], 3: image[::-1, ::-1]}[flips])


def _transpose(image: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """Rows become columns: the last two axes of a tensor (3 x H x W), the first two of an array (H x W [x 3])."""
    if isinstance(image, torch.Tensor):
        return image.transpose(-2, -1).contiguous()
    return np.ascontiguousarray(np.swapaxes(image, 0, 1))


def image_size_of(image: np.ndarray | torch.Tensor) -> tuple[int, int]:
    """(H, W) of a 3 x H x W tensor or an H x W x 3 array."""
    return tuple(image.shape[-2:]) if isinstance(image, torch.Tensor) else tuple(image.shape[:2])


def upsample(maps: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """N x h x w -> N x H x W, bilinear."""
    return F.interpolate(maps[:, None], size=tuple(size), mode="bilinear", align_corners=False)[:, 0]


def clip_ada_loss(logits: Sequence[torch.Tensor], masks: torch.Tensor, refine_weight: float = 1.0) -> torch.Tensor:
    """BCE(coarse) + refine_weight * sum of BCE(refined steps), each against the pixel masks.

    The logits are upsampled to the masks' resolution (the training image size) rather than the masks
    shrunk to the feature grid: small defects would vanish from a nearest-neighbour 14 x 14 mask, and the
    upsampled map is what inference scores.
    """
    targets = masks.float()
    losses = [F.binary_cross_entropy_with_logits(upsample(step.float(), targets.shape[-2:]), targets) for step in logits]
    return losses[0] + refine_weight * sum(losses[1:], torch.zeros((), device=targets.device))
