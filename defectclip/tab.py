"""TAB: a vision trunk pretrained to align with frozen text vectors of normal and abnormal states.

Lee & Lai, "TAB: Text-Align Anomaly Backbone Model for Industrial Inspection Tasks", §3. A CNN trunk
plus a projection head maps each image to the text tower's space; normal images should land near
their object's normal class vector, synthetic anomalies (NSA by default) near the abnormal one. After
pretraining only the trunk is kept: downstream methods (PatchCore, PaDiM) use it as their backbone.

Artifact folder (`TABBackbone.save_pretrained`):
    config.json + model.safetensors   the trunk in timm's own format: `build_vision_tower("local-dir:<folder>")`
                                      and `timm.create_model("local-dir:<folder>", pretrained=True)` load it
    projection.safetensors            the projection head and the logit scale (a trunk kept without it
                                      still exports in timm format: see `read_trunk`)
    tab_config.json                   how it was trained (`TABConfig`)

Logits layout used by the losses: rows are [normal images; their synthetic-anomaly versions] (2B),
columns are [normal class vectors of the K objects; abnormal class vectors of the K objects] (2K).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import load_image_array, normalize
from .data.transforms import Preprocess
from .artifacts import Artifact
from .errors import DefectclipError
from .io import read_json, unknown_keys, write_json_atomic
from .prompts import PromptSettings
from .synth import SYNTHESES as SYNTHESIS_METHODS, synthesize
from .towers import VisionTower, build_vision_tower

CONFIG_NAME = "tab_config.json"
HEAD_WEIGHTS = "projection.safetensors"
LOSSES = ("joint", "paper", "state")
HEADS = ("linear", "mlp")
MIXED_SYNTHESIS = "mix"  # each pair draws one of NSA, CutPaste, Perlin
SYNTHESES = (*SYNTHESIS_METHODS, MIXED_SYNTHESIS)  # "nsa" (TAB's choice), "cutpaste", "perlin", "mix"
INIT_LOGIT_SCALE = math.log(1 / 0.07)  # CLIP's initial temperature
MAX_LOGIT_SCALE = math.log(100.0)  # CLIP's clamp: beyond 100 the softmax saturates and training stalls
SYNTHESIS_METHODS_ORDER = tuple(sorted(SYNTHESIS_METHODS))  # a fixed order: "mix" draws reproducibly
SYNTHESIS_TRIES = 3  # redraws when a synthesis changed no pixel (e.g. a flat patch on flat ground)


class TABError(DefectclipError):
    """A TAB model, loss or artifact that cannot work as asked; the message says why and what to do."""


# --------------------------------------------------------------------------------------------------
# configuration


@dataclass
class TABConfig:
    """Everything needed to rebuild a TABBackbone and to know how it was trained."""

    vision: str
    text: str
    objects: list[str]
    text_dim: int
    loss: str = "joint"
    head: str = "linear"
    image_size: int | None = None  # None: the trunk's own input size, filled in by TABBackbone.build
    synthesis: str = "nsa"
    prompts: dict = field(default_factory=lambda: PromptSettings().to_dict())
    step: int = 0
    # What it was pretrained on and how it was kept near its start (data roots, excluded objects,
    # frozen stages, distillation weight, the WiSE alpha and its validation): for cards and audits.
    recipe: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, value, allowed in (("loss", self.loss, LOSSES), ("head", self.head, HEADS),
                                     ("synthesis", self.synthesis, SYNTHESES)):
            if value not in allowed:
                raise TABError(f"Unknown {name} {value!r}; use one of {allowed}.")
        if not self.objects:
            raise TABError("A TAB model needs at least one object (category) name.")
        PromptSettings.from_dict(self.prompts)  # validates the prompt level early

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TABConfig":
        unknown, _ = unknown_keys(cls, data)
        if unknown:
            raise TABError(f"{CONFIG_NAME} has unknown keys {unknown}: written by a newer defectclip?")
        try:
            return cls(**data)
        except TypeError as err:
            raise TABError(f"{CONFIG_NAME} is incomplete: {err}") from err


# --------------------------------------------------------------------------------------------------
# the model


def build_head(kind: str, in_features: int, out_features: int) -> nn.Module:
    """Linear, or a two-layer MLP that can bend the trunk's space before the text alignment."""
    if kind == "linear":
        return nn.Linear(in_features, out_features)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(in_features, in_features), nn.GELU(), nn.Linear(in_features, out_features))
    raise TABError(f"Unknown head {kind!r}; use one of {HEADS}.")


