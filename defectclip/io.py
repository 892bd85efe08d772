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
        json.dump(data, handle, indent=2, sort_keys=True)
        handle.write("\n")
    os.chmod(handle.name, 0o644)  # NamedTemporaryFile creates 0600; the JSON is meant to be read by others
    os.replace(handle.name, path)
    return path


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is this a defectclip artifact folder?")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); the artifact may be damaged.") from err


def unknown_keys(cls, data: dict) -> tuple[list[str], set[str]]:
    """The keys of `data` that the dataclass `cls` has no field for (sorted), and its field names: every saved
    config refuses keys it does not know rather than silently dropping what a newer version wrote."""
    from dataclasses import fields

    known = {f.name for f in fields(cls)}
    return sorted(set(data) - known), known
