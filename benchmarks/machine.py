"""The CPU model a benchmark ran on, as lscpu names it, for the `machine` field of its results."""

from __future__ import annotations

import platform
import subprocess


def cpu_model() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"
