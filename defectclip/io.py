"""Atomic writes for artifact folders and JSON files.

A crash or a full disk in the middle of a save must leave the previous artifact intact: everything is
written next to the target first and moved into place with one rename.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from .errors import ArtifactError


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary folder; on success it replaces `target`, on error it is removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; an artifact folder is meant to be shared
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    backup = None
    if target.exists():
        backup = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, backup)
    os.replace(staging, target)
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


def write_json_atomic(path: str | Path, data: Any) -> Path:
    """Write JSON to `path` via a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as handle:
        try:
            json.dump(data, handle, indent=2, sort_keys=True)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())  # the rename below must never publish a file still in the page cache only
        except BaseException:
            handle.close()
            os.unlink(handle.name)
            raise
    os.chmod(handle.name, 0o644)  # NamedTemporaryFile creates 0600; the JSON is meant to be read by others
    os.replace(handle.name, path)
    return path


def read_json(path: str | Path, what: str = "a defectclip artifact") -> Any:
    """Parse a JSON file of an artifact; a missing, unreadable or invalid file is an ArtifactError naming it."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path} not found: is {path.parent} {what} folder?")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark from an editor is not damage
        return json.loads(text, parse_constant=_refuse_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise ArtifactError(f"{path} is not valid JSON ({err}); the artifact may be damaged.") from err
    except OSError as err:
        raise ArtifactError(f"Cannot read {path}: {err}.") from err


def read_json_object(path: str | Path, what: str = "a defectclip artifact") -> dict[str, Any]:
    """`read_json` for files that must hold one JSON object (every config.json does)."""
    data = read_json(path, what)
    if not isinstance(data, dict):
        raise ArtifactError(f"{path} holds a JSON {type(data).__name__}, not an object; the artifact is damaged.")
    return data


def _refuse_constant(name: str) -> Any:
    # Python's json reads NaN / Infinity, which no other JSON reader accepts and no config should hold.
    raise json.JSONDecodeError(f"{name} is not a JSON number", name, 0)


def read_safetensors(path: str | Path) -> dict:
    """All tensors of a safetensors file, refusing NaN / infinite values; a damaged file is an
    ArtifactError naming it (safetensors' own errors do not say which file)."""
    import torch
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path} not found: the artifact folder is incomplete.")
    try:
        tensors = load_file(str(path))
    except Exception as err:  # noqa: BLE001 - SafetensorError, OSError, ValueError for a damaged file
        raise ArtifactError(f"Cannot read {path}: {type(err).__name__}: {err}. Save or download it again.") from err
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ArtifactError(f"{path}: tensor {name!r} holds NaN or infinite values; the artifact is damaged.")
    return tensors


def unknown_keys(cls, data: dict) -> tuple[list[str], set[str]]:
    """The keys of `data` that the dataclass `cls` has no field for (sorted), and its field names: every saved
    config refuses keys it does not know rather than silently dropping what a newer version wrote."""
    from dataclasses import fields

    known = {f.name for f in fields(cls)}
    return sorted(set(data) - known), known
