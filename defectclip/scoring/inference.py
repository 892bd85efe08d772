"""The frozen tower as scoring runs it: BatchNorm folded into the convolution before it, and optionally
a bfloat16 copy of the folded trunk for CPUs that multiply bfloat16 in hardware.

Why: scoring only ever runs the tower in eval mode, where a BatchNorm is a fixed per-channel affine map.
Folded into the preceding convolution's weights and bias it costs nothing, instead of one more pass
over every feature map (about a quarter of EfficientNet-Lite0's CPU time to blocks.4). On a CPU with
AMX tiles oneDNN runs bfloat16 convolutions on them, several times faster than float32.

The tower itself is never changed (the app and the training scripts share it): scoring runs a copy,
built once per tower and mode and rebuilt if the tower's weights change (their in-place version
counters or storage move).
"""

from __future__ import annotations

import copy
import functools
import weakref
from typing import Sequence

import torch
from torch import nn

from ..towers import VisionTower
from .errors import ScoringError

INFERENCE_MODES = ("auto", "exact", "folded", "fp16", "bf16")
# A probe this many pixels square finds the convolution -> BatchNorm pairs: every layer runs on it,
# and its cost is negligible next to one real image.
PROBE_SIZE = 64


def bf16_kernels_available(device: torch.device) -> bool:
    """Whether bfloat16 convolutions and matrix products run in hardware here: Intel AMX tiles.

    Without them a CPU emulates bfloat16 and float32 is faster; GPUs are not switched here (the
    backbone is not their bottleneck and nothing was measured on one).
    """
    if device.type != "cpu":
        return False
    check = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(check is not None and check())


def fp16_kernels_available(device: torch.device) -> bool:
    """Whether float16 convolutions run here: always on a GPU; on a CPU only where oneDNN has float16
    kernels (AVX512-FP16 or AVX-NE-CONVERT), which one probe convolution finds out."""
    return device.type != "cpu" or _cpu_runs_fp16_convolutions()