class TABBackbone(Artifact, nn.Module):
    """Vision trunk + projection head to the text dimension + learnable logit scale.

    `forward(images)` -> unit-length embeddings (N, text_dim);
    `forward(images, text_vectors)` -> (embeddings, logits = scale * embeddings @ text_vectors.T).
    Returning the logits from `forward` keeps the logit scale inside the forward pass, which
    DistributedDataParallel needs to reduce its gradient like any other parameter's.
    """

    hub_files = ("config.json", "model.safetensors", HEAD_WEIGHTS, CONFIG_NAME)
    card_kind = "tab"

    def __init__(self, trunk: VisionTower, config: TABConfig):
        super().__init__()
        self.trunk = trunk
        self.config = config
        self.projection = build_head(config.head, trunk.num_features, config.text_dim)
        self.logit_scale = nn.Parameter(torch.tensor(INIT_LOGIT_SCALE))

    @classmethod
    def build(cls, config: TABConfig, trunk: VisionTower | None = None) -> "TABBackbone":
        """A fresh model: the trunk from its spec (pretrained weights where the spec has them) unless given."""
        trunk = trunk if trunk is not None else build_vision_tower(config.vision)
        if trunk.timm_args is None:
            raise TABError(f"{config.vision} is not a timm model; TAB trunks are saved in timm's format. "
                           "Use a timm CNN such as timm:resnet18, offline:efficientnet_lite0 or tiny:cnn.")
        config.image_size = int(config.image_size or trunk.preprocess.size[0])
        # The training size travels with the trunk, so whoever loads it resizes the same way.
        trunk.preprocess = trunk.preprocess.with_size(config.image_size)
        return cls(trunk, config)

    @property
    def preprocess(self) -> Preprocess:
        return self.trunk.preprocess

    def scale(self) -> torch.Tensor:
        return self.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.projection(self.trunk(images)).float(), dim=-1)

    def forward(self, images: torch.Tensor, text_vectors: torch.Tensor | None = None):
        embeddings = self.embed(images)
        if text_vectors is None:
            return embeddings
        return embeddings, self.scale() * embeddings @ text_vectors.float().t()

    # ---- saving and loading ----------------------------------------------------------------------

    def head_state_dict(self) -> dict[str, torch.Tensor]:
        """Projection head and logit scale: everything that is not the trunk."""
        return {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items() if not k.startswith("trunk.")}

    def load_head_state_dict(self, state: dict[str, torch.Tensor], source: str = HEAD_WEIGHTS) -> None:
        expected = set(self.head_state_dict())
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise TABError(f"{source} does not fit a {self.config.head!r} head: missing {missing}, "
                           f"unexpected {unexpected}.")
        try:
            self.load_state_dict(state, strict=False)  # strict=False only because the trunk is loaded apart
        except RuntimeError as err:  # same keys, other shapes: e.g. another text dimension
            raise TABError(f"{source} does not fit this model: {err}") from err

    def _write_artifact(self, folder: Path, step: int | None = None) -> None:
        from safetensors.torch import save_file

        if step is not None:
            self.config.step = int(step)
        self.trunk.save_pretrained(folder)
        save_file(self.head_state_dict(), str(folder / HEAD_WEIGHTS))
        write_json_atomic(folder / CONFIG_NAME, self.config.to_dict())

    @classmethod
    def _read_artifact(cls, folder: Path) -> "TABBackbone":
        from safetensors.torch import load_file

        config = TABConfig.from_dict(read_json(folder / CONFIG_NAME))
        head_path = folder / HEAD_WEIGHTS
        if not has_projection_head(folder):
            raise TABError(f"{head_path} not found: {folder} has no TAB projection head. A trunk kept without "
                           f"one still loads as a vision tower, build_vision_tower('local-dir:{folder}').")
        model = cls(build_vision_tower(f"local-dir:{folder}"), config)
        model.load_head_state_dict(load_file(str(head_path)), str(head_path))
        return model.eval()


def has_projection_head(folder: str | Path) -> bool:
    return (Path(folder) / HEAD_WEIGHTS).is_file()


