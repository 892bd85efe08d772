"""Training checkpoints without pickle, written so that a kill at any moment loses nothing.

Accelerate's `save_state` / `load_state` pickle the optimizer, scheduler, RNG and registered objects
and unpickle them on resume (`custom_checkpoint_*.pkl` even with `weights_only=False`), so a crafted
checkpoint folder could run code. Here every tensor goes to safetensors and everything else to JSON:

    checkpoints/checkpoint_<n>/
        model.safetensors (model_<i>.safetensors)   each prepared model's state dict
        state.safetensors                            optimizer tensors
        rng_<process>.safetensors                    each process's RNG states (structure in its metadata)
        state.json                                   written last: step, loss history, optimizer /
                                                     scheduler structure, file sizes

A checkpoint is written into `.checkpoint_<n>.incomplete` and renamed to `checkpoint_<n>` once every
file is on disk (fsync'd), so a folder named `checkpoint_<n>` is complete by construction. Folders
without a valid state.json (a copy that lost files, Accelerate's own format) are skipped by
`--resume latest` and never deleted by the rotation, which only removes complete checkpoints after a
newer one is in place.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, load_model, save_file, save_model

from defectclip.errors import CheckpointError

FORMAT = "defectclip-checkpoint"
VERSION = 1
STATE_JSON = "state.json"
STATE_TENSORS = "state.safetensors"
NAME = re.compile(r"^checkpoint_(\d+)$")
INCOMPLETE_SUFFIX = ".incomplete"


# --------------------------------------------------------------------------------------------------
# nested state <-> JSON + flat tensors


def encode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """A state dict -> JSON-able structure; tensors and arrays move to `tensors` under generated keys.

    Tuples and dicts with non-string keys (an optimizer's per-parameter state is keyed by int) are
    tagged so that `decode` gives back exactly the same structure.
    """
    if isinstance(value, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = value.detach().cpu().contiguous().clone()
        return {"__tensor__": key}
    if isinstance(value, np.ndarray):
        key = f"t{len(tensors)}"
        # safetensors has no uint32: numpy's MT19937 key is stored widened and narrowed back on load.
        tensors[key] = torch.from_numpy(value.astype(np.int64) if value.dtype == np.uint32 else value.copy())
        return {"__ndarray__": key, "dtype": str(value.dtype)}
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, tuple):
        return {"__tuple__": [encode(v, tensors) for v in value]}
    if isinstance(value, list):
        return [encode(v, tensors) for v in value]
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: encode(v, tensors) for k, v in value.items()}
        return {"__items__": [[encode(k, tensors), encode(v, tensors)] for k, v in value.items()]}
    raise CheckpointError(
        f"Cannot store a {type(value).__name__} in a checkpoint without pickle; state dicts must hold "
        "tensors, arrays, numbers, strings, lists, tuples and dicts."
    )


def decode(value: Any, tensors: dict[str, torch.Tensor], source: Path) -> Any:
    if isinstance(value, list):
        return [decode(v, tensors, source) for v in value]
    if not isinstance(value, dict):
        return value
    if "__tensor__" in value:
        return _tensor(tensors, value["__tensor__"], source)
    if "__ndarray__" in value:
        return _tensor(tensors, value["__ndarray__"], source).numpy().astype(value["dtype"])
    if "__tuple__" in value:
        return tuple(decode(v, tensors, source) for v in value["__tuple__"])
    if "__items__" in value:
        return {decode(k, tensors, source): decode(v, tensors, source) for k, v in value["__items__"]}
    return {k: decode(v, tensors, source) for k, v in value.items()}


def _tensor(tensors: dict[str, torch.Tensor], key: str, source: Path) -> torch.Tensor:
    if key not in tensors:
        raise CheckpointError(f"{source}: {STATE_JSON} names tensor {key!r}, which {STATE_TENSORS} lacks.")
    return tensors[key]


# --------------------------------------------------------------------------------------------------
# random number generators


def rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].to(torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.to(torch.uint8) for s in state["cuda"]])


# --------------------------------------------------------------------------------------------------
# finding checkpoints


def index_of(folder: Path) -> int | None:
    match = NAME.match(folder.name)
    return int(match.group(1)) if match else None


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The checkpoint's state.json when the folder is a complete defectclip checkpoint, else None."""
    path = folder / STATE_JSON
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(state, dict) or state.get("format") != FORMAT or not isinstance(state.get("files"), dict):
        return None
    for name, size in state["files"].items():
        file = folder / name
        if "/" in name or not file.is_file() or file.stat().st_size != size:
            return None
    return state


def is_complete(folder: Path) -> bool:
    return folder.is_dir() and index_of(folder) is not None and read_manifest(folder) is not None


def named_checkpoints(root: Path) -> list[Path]:
    """Every `checkpoint_<n>` folder under root, complete or not, oldest (lowest n) first."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and index_of(p) is not None), key=index_of)


def complete_checkpoints(root: Path) -> list[Path]:
    return [p for p in named_checkpoints(root) if is_complete(p)]


def incomplete_checkpoints(root: Path) -> list[Path]:
    return [p for p in named_checkpoints(root) if not is_complete(p)]


def next_index(root: Path) -> int:
    """One past every numbered folder, complete or not, so a save never overwrites anything."""
    folders = named_checkpoints(root)
    return index_of(folders[-1]) + 1 if folders else 0


# --------------------------------------------------------------------------------------------------
# writing


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def model_file(index: int) -> str:
    return "model.safetensors" if index == 0 else f"model_{index}.safetensors"


def rng_file(process_index: int) -> str:
    return f"rng_{process_index}.safetensors"


def write_rng(staging: Path, process_index: int) -> None:
    """This process's RNG states: tensors in the file, their structure as JSON in its metadata."""
    tensors: dict[str, torch.Tensor] = {}
    structure = encode(rng_state(), tensors)
    path = staging / rng_file(process_index)
    save_file(tensors, str(path), metadata={"structure": json.dumps(structure)})
    _fsync_file(path)


def read_rng(folder: Path, process_index: int) -> dict[str, Any] | None:
    path = folder / rng_file(process_index)
    if not path.is_file():
        return None  # a checkpoint of a run with fewer processes: this one keeps its seeded state
    try:
        with safe_open(str(path), framework="pt") as handle:
            structure = json.loads(handle.metadata()["structure"])
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as err:  # noqa: BLE001 - safetensors' own error type, a missing key, bad JSON
        raise CheckpointError(f"Cannot read {path}: {err}. Resume from another checkpoint.") from err
    return decode(structure, tensors, folder)


def write_checkpoint(staging: Path, models: list, optimizers: list, schedulers: list, scaler,
                     extra: dict[str, Any]) -> None:
    """Write every file of a checkpoint into `staging` (each process's RNG file is there already);
    state.json goes last and lists every file with its size."""
    for i, model in enumerate(models):
        save_model(model, str(staging / model_file(i)))
    tensors: dict[str, torch.Tensor] = {}
    body = {
        "format": FORMAT,
        "version": VERSION,
        "optimizers": [encode(o.state_dict(), tensors) for o in optimizers],
        "schedulers": [encode(s.state_dict(), tensors) for s in schedulers],
        "scaler": None if scaler is None else encode(scaler.state_dict(), tensors),
        **{key: encode(value, tensors) for key, value in extra.items()},
    }
    save_file(tensors, str(staging / STATE_TENSORS))
    names = [model_file(i) for i in range(len(models))] + [STATE_TENSORS]
    for name in names:
        _fsync_file(staging / name)
    names += sorted(p.name for p in staging.glob("rng_*.safetensors"))
    body["files"] = {name: (staging / name).stat().st_size for name in names}
    with open(staging / STATE_JSON, "w") as handle:
        json.dump(body, handle)
        handle.flush()
        os.fsync(handle.fileno())


def publish(staging: Path, target: Path) -> None:
    """Make a fully written staging folder visible under its final name, durably."""
    _fsync_dir(staging)
    os.rename(staging, target)
    _fsync_dir(target.parent)


def staging_for(root: Path, index: int) -> Path:
    return root / f".checkpoint_{index}{INCOMPLETE_SUFFIX}"


def rotate(root: Path, keep: int | None) -> list[Path]:
    """Delete the oldest complete checkpoints beyond `keep`; incomplete folders are never touched."""
    if keep is None or keep < 1:
        return []
    complete = complete_checkpoints(root)
    removed = complete[: max(0, len(complete) - keep)]
    for folder in removed:
        shutil.rmtree(folder)
    return removed


# --------------------------------------------------------------------------------------------------
# reading


def read_checkpoint(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """state.json (decoded) and the state tensors of a complete checkpoint; no pickle is involved."""
    manifest = read_manifest(folder)
    if manifest is None:
        raise CheckpointError(incomplete_message(folder))
    try:
        tensors = load_file(str(folder / STATE_TENSORS))
    except Exception as err:  # noqa: BLE001 - safetensors' own error type for a damaged file
        raise CheckpointError(f"Cannot read {folder / STATE_TENSORS}: {err}. Resume from another checkpoint.") from err
    return decode(manifest, tensors, folder), tensors


def load_models(folder: Path, models: list) -> None:
    for i, model in enumerate(models):
        path = folder / model_file(i)
        try:
            load_model(model, str(path), strict=True)
        except Exception as err:  # noqa: BLE001 - a damaged file or weights of another model
            raise CheckpointError(f"Cannot load {path} into the model being trained: {err}") from err


def incomplete_message(folder: Path) -> str:
    pickles = sorted(p.name for p in folder.glob("*.pkl")) + sorted(p.name for p in folder.glob("*.bin"))
    why = (
        f" It holds pickle files ({', '.join(pickles[:4])}): Accelerate's own format, which defectclip never "
        "loads because unpickling can run code."
        if pickles else " It was not finished (the run was stopped while writing it) or lost files since."
    )
    return f"{folder} is not a complete defectclip checkpoint (no valid {STATE_JSON}).{why}"
