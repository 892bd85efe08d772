"""Small C kernels for scoring on CPUs with Intel AMX (see kernels.c for why each exists): the
nearest-neighbour search, the model input (normalised, channels-last, bfloat16) in one pass, and
PatchCore's patch features from the stage maps in one call.

The kernel is compiled from the source shipped with the package the first time a process needs it
(about a second with the system C compiler), into a per-user cache keyed by the source and the
compiler, and loaded with ctypes: no build step at install time, and nothing pickled or downloaded.
Wherever it cannot run (no AMX, no C compiler, a compiler without AMX intrinsics, the kernel
disagreeing with a float64 reference on its self-check, or DEFECTCLIP_NATIVE=0), `available()`
says why and PatchCore keeps its torch search.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from ..inference import bf16_kernels_available

SOURCE = Path(__file__).with_name("kernels.c")
BANK_ROW_MULTIPLE = 64  # the kernel takes the bank 64 rows at a time
DIM_MULTIPLE = 32  # AMX multiplies bfloat16 in 32-wide blocks of the inner dimension
EXTRA_COLUMNS = 2  # the bank's squared norm in two bfloat16 parts
QUERIES_PER_THREAD = 256  # below this a thread costs more than it saves
COMPILE_FLAGS = ("-O3", "-shared", "-fPIC")
SELF_CHECK_TOLERANCE = 1e-3  # relative; the kernel's error is ~1e-5 on patch-like data

_state: dict = {}
_loading = threading.Lock()  # the app scores from several threads: one of them builds, the others wait


def available() -> tuple[bool, str]:
    """(whether the kernels run here, why not). Decided once per process."""
    if "ok" not in _state:
        with _loading:
            if "ok" not in _state:
                _state["ok"], _state["why"] = _load()
    return _state["ok"], _state["why"]


def _library() -> ctypes.CDLL:
    """The loaded kernels, or a RuntimeError saying why they cannot run here."""
    ok, why = available()
    if not ok:
        raise RuntimeError(f"The native kernels are not available here: {why}")
    return _state["lib"]


def prepare_bank(bank: torch.Tensor) -> torch.Tensor:
    """The bank as the kernel reads it: bfloat16 rows [-2 b~, |b~|^2 high, |b~|^2 low, 0...] (b~ = b
    rounded to bfloat16), padded with rows that never win (an infinite norm, no features)."""
    count, dim = bank.shape
    width = -(-(dim + EXTRA_COLUMNS) // DIM_MULTIPLE) * DIM_MULTIPLE
    rows = torch.zeros(-(-count // BANK_ROW_MULTIPLE) * BANK_ROW_MULTIPLE, width, dtype=torch.bfloat16)
    features = rows[:count, :dim]
    features.copy_(bank)  # the rounding
    squared = features.float().pow(2).sum(1)
    high = squared.to(torch.bfloat16)
    rows[:count, dim] = high
    rows[:count, dim + 1] = (squared - high.float()).to(torch.bfloat16)
    rows[count:, dim] = float("inf")
    features.mul_(-2.0)  # exact in bfloat16
    return rows


def nearest_distances(queries: torch.Tensor, prepared: torch.Tensor) -> torch.Tensor:
    """Each query's Euclidean distance to its nearest bank row (bank from `prepare_bank`), float32.

    With several torch threads the queries are split between that many threads (ctypes releases the
    GIL during the call); with one, a single call."""
    _library()
    return _distances(queries, prepared)


def _distances(queries: torch.Tensor, prepared: torch.Tensor) -> torch.Tensor:
    queries = queries.detach().to("cpu", torch.float32).contiguous()
    count, dim = queries.shape
    if dim + EXTRA_COLUMNS > prepared.shape[1]:
        raise ValueError(f"Queries have {dim} features; the prepared bank holds {prepared.shape[1] - EXTRA_COLUMNS}.")
    out = torch.empty(count, dtype=torch.float32)
    threads = max(1, min(torch.get_num_threads(), count // QUERIES_PER_THREAD))
    if threads == 1:
        _run(prepared, queries, out)
        return out
    bounds = [(count * i // threads) // 16 * 16 for i in range(threads)] + [count]
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda i: _run(prepared, queries[bounds[i] : bounds[i + 1]], out[bounds[i] : bounds[i + 1]]),
                      range(threads)))
    return out


def normalized_channels_last(images: list[torch.Tensor], scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """N x C x H x W bfloat16 (channels-last memory) holding image * scale + shift per channel, from
    same-sized C x H x W float32 CPU images of any strides; scale and shift hold C values."""
    lib = _library()
    channels, height, width = images[0].shape
    out = torch.empty((len(images), channels, height, width), dtype=torch.bfloat16, memory_format=torch.channels_last)
    scale, shift = (v.detach().to("cpu", torch.float32).reshape(-1).contiguous() for v in (scale, shift))
    if scale.numel() != channels or shift.numel() != channels:
        raise ValueError(f"scale and shift need {channels} values, one per channel.")
    bytes_per_image = channels * height * width * out.element_size()
    for index, image in enumerate(images):
        if tuple(image.shape) != (channels, height, width) or image.dtype != torch.float32 or image.device.type != "cpu":
            raise ValueError(f"Image {index} is {tuple(image.shape)} {image.dtype} on {image.device}; expected "
                             f"{(channels, height, width)} float32 on the CPU like the first.")
        lib.dc_normalize_nhwc_bf16(
            image.data_ptr(), channels, height, width, *image.stride(), scale.data_ptr(), shift.data_ptr(),
            out.data_ptr() + index * bytes_per_image,
        )
    return out


def patch_features(maps: list[torch.Tensor]) -> torch.Tensor:
    """PatchCore's locally aware patch features from bfloat16 channels-last stage maps (N x C_i x h_i x
    w_i each): every map 3 x 3 averaged, bilinearly brought to the finest map's grid and the channels
    concatenated, as float32 N x sum(C_i) x H x W in channels-last memory (patch rows contiguous)."""
    lib = _library()
    for m in maps:
        if m.dtype != torch.bfloat16 or m.device.type != "cpu" or not m.is_contiguous(memory_format=torch.channels_last):
            raise ValueError(f"Stage maps must be bfloat16 channels-last CPU tensors, got {m.dtype} on {m.device}.")
    batch = maps[0].shape[0]
    height, width = max((m.shape[-2:] for m in maps), key=lambda size: size[0] * size[1])
    channels = [int(m.shape[1]) for m in maps]
    out = torch.empty((batch, sum(channels), height, width), dtype=torch.float32, memory_format=torch.channels_last)
    scratch = torch.empty(max(m[0].numel() for m in maps), dtype=torch.float32)
    sizes = [(ctypes.c_int64 * len(maps))(*values) for values in
             ([int(m.shape[2]) for m in maps], [int(m.shape[3]) for m in maps], channels)]
    for n in range(batch):
        pointers = (ctypes.c_void_p * len(maps))(*[m[n].data_ptr() for m in maps])
        lib.dc_patch_features(len(maps), pointers, *sizes, height, width, scratch.data_ptr(),
                                        out[n].data_ptr())
    return out


def _run(prepared: torch.Tensor, queries: torch.Tensor, out: torch.Tensor) -> None:
    count, dim = queries.shape
    if count == 0:
        return
    padded = -(-count // 16) * 16
    width = prepared.shape[1]
    scratch = torch.empty((1 + padded) * width, dtype=torch.int16)
    best = torch.empty(2 * padded, dtype=torch.float32)
    _state["lib"].dc_nearest_amx(
        prepared.data_ptr(), prepared.shape[0], width, queries.data_ptr(), count, dim,
        scratch.data_ptr(), best.data_ptr(), out.data_ptr(),
    )


# --------------------------------------------------------------------------------------------------
# build and load


def _load() -> tuple[bool, str]:
    if os.environ.get("DEFECTCLIP_NATIVE", "1") == "0":
        return False, "switched off (DEFECTCLIP_NATIVE=0)"
    if not bf16_kernels_available(torch.device("cpu")):
        return False, "this CPU has no AMX bfloat16 tiles"
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        return False, "no C compiler (cc) on PATH"
    try:
        library = _compiled(compiler)
        lib = ctypes.CDLL(str(library))
    except (OSError, subprocess.SubprocessError) as err:
        return False, f"could not build {SOURCE.name}: {str(err).strip()[:300]}"
    lib.dc_amx_request.restype = ctypes.c_int
    lib.dc_nearest_amx.restype = None
    lib.dc_nearest_amx.argtypes = [
        ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
    ]
    lib.dc_normalize_nhwc_bf16.restype = None
    lib.dc_normalize_nhwc_bf16.argtypes = [ctypes.c_void_p, *([ctypes.c_int64] * 6), ctypes.c_void_p, ctypes.c_void_p,
                                           ctypes.c_void_p]
    lib.dc_patch_features.restype = None
    lib.dc_patch_features.argtypes = [ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                      ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
    if lib.dc_amx_request() != 0:
        return False, "the kernel refused AMX tile state (arch_prctl XTILEDATA)"
    _state["lib"] = lib
    error = _self_check()
    if error > SELF_CHECK_TOLERANCE:
        del _state["lib"]
        return False, f"self-check failed: relative error {error:.2e} against float64"
    return True, ""


def _compiled(compiler: str) -> Path:
    """The shared library for this source and compiler, built once into the cache (atomically: a
    half-written file is never loaded, and two processes building at once both succeed)."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256(SOURCE.read_bytes() + version.encode() + " ".join(COMPILE_FLAGS).encode()).hexdigest()[:16]
    folder = _cache_dir()
    library = folder / f"kernels-{key}.so"
    if library.exists():
        return library
    folder.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(suffix=".so", dir=folder)
    os.close(handle)
    try:
        result = subprocess.run([compiler, *COMPILE_FLAGS, "-o", temporary, str(SOURCE)],
                                capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise OSError(result.stderr or f"{compiler} exited with {result.returncode}")
        os.replace(temporary, library)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return library


def _cache_dir() -> Path:
    root = os.environ.get("DEFECTCLIP_CACHE") or os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "defectclip" / "native"


def _self_check() -> float:
    """Largest relative error of the kernel on a seeded problem with ragged sizes (tails of every
    block), against float64 distances between the same bfloat16-rounded vectors."""
    generator = torch.Generator().manual_seed(0)
    bank = torch.randn(70, 45, generator=generator) * 2 + 1
    queries = bank[torch.randint(0, 70, (21,), generator=generator)] + 0.3 * torch.randn(21, 45, generator=generator)
    got = _distances(queries, prepare_bank(bank))
    rounded_q, rounded_b = queries.to(torch.bfloat16).double(), bank.to(torch.bfloat16).double()
    expected = torch.cdist(rounded_q, rounded_b).min(1).values
    return float(((got.double() - expected).abs() / expected.clamp_min(1e-12)).max())
