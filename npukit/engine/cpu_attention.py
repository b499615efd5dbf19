"""Paged decode attention on CPU: one C kernel (``csrc/paged_attention.c``) that reads K/V in place.

The portable path gathers each decode sequence's blocks into a contiguous copy and runs SDPA on it. On a
2-core Xeon, SmolLM2 fp32, 64 sequences of 384 tokens, that gather + SDPA took ~60 % of the decode step: it
moves every K/V byte three times (read, write the copy, read it again) in many small calls. vLLM-CPU, like
vLLM on GPUs, runs a paged-attention kernel instead that walks the block table; this is npukit's, in ~80
lines of C that the compiler vectorises (``-O3 -march=native``), parallel over sequences with OpenMP:
2.4-2.8 ms a layer where gather + SDPA took 6.8 (``python benchmarks/bench_runner.py --context 384``
shows the step time and attention's share).

It is compiled at first use with the system C compiler (``$CC``, else ``cc`` / ``gcc``: the one
torch.compile's inductor needs on CPU too) into ``$NPUKIT_KERNEL_CACHE`` (default
``~/.cache/npukit/kernels``), one file per source, flags and CPU model, so a home folder shared by different
machines never loads a kernel built for another CPU. No compiler, a failed build or ``NPUKIT_CPU_ATTENTION=0``
(to compare) leave the runner on gather + SDPA, with one logged line saying why. float32 only: other dtypes
take the portable path.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("csrc") / "paged_attention.c"
# tried in turn: 512-bit vectors where the CPU has them (x86 flag; 88 vs 98 ms for 30 layers of 64 sequences
# x 384 tokens on an AVX512 Xeon), then flags some compilers lack (-march=native on older aarch64 gcc, OpenMP:
# then one thread)
FLAG_SETS = (["-march=native", "-mprefer-vector-width=512", "-fopenmp"], ["-march=native", "-fopenmp"],
             ["-fopenmp"], [])
COMPILE_FLAGS = ["-O3", "-ffast-math", "-fPIC", "-c"]
# NOTE: linked in a second command WITHOUT -ffast-math: with it gcc links crtfastmath.o, whose constructor turns on
# flush-to-zero for the whole process when the library loads (torch's and Python's float math with it).
LINK_FLAGS = ["-shared", "-lm"]

_log = logging.getLogger(__name__)


def _cpu_id() -> str:
    """The CPU model and feature flags (Linux), else what platform says: part of the kernel's cache key."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    keep = [ln for ln in lines if ln.split(":")[0].strip() in ("model name", "flags", "Features", "CPU part")]
    return "\n".join(dict.fromkeys(keep)) or f"{platform.machine()} {platform.processor()}"


def cache_dir() -> Path:
    env = os.environ.get("NPUKIT_KERNEL_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "npukit" / "kernels"


def _build(compiler: str, out: Path) -> list[str]:
    """Compile SOURCE into ``out`` with the first flag set that works; returns the flags used."""
    errors = []
    for flags in FLAG_SETS:
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            obj, tmp_so = Path(tmp, "kernel.o"), Path(tmp, out.name)
            omp = [f for f in flags if f == "-fopenmp"]
            for cmd in ([compiler, *COMPILE_FLAGS, *flags, str(SOURCE), "-o", str(obj)],
                        [compiler, str(obj), *LINK_FLAGS, *omp, "-o", str(tmp_so)]):
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
                if proc.returncode != 0:
                    errors.append(f"{' '.join(cmd)}: {proc.stderr.strip()[-300:]}")
                    break
            else:
                os.replace(tmp_so, out)  # NOTE: atomic, so that processes building at once never see half a file
                return flags
    raise RuntimeError("; ".join(errors))


@functools.cache
def load():
    """The kernel as a ctypes function, or None (logged once) when it cannot be built or is switched off."""
    if os.environ.get("NPUKIT_CPU_ATTENTION", "1") == "0":
        _log.info("NPUKIT_CPU_ATTENTION=0: CPU decode attention gathers the blocks and runs SDPA")
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    try:
        if compiler is None:
            raise RuntimeError("no C compiler found (apt-get install gcc, or set CC)")
        recipe = [SOURCE.read_text(), compiler, repr(FLAG_SETS), repr(COMPILE_FLAGS), repr(LINK_FLAGS), _cpu_id()]
        key = hashlib.sha256("\n".join(recipe).encode()).hexdigest()[:16]
        so = cache_dir() / f"paged_attention-{key}.so"
        if not so.exists():
            so.parent.mkdir(parents=True, exist_ok=True)
            flags = _build(compiler, so)
            _log.info("built the CPU paged-attention kernel %s (%s)", so, " ".join(flags) or "no extra flags")
        fn = ctypes.CDLL(str(so)).npukit_paged_decode_f32
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        _log.warning("CPU paged-attention kernel unavailable, decode attention gathers the blocks and runs SDPA "
                     "(slower): %s: %s", type(e).__name__, e)
        return None
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    fn.argtypes = [p, p, p, p, p, i64, i64, i64, i64, i64, i64, i64, ctypes.c_float, p, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def paged_decode_attention(kernel, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, ctx_lens: torch.Tensor, window: int | None, scale: float,
                           out: torch.Tensor) -> None:
    """``out[i] = softmax(q[i] K_i^T * scale) V_i`` over the first ``ctx_lens[i]`` positions of sequence i's
    blocks (the last ``window`` of them with a sliding window), written into ``out``.

    ``q``, ``out``: ``[b, num_heads, head_dim]`` float32; caches ``[num_blocks, block_size, num_kv_heads,
    head_dim]``; ``block_tables`` int64 ``[b, max_blocks]``, ``ctx_lens`` int64 ``[b]``, all contiguous CPU
    tensors. The caller guarantees every block id the lengths reach is a valid block: the kernel does not check.
    """
    b, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    for t in (q, k_cache, v_cache, block_tables, ctx_lens, out):
        if not t.is_contiguous() or t.device.type != "cpu":
            raise ValueError("paged_decode_attention takes contiguous CPU tensors")
    if q.dtype != torch.float32 or out.dtype != torch.float32 or k_cache.dtype != torch.float32:
        raise ValueError(f"the CPU paged-attention kernel is float32 only, got {q.dtype} / {k_cache.dtype}")
    if block_tables.dtype != torch.int64 or ctx_lens.dtype != torch.int64 or block_tables.shape[0] != b:
        raise ValueError("block_tables [b, max_blocks] and ctx_lens [b] must be int64, one row per query")
    rc = kernel(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), block_tables.data_ptr(), ctx_lens.data_ptr(),
                b, num_heads, num_kv_heads, head_dim, block_size, block_tables.shape[1], window or 0, scale,
                out.data_ptr(), torch.get_num_threads())
    if rc != 0:
        raise MemoryError("the CPU paged-attention kernel could not allocate its score buffer")
