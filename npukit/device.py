"""Devices: pick npu > cuda > mps > cpu, read memory, synchronize, probe dtype support.

NOTE: the NPU is checked first. torch_npu installs a "transfer" shim that can make
`torch.cuda.is_available()` answer for the NPU, so asking CUDA first would mislabel an Ascend box.
NPU code paths are real (`torch.npu.*`) but untested here: our CI has no NPU.
"""
from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass

import torch

KINDS = ("npu", "cuda", "mps", "cpu")


class DeviceError(RuntimeError):
    """A device that was asked for is not usable here; the message says what to do."""


@functools.lru_cache(maxsize=None)
def torch_npu_available() -> bool:
    """True when torch_npu imports and reports at least one NPU."""
    if importlib.util.find_spec("torch_npu") is None:
        return False
    try:
        import torch_npu  # noqa: F401  (registers torch.npu)
    except Exception:  # a torch / torch_npu / CANN mismatch raises all sorts of errors at import
        return False
    return bool(getattr(torch, "npu", None) and torch.npu.is_available())


def is_available(kind: str) -> bool:
    if kind == "npu":
        return torch_npu_available()
    if kind == "cuda":
        return torch.cuda.is_available() and not torch_npu_available()
    if kind == "mps":
        return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    return kind == "cpu"


def detect() -> str:
    """The best device kind available: 'npu', 'cuda', 'mps' or 'cpu'."""
    return next(k for k in KINDS if is_available(k))


_INSTALL_HINT = {
    "npu": ("torch_npu is not installed or sees no NPU. On an Ascend machine install the torch_npu that matches "
            "your torch and CANN (`pip install \"npukit[npu]\"`, see `npukit doctor` for the pairing table) and "
            "source CANN's environment: `source /usr/local/Ascend/ascend-toolkit/set_env.sh`. "
            "Or use device='auto'."),
    "cuda": "CUDA is not available: install a CUDA build of torch on a machine with an NVIDIA GPU, "
            "or use device='auto'.",
    "mps": "MPS is only available on Apple-silicon Macs; use device='auto'.",
}


def resolve(device: str | torch.device | None = "auto") -> torch.device:
    """Turn 'auto', 'npu', 'npu:1', 'cuda', 'cpu', … into a usable torch.device, or raise DeviceError."""
    if device is None or device == "auto":
        device = detect()
    if isinstance(device, torch.device):
        return device
    # NOTE: parse the kind before torch.device(): without torch_npu, torch.device("npu") itself raises.
    kind = str(device).split(":")[0]
    if kind not in KINDS:
        raise DeviceError(f"unknown device {str(device)!r}: use one of 'auto', {', '.join(map(repr, KINDS))}")
    if not is_available(kind):
        raise DeviceError(_INSTALL_HINT[kind])
    dev = torch.device(device)
    if dev.type in ("npu", "cuda") and dev.index is None:
        dev = torch.device(dev.type, 0)
    return dev


def _backend(dev: torch.device):
    return getattr(torch, dev.type) if dev.type in ("npu", "cuda", "mps") else None


def device_name(device: str | torch.device = "auto") -> str:
    dev = resolve(device)
    if dev.type in ("npu", "cuda"):
        return _backend(dev).get_device_name(dev.index)
    if dev.type == "mps":
        return "Apple MPS"
    import platform

    return platform.processor() or platform.machine() or "cpu"


def device_count(kind: str | None = None) -> int:
    kind = kind or detect()
    if kind in ("npu", "cuda"):
        return _backend(torch.device(kind)).device_count() if is_available(kind) else 0
    return 1 if is_available(kind) else 0


@dataclass
class MemoryStats:
    """Bytes. On CPU: allocated = process RSS, peak = peak RSS, free/total = system memory."""

    device: str
    allocated: int
    peak: int
    free: int
    total: int


def memory_stats(device: str | torch.device = "auto") -> MemoryStats:
    dev = resolve(device)
    if dev.type in ("npu", "cuda"):
        be = _backend(dev)
        free, total = be.mem_get_info(dev.index)
        return MemoryStats(str(dev), be.memory_allocated(dev.index), be.max_memory_allocated(dev.index), free, total)
    import psutil

    vm = psutil.virtual_memory()
    if dev.type == "mps":
        alloc = torch.mps.current_allocated_memory()
        return MemoryStats(str(dev), alloc, alloc, vm.available, vm.total)
    rss = psutil.Process().memory_info().rss
    return MemoryStats(str(dev), rss, max(rss, _peak_rss()), vm.available, vm.total)


