"""One schema language for saved artifact configs: types, ranges, finite numbers, tensor shapes.

Every loader reads its config.json through these checks before it builds anything, so a damaged or
crafted file fails at load with an ArtifactError that names the file and the field, instead of a
matmul error at predict, a threshold that never fires, or a smoothing kernel that takes minutes.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from .errors import ArtifactError

# A model input larger than this per side is no inspection setting anyone trains (the papers use
# 224-512 px); a crafted size of 12000 px would cost minutes and gigabytes per image.
MAX_MODEL_SIDE = 2048
# Gaussian smoothing of anomaly maps: papers use 4 px; the kernel has 8 sigma + 1 taps per pass.
MAX_SIGMA = 64.0


class Config:
    """A config dict with the path it came from, so every error names the file and the field."""

    def __init__(self, data: Any, path: str | Path):
        self.path = Path(path)
        if not isinstance(data, dict):
            self.fail(f"holds a JSON {type(data).__name__}, not an object")
        self.data = data

    def fail(self, message: str, key: str | None = None) -> None:
        where = f"{self.path}" + (f": field {key!r}" if key else "")
        raise ArtifactError(f"{where} {message}; the artifact is damaged or was edited by hand.")

    def require(self, key: str) -> Any:
        if key not in self.data:
            self.fail("is missing", key)
        return self.data[key]

    def sub(self, key: str) -> "Config":
        value = self.require(key)
        if not isinstance(value, dict):
            self.fail(f"must be an object, got {type(value).__name__}", key)
        return Config(value, f"{self.path}[{key}]")

    def string(self, key: str, choices: Sequence[str] | None = None, optional: bool = False) -> str | None:
        value = self.data.get(key) if optional else self.require(key)
        if value is None and optional:
            return None
        if not isinstance(value, str) or not value:
            self.fail(f"must be a non-empty string, got {value!r}", key)
        if choices is not None and value not in choices:
            self.fail(f"must be one of {list(choices)}, got {value!r}", key)
        return value

    def boolean(self, key: str) -> bool:
        value = self.require(key)
        if not isinstance(value, bool):
            self.fail(f"must be true or false, got {value!r}", key)
        return value

    def number(self, key: str, low: float | None = None, high: float | None = None, *, integer: bool = False,
               optional: bool = False, low_open: bool = False) -> float | int | None:
        value = self.data.get(key) if optional else self.require(key)
        if value is None and optional:
            return None
        return check_number(value, f"{self.path}: field {key!r}", low, high, integer=integer, low_open=low_open)

    def numbers(self, key: str, length: int | None = None, low: float | None = None, high: float | None = None,
                *, integer: bool = False, low_open: bool = False) -> list:
        value = self.require(key)
        if not isinstance(value, list) or (length is not None and len(value) != length) or not value:
            wanted = f"a list of {length} numbers" if length else "a non-empty list of numbers"
            self.fail(f"must be {wanted}, got {value!r}", key)
        return [check_number(v, f"{self.path}: field {key!r}", low, high, integer=integer, low_open=low_open)
                for v in value]

    def strings(self, key: str) -> list[str]:
        value = self.require(key)
        if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
            self.fail(f"must be a non-empty list of names, got {value!r}", key)
        return value

    def only_keys(self, allowed: Iterable[str]) -> None:
        unexpected = sorted(set(self.data) - set(allowed))
        if unexpected:
            self.fail(f"has unexpected keys {unexpected}")


def check_number(value: Any, where: str, low: float | None = None, high: float | None = None, *,
                 integer: bool = False, low_open: bool = False) -> float | int:
    """A finite JSON number (bool is not a number here) within [low, high] (or (low, high])."""
    kind = "a whole number" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise ArtifactError(f"{where} must be {kind}, got {value!r}.")
    if not math.isfinite(value):
        raise ArtifactError(f"{where} must be finite, got {value!r}.")
    too_low = low is not None and (value <= low if low_open else value < low)
    if too_low or (high is not None and value > high):
        bounds = f"{'(' if low_open else '['}{low if low is not None else '-inf'}, {high if high is not None else 'inf'}]"
        raise ArtifactError(f"{where} must lie in {bounds}, got {value!r}.")
    return value


def check_preprocess(config: Config) -> dict[str, Any]:
    """A saved Preprocess: size within MAX_MODEL_SIDE, 3 means in [0, 1], 3 positive stds, a known interpolation."""
    from .data.transforms import INTERPOLATIONS

    config.numbers("size", 2, 1, MAX_MODEL_SIDE, integer=True)
    config.numbers("mean", 3, 0.0, 1.0)
    config.numbers("std", 3, 0.0, 10.0, low_open=True)
    config.string("interpolation", INTERPOLATIONS, optional=True)
    return config.data


def check_tensor(tensor: torch.Tensor, name: str, path: Path, shape: tuple[int, ...] | None = None,
                 floating: bool = True) -> torch.Tensor:
    """A saved tensor of the expected shape and kind, with finite values."""
    if shape is not None and tuple(tensor.shape) != tuple(shape):
        raise ArtifactError(f"{path}: tensor {name!r} has shape {tuple(tensor.shape)}, the config implies {tuple(shape)}.")
    if floating and not tensor.is_floating_point():
        raise ArtifactError(f"{path}: tensor {name!r} must be floating point, got {tensor.dtype}.")
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise ArtifactError(f"{path}: tensor {name!r} holds NaN or infinite values; the artifact is damaged.")
    return tensor


def confine_local_dir(spec: Any, folder: str | Path, root: str | Path | None = None, *,
                      allow_absolute: bool = True, where: str = "tower") -> str:
    """A saved tower spec, with a relative `local-dir:` resolved against `folder` and kept inside `root`.

    An artifact carries its own backbone as `local-dir:<relative path>`; a path that climbs out of
    the artifact (`local-dir:../../..`) would load whatever sits elsewhere on disk, so it is refused.
    `root` is the artifact's top folder (a pipeline's models folder; by default `folder` itself).
    `allow_absolute=False` also refuses absolute paths: a downloaded artifact cannot mean one.
    """
    if not isinstance(spec, str) or ":" not in spec:
        raise ArtifactError(f"{folder}: {where} spec must be a '<kind>:<name>' string, got {spec!r}.")
    kind, _, name = spec.partition(":")
    if kind != "local-dir":
        return spec
    root = Path(root if root is not None else folder).resolve()
    path = Path(name).expanduser()
    if path.is_absolute():
        if not allow_absolute:
            raise ArtifactError(
                f"{folder}: {where} {spec!r} points outside the artifact; a shared artifact must carry its "
                "tower in a sub-folder and name it relatively (local-dir:<sub-folder>)."
            )
        return f"local-dir:{path.resolve()}"
    resolved = (Path(folder) / path).resolve()
    if resolved != root and root not in resolved.parents:
        raise ArtifactError(
            f"{folder}: {where} {spec!r} resolves to {resolved}, outside the artifact folder {root}; a relative "
            "local-dir: path must stay inside the artifact."
        )
    refuse_pickled_weights(resolved, folder, where)
    return f"local-dir:{resolved}"


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def refuse_pickled_weights(tower_dir: Path, folder: str | Path, where: str) -> None:
    """A bundled tower must carry safetensors weights: timm falls back to unpickling
    pytorch_model.bin when model.safetensors is missing, and an artifact's weights are never unpickled."""
    if not tower_dir.is_dir() or any(tower_dir.glob("*.safetensors")):
        return
    pickled = sorted(p.name for p in tower_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickled:
        raise ArtifactError(
            f"{folder}: {where} folder {tower_dir} holds pickled weights ({', '.join(pickled[:3])}) and no "
            "safetensors file; defectclip loads artifact weights from safetensors only. Re-export the tower."
        )
