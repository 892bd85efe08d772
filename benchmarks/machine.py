"""The CPU model a benchmark ran on, as lscpu names it, for the `machine` field of its results; and writing them."""

from __future__ import annotations

import json
import platform
import subprocess
from pathlib import Path


def cpu_model() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def write_result(path: Path, result: dict) -> None:
    """`result` as indented JSON at `path`, atomically: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(path)