@functools.lru_cache(maxsize=None)
def _cpu_runs_fp16_convolutions() -> bool:
    # A stem-like convolution on a channels-last probe, through the op the fp16 copy will run: oneDNN's
    # fused convolution where this torch has it (the one that refuses float16 on older CPUs), else conv2d.
    conv = nn.Conv2d(3, 16, 3, stride=2, padding=1)
    layer = FusedConv2d(conv, "none", [], torch.float16) if _fused_kernel_works() else conv.half()
    probe = torch.zeros(1, 3, PROBE_SIZE, PROBE_SIZE, dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    try:
        with torch.no_grad():
            layer(probe)
    except (RuntimeError, NotImplementedError):
        return False
    return True


def resolve_inference(mode: str, device: torch.device, bf16_allowed: bool = True) -> str:
    """"auto" -> "bf16" on an AMX CPU (when the method's quality was measured in bf16), "folded" on
    other CPUs, "exact" on a GPU; the other modes stand as given, except "fp16" where this CPU
    cannot run float16 convolutions (refused with what to use instead)."""
    if mode not in INFERENCE_MODES:
        raise ScoringError(f"inference must be one of {INFERENCE_MODES}, got {mode!r}.")
    if mode == "fp16" and not fp16_kernels_available(device):
        raise ScoringError("inference='fp16' needs float16 convolutions, which this CPU cannot run (its oneDNN "
                           "kernels need AVX512-FP16 or AVX-NE-CONVERT); use inference='bf16' or 'folded' here, "
                           "or run on a GPU.")
    if mode != "auto":
        return mode
    if device.type != "cpu":
        return "exact"
    return "bf16" if bf16_allowed and bf16_kernels_available(device) else "folded"


# --------------------------------------------------------------------------------------------------
# folding


def _bn_tail(norm: nn.BatchNorm2d) -> nn.Module | None:
    """What a BatchNorm module does after normalising, once the normalisation is folded away:
    nothing (torch's BatchNorm2d) or timm's BatchNormAct2d's dropout + activation. None for any other
    subclass, whose forward we do not know and therefore leave alone."""
    if type(norm) is nn.BatchNorm2d:
        return nn.Identity()
    try:
        from timm.layers.norm_act import BatchNormAct2d
    except ImportError:  # pragma: no cover - timm is a dependency
        return None
    if type(norm) is BatchNormAct2d:
        return nn.Sequential(norm.drop, norm.act)
    return None


def conv_bn_pairs(tower: VisionTower, keep: Sequence[str] = ()) -> list[tuple[str, str]]:
    """(convolution, BatchNorm) module names where the BatchNorm's input is exactly that convolution's
    output, found by running a probe through the trunk.

    A convolution named in `keep` (a stage whose output the scorer reads) is not paired, since folding
    would change what it returns. A convolution output that also feeds something else would see
    that consumer change too; the CNNs the towers wrap (timm ResNets, EfficientNets) use each
    convolution output once, for its BatchNorm.
    """
    # Outputs are held (not only their ids) until the probe ends, so no id is reused by a later tensor.
    outputs: dict[int, tuple[str, torch.Tensor]] = {}
    pairs: list[tuple[str, str]] = []

    def remember(name: str, output: torch.Tensor) -> None:
        outputs[id(output)] = (name, output)

    def pair(name: str, tensor: torch.Tensor) -> None:
        conv = outputs.get(id(tensor))
        if conv is not None and conv[1] is tensor:
            pairs.append((conv[0], name))

    handles = []
    for name, module in tower.model.named_modules():
        if isinstance(module, nn.Conv2d) and name not in keep:
            handles.append(module.register_forward_hook(lambda _m, _i, out, name=name: remember(name, out)))
        elif isinstance(module, nn.BatchNorm2d) and _bn_tail(module) is not None:
            handles.append(module.register_forward_pre_hook(lambda _m, inputs, name=name: pair(name, inputs[0])))
    parameter = next(iter(tower.parameters()), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    size = max(PROBE_SIZE, max(stage.reduction for stage in tower.stages.values()))
    # A training-mode probe would move the BatchNorm statistics. Each module's own mode is restored
    # (a tower wrapper may be in training mode around a model in eval mode).
    modes = {module: module.training for module in tower.modules()}
    tower.eval()
    try:
        with torch.no_grad():
            tower._run_trunk(torch.zeros(1, 3, size, size, device=device))
    finally:
        for module, mode in modes.items():
            module.training = mode
        for handle in handles:
            handle.remove()
    return list(dict.fromkeys(pairs))


def _fold_into(conv: nn.Conv2d, norm: nn.BatchNorm2d) -> None:
    """conv's weight and bias absorb the BatchNorm's eval-mode affine map y = (x - mean) g / s + b."""
    scale = 1.0 / torch.sqrt(norm.running_var + norm.eps)
    if norm.weight is not None:  # affine=False has no learnt scale or shift
        scale = scale * norm.weight.detach()
    shift = -norm.running_mean * scale
    if norm.bias is not None:
        shift = shift + norm.bias.detach()
    weight = conv.weight.detach() * scale.reshape(-1, 1, 1, 1)
    bias = shift if conv.bias is None else conv.bias.detach() * scale + shift
    conv.weight = nn.Parameter(weight, requires_grad=False)
    conv.bias = nn.Parameter(bias, requires_grad=False)


def folded_copy(tower: VisionTower, keep: Sequence[str] = (), dtype: torch.dtype = torch.float32,
                fuse: bool = True) -> VisionTower:
    """A frozen eval-mode copy of `tower` with every BatchNorm that directly follows a convolution
    folded into it (see conv_bn_pairs), in `dtype`; the tower itself is untouched.

    With `fuse` (and where oneDNN's fused kernel is there, see FusedConv2d) a folded convolution also
    applies the activation that followed its BatchNorm, so conv + BatchNorm + ReLU6 is one pass.
    Every convolution runs in `dtype`: keeping the depthwise ones in float32 (oneDNN has no AMX kernel
    for them) lowered the bfloat16 feature error from 2.9 to 2.3 % but cost more in dtype conversions
    than it saved (EfficientNet-Lite0, 224 px, one thread: 11.1 instead of 8.2 ms an image).
    """
    pairs = conv_bn_pairs(tower, keep)
    copied = copy.deepcopy(tower).eval().requires_grad_(False)
    on_cpu = all(t.device.type == "cpu" for t in tower.parameters())
    fused_kernel = fuse and on_cpu and _fused_kernel_works()  # a oneDNN (CPU) kernel
    for conv_name, norm_name in pairs:
        norm = copied.model.get_submodule(norm_name)
        if norm.running_mean is None or norm.running_var is None:
            continue  # batch statistics even in eval mode: not a fixed map
        conv = copied.model.get_submodule(conv_name)
        _fold_into(conv, norm)
        tail = _bn_tail(norm)
        activation = _fusable_activation(tail) if fused_kernel and _is_plain_conv(conv) else None
        if activation is not None:
            _replace(copied.model, conv_name, FusedConv2d(conv, *activation, dtype))
            tail = nn.Identity()
        _replace(copied.model, norm_name, tail)
    for module in copied.model.modules():
        if not isinstance(module, FusedConv2d):
            for name, tensor in list(module.named_parameters(recurse=False)):
                setattr(module, name, nn.Parameter(tensor.to(dtype), requires_grad=False))
            for name, tensor in list(module.named_buffers(recurse=False)):
                if tensor.is_floating_point():
                    setattr(module, name, tensor.to(dtype))
    return copied


def _replace(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


# --------------------------------------------------------------------------------------------------
# convolution + activation in one oneDNN call


def _is_plain_conv(conv: nn.Module) -> bool:
    """A torch Conv2d (not a subclass with its own padding logic) with numeric zero padding."""
    return type(conv) is nn.Conv2d and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)


def _fusable_activation(tail: nn.Module) -> tuple[str, list[float]] | None:
    """oneDNN's name and scalars for the activation a BatchNorm tail applies, None if not fusable."""
    parts = [m for m in (tail if isinstance(tail, nn.Sequential) else [tail]) if not isinstance(m, nn.Identity)]
    if not parts:
        return "none", []
    if len(parts) == 1 and type(parts[0]) is nn.ReLU:
        return "relu", []
    if len(parts) == 1 and type(parts[0]) in (nn.ReLU6, nn.Hardtanh):
        return "hardtanh", [float(parts[0].min_val), float(parts[0].max_val)]
    return None


def _fused_conv(x, weight, bias, conv: "FusedConv2d"):
    return torch.ops.mkldnn._convolution_pointwise(
        x, weight, bias, list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups,
        conv.activation, conv.scalars, "")


class FusedConv2d(nn.Module):
    """A folded convolution and its activation as one oneDNN call (the fused kernel PyTorch's own
    CPU compiler emits), in its own dtype: the input is cast to it if it arrives in another.

    On one CPU thread this saves the activation's pass over the map (EfficientNet-Lite0: 33 ReLU6 of
    49 convolutions; a bfloat16 ReLU6 costs more than a float32 one on this CPU).
    """

    def __init__(self, conv: nn.Conv2d, activation: str, scalars: list[float], dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(conv.weight.detach().to(dtype), requires_grad=False)
        self.bias = nn.Parameter(conv.bias.detach().to(dtype), requires_grad=False)
        self.padding, self.stride, self.dilation = conv.padding, conv.stride, conv.dilation
        self.groups, self.activation, self.scalars = conv.groups, activation, scalars

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _fused_conv(x.to(self.weight.dtype), self.weight, self.bias, self)


_FUSED_KERNEL_OK: bool | None = None


def _fused_kernel_works() -> bool:
    """Whether this torch build has oneDNN's fused convolution and it matches conv2d + ReLU6 on a
    small probe in both dtypes (checked once per process); otherwise the copy keeps separate ops."""
    global _FUSED_KERNEL_OK
    if _FUSED_KERNEL_OK is None:
        _FUSED_KERNEL_OK = _probe_fused_kernel()
    return _FUSED_KERNEL_OK


def _probe_fused_kernel() -> bool:
    if not hasattr(torch.ops.mkldnn, "_convolution_pointwise") or not torch.backends.mkldnn.is_available():
        return False
    generator = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(8, 8, 3, padding=1, bias=True)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator))
        x = torch.randn(1, 8, 9, 9, generator=generator).contiguous(memory_format=torch.channels_last)
        expected = torch.nn.functional.hardtanh(conv(x), 0.0, 6.0)
        try:
            fused = FusedConv2d(conv, "hardtanh", [0.0, 6.0], torch.float32)(x)
        except (RuntimeError, NotImplementedError):
            return False
    return fused.shape == expected.shape and bool(torch.allclose(fused, expected, atol=1e-4, rtol=1e-4))


# --------------------------------------------------------------------------------------------------
# the copy scoring runs


def _fingerprint(tensors: list[torch.Tensor]) -> tuple:
    """Changes whenever one of the tensors is modified in place or given new storage."""
    return tuple((t.data_ptr(), t._version) for t in tensors)


# tower -> {(mode, kept stages): (its weights and buffers, their fingerprint, the copy)}; weak keys,
# so a dropped tower takes its copies with it.
_COPIES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def inference_tower(tower: VisionTower, mode: str, keep: Sequence[str] = ()) -> VisionTower:
    """The tower scoring runs for a resolved mode: the tower itself ("exact"), its BatchNorm-folded
    copy ("folded"), or that copy in bfloat16 ("bf16"). Copies are shared by every scorer on the same
    tower (the app's few-shot mode builds one per reference image)."""
    if mode == "exact":
        return tower
    if mode not in ("folded", "bf16", "fp16"):
        raise ScoringError(f"inference mode must be exact, folded or bf16 here, got {mode!r}.")
    known = _COPIES.setdefault(tower, {})
    key = (mode, tuple(keep))
    # The weights are listed once per copy (walking the modules costs ~0.1 ms per tensor, more than a
    # small image's features), then only their storage and version counters are compared: an
    # optimizer step or load_state_dict changes those; a module given a new Parameter object does
    # not, and needs a new tower object.
    if key in known and known[key][1] == _fingerprint(known[key][0]):
        return known[key][2]
    tensors = [*tower.parameters(), *tower.buffers()]
    built = folded_copy(tower, keep, {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mode, torch.float32))
    known[key] = (tensors, _fingerprint(tensors), built)
    return built
