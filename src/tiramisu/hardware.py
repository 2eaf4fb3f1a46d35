"""Device and numeric precision, shared by training and inference.

``auto`` everywhere means: CUDA when there is a GPU; bf16 autocast where the hardware computes
bf16 natively (CPUs with AVX512-BF16/AMX, Ampere+ GPUs), fp16 on older GPUs, fp32 elsewhere;
channels_last together with reduced precision (what oneDNN and tensor cores want). BENCHMARKS.md
has the measurements behind these defaults.
"""

from __future__ import annotations

import contextlib
import os
import platform
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .errors import TiramisuError

AMP_MODES = ("none", "bf16", "fp16")


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; asking for CUDA without a GPU is an error."""
    name = str(name)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TiramisuError("--device cuda was asked for but no CUDA GPU is available")
    try:
        return torch.device(name)
    except RuntimeError:
        raise TiramisuError(f"unknown device {name!r} (auto, cpu, cuda, cuda:1, ...)") from None


def resolve_amp(device: torch.device, amp: Any) -> str:
    """``auto`` -> what this device computes natively; ``None``/``False`` -> ``none``."""
    if amp in (None, False):
        return "none"
    if amp != "auto":
        if amp not in AMP_MODES:
            raise TiramisuError(f"amp must be auto, none, bf16 or fp16, got {amp!r}")
        return amp
    if native_bf16(device):
        return "bf16"
    return "fp16" if device.type == "cuda" else "none"


def flush_denormals() -> bool:
    """Make this process's CPU arithmetic treat subnormal floats as zero; False where unsupported.

    Long training leaves weights and optimizer state in subnormal range (FC-DenseNet56 after 106
    CamVid epochs: 0.48 M subnormal weights) and keeps producing subnormals in gradients, and some
    x86 CPUs compute on them through a slow path: a training step took 24.3 s instead of 3.3 s on
    an AVX512 Xeon (benchmarks/subnormals.py). Values below 1.2e-38 carry nothing a network can
    use. The flag lives in each thread's MXCSR and new threads copy it from their creator, so this
    must run before the first parallel operation starts PyTorch's worker threads (the CLI calls it
    first thing).
    """
    return bool(torch.set_flush_denormal(True))


def subnormal_mask(tensor: Tensor) -> Tensor:
    """Where a float32 tensor holds subnormals, read from the bits (with subnormals flushed, float
    comparisons would see them as zero)."""
    bits = tensor.detach().view(torch.int32)
    return ((bits & 0x7F800000) == 0) & ((bits & 0x007FFFFF) != 0)


@torch.no_grad()
def zero_subnormals_(tensors: torch.nn.Module | Iterable[Tensor]) -> int:
    """Set the subnormal float32 values of a module's weights and buffers (or of ``tensors``) to
    zero in place; returns how many there were.

    For inference without touching the process-wide flag: a checkpoint's subnormal weights made a
    full-frame FC-DenseNet56 forward 1.8x slower on an AVX512 Xeon, and zeroing them once gave
    the flag's speed (benchmarks/subnormals.py). Training needs the flag: new subnormals keep
    appearing in gradients and optimizer state.
    """
    if isinstance(tensors, torch.nn.Module):
        tensors = [*tensors.parameters(), *tensors.buffers()]
    count = 0
    for tensor in tensors:
        if tensor.dtype == torch.float32:
            subnormal = subnormal_mask(tensor)
            count += int(subnormal.sum())
            tensor.masked_fill_(subnormal, 0.0)
    return count


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 in hardware rather than emulating it."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return _cpu_native_bf16()
    return False


def _cpu_native_bf16() -> bool:
    # oneDNN reports bf16 "supported" on any AVX512 x86 CPU, but without AVX512-BF16 or AMX it
    # emulates the arithmetic: a FC-DenseNet56 training step took 6.9 s in bf16 against 4.2 s in
    # fp32 on an AVX512 Xeon (BENCHMARKS.md). torch.cpu's probes tell the two apart; they are
    # private, hence the fallback for builds or architectures that lack them.
    probe_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    probe_amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    probe_x86 = getattr(torch.cpu, "_is_avx2_supported", None)
    if probe_bf16 is not None and probe_amx is not None and probe_x86 is not None and probe_x86():
        return bool(probe_bf16() or probe_amx())
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def cpu_model_name(cpuinfo: str | None = None) -> str:
    """The CPU's marketing name (``/proc/cpuinfo`` on Linux), else what ``platform`` knows.

    Hypervisors often hide the model behind a generic name ("AMD EPYC"): two CPUs a generation
    apart then read the same while one trains 2.7x slower than the other (the CamVid run's
    history). A name without a model number gets the CPU family and model appended, which the
    hypervisor passes through and which tell the generations apart.
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        if not line.strip():
            break  # the first processor's block says it for all of them
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name")
    if not name:
        return platform.processor() or platform.machine() or "unknown CPU"
    if not any(ch.isdigit() for ch in name) and "cpu family" in fields and "model" in fields:
        name += f" family {fields['cpu family']} model {fields['model']}"
    return name


