"""TAB's Industrial Domain Prompt Association (IDPA): normal and abnormal sentences per object.

A sentence is a template filled with a state phrase, and the state phrase is filled with the object:

    template "a photo of the {} on a manufacturing line."  x  state "{} without flaw"  x  "magnetic tile"
    -> "a photo of the magnetic tile without flaw on a manufacturing line."

TAB (§3.2, Table 8) grows the prompt set in four steps, each of which raised PaDiM's detection AUROC on
MVTec AD: one normal and one abnormal state (two-class), many states (state ensemble), CLIP's photo
templates, and templates with industrial words. `PromptSettings.level` picks one of those steps; the
default is the full set. The sentences of one state are encoded by the frozen text tower, averaged and
renormalised into one class vector per (object, state), the way WinCLIP and TAB build their text side.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

# The object is inserted at "{}". Bare "{}" counts as a normal state: an object named without
# qualification is, by default, an object as it should be.
NORMAL_STATES = (
    "{}",
    "flawless {}",
    "perfect {}",
    "unblemished {}",
    "pristine {}",
    "intact {}",
    "{} without flaw",
    "{} without defect",
    "{} without damage",
    "{} in perfect condition",
)
ABNORMAL_STATES = (
    "damaged {}",
    "broken {}",
    "blemished {}",
    "defective {}",
    "flawed {}",
    "{} with a flaw",
    "{} with a defect",
    "{} with damage",
    "{} with an anomaly",
)
# The pair the two-class level uses: the paper's own example ('unblemished' / 'blemished').
TWO_CLASS_STATES = ("unblemished {}", "blemished {}")

BASE_TEMPLATE = "a photo of a {}."
# CLIP's ImageNet prompt style: photo conditions that say nothing about the object's state.
CLIP_TEMPLATES = (
    "a photo of a {}.",
    "a photo of the {}.",
    "a cropped photo of a {}.",
    "a cropped photo of the {}.",
    "a close-up photo of a {}.",
    "a close-up photo of the {}.",
    "a bright photo of a {}.",
    "a dark photo of the {}.",
    "a good photo of the {}.",
    "a low resolution photo of a {}.",
    "a black and white photo of the {}.",
)
# The domain words of TAB's last ablation step: where and why the photo was taken.
INDUSTRIAL_TEMPLATES = (
    "a photo of a {} for industrial inspection.",
    "a photo of the {} on a manufacturing line.",
    "an industrial photo of a {}.",
    "a photo of a {} for visual inspection.",
    "a photo of a {} for quality control.",
    "a close-up photo of a {} in a factory.",
    "a photo of a manufactured {}.",
    "an image of the {} taken by an inspection camera.",
    "a photo of the {} during production.",
)

PROMPT_LEVELS = ("two-class", "state-ensemble", "clip-template", "industrial")
ENCODE_BATCH = 256  # sentences per text-tower call: bounds memory for large prompt sets


@dataclass(frozen=True)
class PromptSettings:
    """Which prompt set to build; `level` follows TAB's Table 8 (see PROMPT_LEVELS)."""

    level: str = "industrial"

    def __post_init__(self) -> None:
        if self.level not in PROMPT_LEVELS:
            raise ValueError(f"Unknown prompt level {self.level!r}; use one of {PROMPT_LEVELS}.")

    def states(self, abnormal: bool) -> tuple[str, ...]:
        if self.level == "two-class":
            return (TWO_CLASS_STATES[1],) if abnormal else (TWO_CLASS_STATES[0],)
        return ABNORMAL_STATES if abnormal else NORMAL_STATES

    def templates(self) -> tuple[str, ...]:
        if self.level in ("two-class", "state-ensemble"):
            return (BASE_TEMPLATE,)
        if self.level == "clip-template":
            return CLIP_TEMPLATES
        return CLIP_TEMPLATES + INDUSTRIAL_TEMPLATES

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "PromptSettings":
        return cls(**data)


def _sentences(object_name: str, abnormal: bool, settings: PromptSettings | None) -> list[str]:
    settings = settings or PromptSettings()
    if not object_name or not object_name.strip():
        raise ValueError("The object name must be a non-empty string, e.g. 'magnetic tile'.")
    object_name = object_name.strip()
    return [
        template.format(state.format(object_name))
        for state in settings.states(abnormal)
        for template in settings.templates()
    ]