def read_trunk(folder: str | Path) -> tuple[VisionTower, TABConfig]:
    """The trunk of a TAB folder and how it was trained, without the projection head.

    After pretraining only the trunk matters (PatchCore and PaDiM use its feature maps), so a folder may
    keep just the trunk and `tab_config.json`: the app's embedded default does, to stay small.
    """
    folder = Path(folder)
    config = TABConfig.from_dict(read_json(folder / CONFIG_NAME, "a TAB backbone"))
    return build_vision_tower(f"local-dir:{folder}"), config


# --------------------------------------------------------------------------------------------------
# losses


def check_loss(loss: str, num_classes: int) -> None:
    """Refuse a loss that cannot learn anything from `num_classes` objects, before any training."""
    if loss not in LOSSES:
        raise TABError(f"Unknown loss {loss!r}; use one of {LOSSES}.")
    if loss == "paper" and num_classes < 2:
        raise TABError(
            "The 'paper' loss (TAB Eq. 6) classifies each image among the K objects' vectors of one state; "
            f"with K = {num_classes} object that softmax has a single entry, so the loss is identically zero "
            "and nothing is learned. Use the 'joint' loss (normal vs abnormal vectors of every object), or "
            "pretrain on two or more categories."
        )


def _split_logits(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> int:
    batch = labels.shape[0]
    if logits.shape != (2 * batch, 2 * num_classes):
        raise TABError(f"Expected logits of shape (2B, 2K) = ({2 * batch}, {2 * num_classes}), "
                       f"got {tuple(logits.shape)}.")
    return batch


def paper_loss(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """TAB Eq. 6: CE of normal images over the K normal vectors plus CE of synthetic anomalies over the
    K abnormal vectors, against the object index; the mean of the two."""
    check_loss("paper", num_classes)
    batch = _split_logits(logits, labels, num_classes)
    normal = F.cross_entropy(logits[:batch, :num_classes], labels)
    abnormal = F.cross_entropy(logits[batch:, num_classes:], labels)
    return (normal + abnormal) / 2


def joint_loss(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """CE over all 2K vectors with target (object, state): unlike Eq. 6 it also pushes a normal image
    away from its own object's abnormal vector, which is the contrast anomaly detection needs, and it
    works with a single object."""
    _split_logits(logits, labels, num_classes)
    targets = torch.cat([labels, labels + num_classes])
    # Both halves have B rows, so the mean over 2B rows is the mean of the two halves' losses.
    return F.cross_entropy(logits, targets)


def state_loss(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Binary CE between each image's own object's normal and abnormal vectors: only the state is
    learned, never which object it is; with one object this equals the joint loss. It tests whether the
    object-naming part of Eq. 6 / the joint loss is what makes a multi-object trunk worse than its start
    on magnetic tile: it is not the whole story (benchmarks/results/tab_transfer.md, session 12)."""
    batch = _split_logits(logits, labels, num_classes)
    rows = torch.arange(2 * batch, device=logits.device)
    objects = torch.cat([labels, labels])
    own = torch.stack([logits[rows, objects], logits[rows, objects + num_classes]], dim=1)
    states = torch.cat([torch.zeros_like(labels), torch.ones_like(labels)])
    return F.cross_entropy(own, states)


LOSS_FUNCTIONS = {"paper": paper_loss, "joint": joint_loss, "state": state_loss}


def tab_loss(loss: str, logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    check_loss(loss, num_classes)
    return LOSS_FUNCTIONS[loss](logits, labels, num_classes)


def to_model_input(images: torch.Tensor, preprocess: Preprocess) -> torch.Tensor:
    """uint8 N x 3 x H x W (already at the model size) -> normalised float input.

    Batches travel as uint8, a quarter of float32's bytes, and are converted on the device.
    """
    return normalize(images.float().div_(255.0), preprocess)


def pair_loss(model: nn.Module, batch: dict, text_vectors: torch.Tensor, loss: str, preprocess: Preprocess) -> torch.Tensor:
    """The loss of one batch of (normal, synthetic anomaly) pairs; text_vectors = cat(normal, abnormal)."""
    images = to_model_input(torch.cat([batch["normal"], batch["anomalous"]]), preprocess)
    _, logits = model(images, text_vectors)
    return tab_loss(loss, logits, batch["label"], text_vectors.shape[0] // 2)


# --------------------------------------------------------------------------------------------------
# data: normal images and their synthetic anomalies


def resize_square(image: np.ndarray, size: int) -> np.ndarray:
    """H x W x 3 uint8 -> size x size; area averaging when shrinking avoids aliasing."""
    height, width = image.shape[:2]
    if (height, width) == (size, size):
        return image
    shrinking = size * size < height * width
    resized = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
    return resized.reshape(size, size, 3)


class SyntheticPairs(torch.utils.data.Dataset):
    """Pairs of (normal image resized to `image_size`, a synthetic anomaly made from it) + object index.

    The anomaly's second image (NSA / CutPaste source, Perlin texture) is another image of the same
    object. Synthesis runs here, in `__getitem__`, so DataLoader workers parallelise it, and its random
    numbers come from (seed, index, epoch): the same image in the same epoch gives the same pair in
    every run and after a resume, while each epoch sees new anomalies.

    Keys carry the epoch: key = epoch * len(self) + index (`EpochShuffle` makes them). Workers then
    learn the epoch with each key, which also works for persistent workers, whose copy of the dataset
    never sees attributes set in the main process after they started.
    """

    def __init__(self, paths: Sequence, labels: Sequence[int], image_size: int, synthesis: str, seed: int):
        if len(paths) != len(labels) or not paths:
            raise TABError("SyntheticPairs needs one label per image and at least one image.")
        if synthesis not in SYNTHESES:
            raise TABError(f"Unknown synthesis {synthesis!r}; use one of {SYNTHESES}.")
        # A file path, or a source with `load()` (defectclip.tab_sources: crops, generated textures).
        self.paths = [p if hasattr(p, "load") else Path(p) for p in paths]
        self.labels = [int(label) for label in labels]
        self.image_size = int(image_size)
        self.synthesis = synthesis
        self.seed = int(seed)
        self.by_label: dict[int, list[int]] = {}
        for index, label in enumerate(self.labels):
            self.by_label.setdefault(label, []).append(index)

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> np.ndarray:
        source = self.paths[index]
        image = source.load() if hasattr(source, "load") else load_image_array(source)
        return resize_square(image, self.image_size)

    def partner(self, index: int, rng: np.random.Generator) -> int:
        """Another image of the same object (the image itself when it is the only one)."""
        candidates = [i for i in self.by_label[self.labels[index]] if i != index]
        return int(rng.choice(candidates)) if candidates else index

    def make_anomaly(self, image: np.ndarray, other: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        method = self.synthesis
        if method == MIXED_SYNTHESIS:
            # Three kinds of anomaly, so the loss cannot be lowered by learning one method's blending cue.
            method = SYNTHESIS_METHODS_ORDER[int(rng.integers(len(SYNTHESIS_METHODS_ORDER)))]
        for _ in range(SYNTHESIS_TRIES):
            anomalous, mask = synthesize(method, image, other, rng)
            if mask.any():
                break
        return anomalous

    def pair(self, index: int, epoch: int = 0) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, index, epoch])
        image = self.load(index)
        anomalous = self.make_anomaly(image, self.load(self.partner(index, rng)), rng)
        return {
            "normal": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
            "anomalous": torch.from_numpy(np.ascontiguousarray(anomalous.transpose(2, 0, 1))),
            "label": torch.tensor(self.labels[index], dtype=torch.long),
        }

    def __getitem__(self, key: int) -> dict[str, torch.Tensor]:
        epoch, index = divmod(int(key), len(self))
        return self.pair(index, epoch)


class EpochShuffle(torch.utils.data.Sampler):
    """A random permutation per epoch, yielding keys `epoch * size + index` for SyntheticPairs.

    The permutation comes from `generator`, which the training loop reseeds per epoch (so a resumed
    run shuffles as the original did); `use_epoch` is called before each epoch. It is deliberately not
    named `set_epoch`: Accelerate calls `set_epoch` with its own counter, which restarts at 0 after a resume.
    """

    def __init__(self, size: int, generator: torch.Generator):
        self.size = int(size)
        self.generator = generator
        self.epoch = 0

    def use_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        offset = self.epoch * self.size
        yield from (offset + int(i) for i in torch.randperm(self.size, generator=self.generator))
