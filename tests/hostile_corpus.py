"""A corpus of hostile inputs, generated at test time (nothing binary is committed), and the harness
that runs each through an entry point and classifies what happened.

Every item says what a correct library does with it:
- "error": refuse it with one of defectclip's own errors, naming the input;
- "ok": accept it, and (when given) a check of the result passes: a value a user would verify;
- "either": an input that is legitimately usable or not (a 1-pixel image loads, but cannot be scored),
  where only a non-project exception, a hang or a memory blow-up is a failure.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import psutil
from PIL import Image

from defectclip.data import DataError
from defectclip.errors import DefectclipError

MAX_SECONDS = 10.0
MAX_PEAK_BYTES = 1 << 30


@dataclass
class Item:
    name: str
    value: Any  # a path, an array, a tensor, a folder
    expect: str  # "error", "ok" or "either"
    check: Callable[[Any], bool] | None = None  # for "ok": the result is right
    names: str | None = None  # text an error message must contain (default: the path's name)
    array_stage: bool = False  # the library call after reading the file gets pixels, not the path


@dataclass
class Outcome:
    item: str
    entry: str
    kind: str  # "ok", "project-error", "foreign-error", "silent-wrong", "unexpected-error", "wrong-value", "unnamed", "hang"
    seconds: float
    peak_bytes: int
    detail: str = ""

    @property
    def failed(self) -> bool:
        return (self.kind not in ("ok", "project-error") or self.seconds > MAX_SECONDS
                or self.peak_bytes > MAX_PEAK_BYTES)


@dataclass
class PeakMemory:
    """Samples the process's resident memory while a case runs; `peak` is the rise above the start."""

    interval: float = 0.001
    peak: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)

    def __enter__(self) -> "PeakMemory":
        self._process = psutil.Process()
        self._start = self._process.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss - self._start)
            time.sleep(self.interval)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss - self._start)


class CaseTimeout(BaseException):
    """Raised by the alarm in a case that runs past MAX_SECONDS (e.g. blocked on a FIFO)."""


def run_case(item: Item, entry: str, call: Callable[[Any], Any]) -> Outcome:
    import signal

    def alarm(signum, frame):
        raise CaseTimeout()

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, MAX_SECONDS + 5)
    started = time.perf_counter()
    error: BaseException | None = None
    result = None
    try:
        with PeakMemory() as memory:
            try:
                result = call(item.value)
            except CaseTimeout as err:
                error = err
            except Exception as err:  # noqa: BLE001 - classifying every exception is the point
                error = err
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    seconds = time.perf_counter() - started
    kind, detail = classify(item, error, result)
    return Outcome(item.name, entry, kind, seconds, memory.peak, detail)


def classify(item: Item, error: BaseException | None, result: Any) -> tuple[str, str]:
    if isinstance(error, CaseTimeout):
        return "hang", "ran past the alarm"
    if error is not None:
        if not isinstance(error, DefectclipError):
            return "foreign-error", f"{type(error).__module__}.{type(error).__name__}: {error}"
        if item.expect == "ok":
            return "unexpected-error", f"{type(error).__name__}: {error}"
        wanted = item.names if item.names is not None else (Path(item.value).name if isinstance(item.value, (str, Path)) else "")
        if wanted and item.array_stage and not isinstance(error, DataError):
            # The entry point was handed the decoded pixels, not the file: the message must say
            # which image property is wrong instead (e.g. "Image of 1 x 1 pixels is too small").
            wanted = "mage"
        if wanted and wanted not in str(error):
            return "unnamed", f"message does not name {wanted!r}: {error}"
        return "project-error", f"{type(error).__name__}: {error}"
    if item.expect == "error":
        return "silent-wrong", f"returned {type(result).__name__} instead of refusing"
    if item.check is not None and not item.check(result):
        return "wrong-value", f"check failed on {summary(result)}"
    return "ok", ""


def summary(value: Any) -> str:
    if hasattr(value, "shape"):
        return f"{type(value).__name__} {tuple(value.shape)}"
    return type(value).__name__


# --------------------------------------------------------------------------------------------------
# crafted bytes


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_file(width: int, height: int, bit_depth: int, color_type: int, idat: bytes, before_idat=()) -> bytes:
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + b"".join(before_idat)
            + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b""))


def zero_rows_idat(width_bytes: int, height: int) -> bytes:
    """A valid, tiny IDAT for a huge all-black image, compressed row by row (never held whole)."""
    compressor, row = zlib.compressobj(9), b"\0" * (1 + width_bytes)
    return b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()


def bmp_header_only(width: int, height: int) -> bytes:
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + 40 + 16, 0, 0, 14 + 40) + info + b"\0" * 16


def jpeg_claiming(width: int, height: int) -> bytes:
    """A real small JPEG whose frame header is edited to claim another size."""
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (90, 90, 90)).save(buffer, "JPEG")
    data = bytearray(buffer.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def image_bytes(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


class Exploit:
    """Unpickling this creates `marker`: proof that a loader executed a pickle."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def malicious_pickle(marker: Path) -> bytes:
    return pickle.dumps({"state": Exploit(marker)})


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def noise(size=(64, 64), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (*size, 3), dtype=np.uint8)


def near(value: float, target: float, tolerance: float) -> bool:
    return abs(float(value) - target) <= tolerance


def report(outcomes: list[Outcome]) -> str:
    lines = [f"{o.item} via {o.entry}: {o.kind} ({o.seconds:.1f} s, {o.peak_bytes / 2**20:.0f} MB) {o.detail}"
             for o in outcomes if o.failed]
    return "\n".join(lines)


def os_supports_fifo() -> bool:
    return hasattr(os, "mkfifo")