def describe_machine(device: torch.device) -> str:
    """What a training epoch ran on, as one line for the run's history and reports.

    Epoch times of one run differ 4x between the machines it is resumed on (BENCHMARKS.md), so
    the history keeps, per epoch, what decides them: the GPU, or the CPU with the instruction set
    PyTorch dispatches to, its bf16 support, the threads used and whether tcmalloc was preloaded.
    """
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        text = torch.cuda.get_device_name(index)
    else:
        isa = torch.backends.cpu.get_cpu_capability()
        if _cpu_native_bf16():
            isa += ", native bf16"
        text = f"{cpu_model_name()} ({isa}), {torch.get_num_threads()} threads"
        if "tcmalloc" in os.environ.get("LD_PRELOAD", ""):
            text += ", tcmalloc"
    return f"{text}; torch {torch.__version__.split('+')[0]}"


def precision_label(amp: str, channels_last: bool) -> str:
    """``fp32``, ``bf16``, ``fp16``, with ``+ channels_last`` when that layout was used."""
    text = "fp32" if amp == "none" else amp
    return f"{text} + channels_last" if channels_last else text


def resolve_channels_last(channels_last: Any, amp: str) -> bool:
    return amp != "none" if channels_last == "auto" else bool(channels_last)


def resolve_precision(device: torch.device, amp: Any, channels_last: Any) -> tuple[str, bool]:
    """A config's ``amp`` / ``channels_last`` (either may be ``auto``) -> this device's choice."""
    amp = resolve_amp(device, amp)
    return amp, resolve_channels_last(channels_last, amp)


def autocast_context(device: torch.device, amp: Any) -> contextlib.AbstractContextManager:
    amp = resolve_amp(device, amp)
    if amp == "none":
        return contextlib.nullcontext()
    if amp == "fp16" and device.type != "cuda":
        raise TiramisuError("amp=fp16 needs a CUDA GPU; use bf16 on CPU")
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def to_device(x: Tensor, device: torch.device, channels_last: bool = False) -> Tensor:
    x = x.to(device, non_blocking=True)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def _load_malloc_trim() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        return ctypes.CDLL(None).malloc_trim  # glibc; musl (Alpine) has none
    except (OSError, AttributeError):
        return None


_malloc_trim = _load_malloc_trim()


def release_freed_memory() -> None:
    """Hand memory that the C allocator keeps after ``free`` back to the system (glibc only).

    Each tile's forward pass allocates and frees a few hundred MB of activations on the CPU;
    glibc keeps freed blocks in its heaps, and over hundreds of tiles their fragments add up,
    so a long tiled prediction would grow well past what one tile needs. Trimming before each
    row of tiles keeps it flat at 5-7 % of the time (the next forward pass faults its pages
    back in); after every tile it cost 33 % (BENCHMARKS.md, tiled memory).
    """
    if _malloc_trim is not None:
        _malloc_trim(0)