def normal_sentences(object_name: str, settings: PromptSettings | None = None) -> list[str]:
    """Every template x every normal state for this object."""
    return _sentences(object_name, abnormal=False, settings=settings)


def abnormal_sentences(object_name: str, settings: PromptSettings | None = None) -> list[str]:
    """Every template x every abnormal state for this object."""
    return _sentences(object_name, abnormal=True, settings=settings)


def sentence_hash(normal: Sequence[str], abnormal: Sequence[str]) -> str:
    """Identifies a prompt set: editing any sentence gives new vectors instead of stale cached ones."""
    digest = hashlib.sha256()
    for group in (normal, abnormal):
        digest.update("\n".join(group).encode())
        digest.update(b"\x00")
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------
# class vectors and their caches

# (text spec, object, sentence hash) -> (normal vector, abnormal vector), each (D,) float32 on the CPU.
_MEMORY_CACHE: dict[tuple[str, str, str], tuple[torch.Tensor, torch.Tensor]] = {}


def clear_memory_cache() -> None:
    _MEMORY_CACHE.clear()


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")[:60] or "x"


def cache_file(cache_dir: str | Path, text_spec: str, object_name: str, digest: str) -> Path:
    """One safetensors file per (text spec, object, prompt set); readable names, the hash keeps them apart."""
    return Path(cache_dir) / f"{_slug(text_spec)}__{_slug(object_name)}__{digest[:16]}.safetensors"


def _read_cached(path: Path, key: tuple[str, str, str]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The cached pair, or None when the file is missing or was written for another key."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata() or {}
        # A slug or a 16-hex-digit prefix can collide; the full key in the metadata cannot.
        if (meta.get("text_spec"), meta.get("object"), meta.get("sentence_hash")) != key:
            return None
        return handle.get_tensor("normal"), handle.get_tensor("abnormal")


def _write_cached(path: Path, key: tuple[str, str, str], normal: torch.Tensor, abnormal: torch.Tensor) -> None:
    """Write via a temporary file and a rename, so a reader never sees half a file."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"text_spec": key[0], "object": key[1], "sentence_hash": key[2]}
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(handle)
    try:
        save_file({"normal": normal.contiguous(), "abnormal": abnormal.contiguous()}, temporary, metadata=meta)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def ensemble_vector(text_tower, sentences: Sequence[str]) -> torch.Tensor:
    """Mean of the sentences' (normalised) embeddings, renormalised: one vector for one state."""
    chunks = [text_tower.encode(list(sentences[i : i + ENCODE_BATCH])) for i in range(0, len(sentences), ENCODE_BATCH)]
    mean = torch.cat(chunks).float().mean(dim=0)
    return F.normalize(mean, dim=-1).cpu()


def object_vectors(
    text_tower, object_name: str, settings: PromptSettings | None = None, cache_dir: str | Path | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(normal, abnormal) class vectors of one object, each (D,), from the memory cache, the disk cache
    or the text tower, in that order."""
    normal, abnormal = normal_sentences(object_name, settings), abnormal_sentences(object_name, settings)
    key = (text_tower.spec, object_name, sentence_hash(normal, abnormal))
    if key in _MEMORY_CACHE:
        return _MEMORY_CACHE[key]
    path = cache_file(cache_dir, *key) if cache_dir is not None else None
    pair = _read_cached(path, key) if path is not None else None
    if pair is None:
        pair = ensemble_vector(text_tower, normal), ensemble_vector(text_tower, abnormal)
        if path is not None:
            _write_cached(path, key, *pair)
    _MEMORY_CACHE[key] = pair
    return pair


def class_text_vectors(
    text_tower,
    objects: Sequence[str],
    settings: PromptSettings | None = None,
    cache_dir: str | Path | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(normal (K, D), abnormal (K, D)) class vectors for K objects, rows in the order of `objects`.

    Each row has unit length. The text tower is frozen, so the vectors are computed once per
    (text spec, object, prompt set) and kept in memory, and as safetensors under `cache_dir` if given.
    """
    if isinstance(objects, str) or not objects:
        raise ValueError("objects must be a non-empty list of object names, e.g. ['magnetic tile'].")
    pairs = [object_vectors(text_tower, name, settings, cache_dir) for name in objects]
    normal = torch.stack([n for n, _ in pairs])
    abnormal = torch.stack([a for _, a in pairs])
    return normal, abnormal