def _peak_rss() -> int:
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    except (ImportError, OSError):
        return 0


def reset_peak_memory_stats(device: str | torch.device = "auto") -> None:
    """Reset the peak counter (NPU/CUDA). CPU peak RSS cannot be reset: it is the process's high-water mark."""
    dev = resolve(device)
    if dev.type in ("npu", "cuda"):
        _backend(dev).reset_peak_memory_stats(dev.index)


def synchronize(device: str | torch.device = "auto") -> None:
    """Wait for queued kernels: without it NPU/CUDA timings measure only the launch."""
    dev = resolve(device)
    be = _backend(dev)
    if be is not None:
        be.synchronize()


def empty_cache(device: str | torch.device = "auto") -> None:
    dev = resolve(device)
    be = _backend(dev)
    if be is not None:
        be.empty_cache()


@functools.lru_cache(maxsize=None)
def _probe(dev_str: str, dtype: torch.dtype) -> tuple[bool, str]:
    dev = torch.device(dev_str)
    try:
        a = torch.randn(16, 16, device=dev).to(dtype)
        b = torch.nn.functional.silu(a @ a.T)
        ok = bool(torch.isfinite(b.float()).all())
        synchronize(dev)
    except Exception as e:  # e.g. 310P / 910A have no bf16 kernels
        return False, f"{dtype} matmul failed on {dev_str}: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return (ok, "ok") if ok else (False, f"{dtype} matmul gave non-finite values on {dev_str}")


def supports_dtype(device: str | torch.device, dtype: torch.dtype) -> tuple[bool, str]:
    """Really run a small matmul in `dtype` on the device: (supported, reason)."""
    dev = resolve(device)
    if dtype == torch.float32:
        return True, "ok"
    if dev.type == "npu" and dtype == torch.bfloat16:
        soc = os.environ.get("NPUKIT_SOC_VERSION", "")
        try:
            soc = soc or torch.npu.get_device_name(dev.index)
        except Exception:
            pass
        if any(s in soc for s in ("310P", "910A", "Ascend910A")):
            return False, f"{soc} has no bf16: use fp16 (Atlas 300I Duo / 910A)"
    return _probe(str(dev), dtype)


# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) that still include a native bf16 dot product (AVX512-BF16, AMX, AVX10).
_BF16_ISA_MARKERS = ("BF16", "AMX", "AVX512_CORE_FP16", "AVX10", "ALL")


def cpu_isa_cap() -> str | None:
    """Why bf16 matmul cannot be native here because an environment variable caps the CPU's ISA, or None.

    ``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2`` makes an AVX512-BF16 machine behave like an
    AVX2-only one (torch's own kernels and oneDNN's). Each variable caps only its own library.
    """
    # NOTE: oneDNN's bf16 check (torch.ops.mkldnn._is_mkldnn_bf16_supported) already honours
    # ONEDNN_MAX_CPU_ISA=AVX2, but answers True for AVX512_CORE (bf16 emulated, slower than fp32 there),
    # and it ignores ATEN_CPU_CAPABILITY entirely: so read both caps here.
    onednn = os.environ.get("ONEDNN_MAX_CPU_ISA", os.environ.get("DNNL_MAX_CPU_ISA", "")).strip().upper()
    if onednn and not any(m in onednn for m in _BF16_ISA_MARKERS):
        return f"ONEDNN_MAX_CPU_ISA={onednn} caps oneDNN below AVX512-BF16"
    aten = os.environ.get("ATEN_CPU_CAPABILITY", "").strip()
    if aten and torch.backends.cpu.get_cpu_capability() in ("DEFAULT", "AVX2"):
        return f"ATEN_CPU_CAPABILITY={aten} caps torch's CPU kernels at {torch.backends.cpu.get_cpu_capability()}"
    return None


def cpu_has_fast_bf16() -> bool:
    """True when this CPU has native bf16 matmul (AVX512-BF16 / AMX), where bf16 beats fp32.

    False when ``ONEDNN_MAX_CPU_ISA`` / ``ATEN_CPU_CAPABILITY`` cap the ISA below that (`cpu_isa_cap`).
    """
    if cpu_isa_cap() is not None:
        return False
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:
        return False
