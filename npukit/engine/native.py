"""npukit's own C kernels (``csrc/*.c``): built with the system C compiler at first use, cached, loaded with ctypes.

``load_library("paged_attention")`` compiles ``csrc/paged_attention.c`` into ``$NPUKIT_KERNEL_CACHE``
(default ``~/.cache/npukit/kernels``), one file per source, flags, compiler and CPU model, so a home folder
shared by different machines never loads a library built for another CPU (``-march=native``). The compiler
is ``$CC``, else ``cc`` / ``gcc``: the one torch.compile's inductor needs on CPU too. The kernels are plain
C loops that the compiler vectorises, parallel with OpenMP (torch's own libgomp once torch is loaded).
``$NPUKIT_CFLAGS`` adds compiler flags after npukit's own, so they win: ``-march=haswell`` builds the AVX2
code paths on an AVX512 machine, ``-march=x86-64`` the 4-wide one that targets without AVX take (ARM hosts'
NEON builds run that C too); the test suite checks the kernels built both ways (tests/test_native.py).
Returns None, with one logged warning saying why, when there is no compiler or the build fails: every
caller keeps a portable torch path for that case.
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

CSRC = Path(__file__).with_name("csrc")
# tried in turn: 512-bit vectors where the CPU has them (x86 flag; the paged-attention kernel took 88 vs 98 ms
# for 30 layers of 64 sequences x 384 tokens on an AVX512 Xeon), then flags some compilers lack (-march=native
# on older aarch64 gcc, OpenMP: then one thread)
FLAG_SETS = (["-march=native", "-mprefer-vector-width=512", "-fopenmp"], ["-march=native", "-fopenmp"],
             ["-fopenmp"], [])
COMPILE_FLAGS = ["-O3", "-ffast-math", "-fPIC", "-c"]
# NOTE: linked in a second command WITHOUT -ffast-math: with it gcc links crtfastmath.o, whose constructor turns on
# flush-to-zero for the whole process when the library loads (torch's and Python's float math with it).
LINK_FLAGS = ["-shared", "-lm"]

_log = logging.getLogger(__name__)


def _cpu_id() -> str:
    """The CPU model and feature flags (Linux), else what platform says: part of a library's cache key."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    keep = [ln for ln in lines if ln.split(":")[0].strip() in ("model name", "flags", "Features", "CPU part")]
    return "\n".join(dict.fromkeys(keep)) or f"{platform.machine()} {platform.processor()}"


def _extra_flags() -> list[str]:
    return os.environ.get("NPUKIT_CFLAGS", "").split()


def c_compiler() -> str | None:
    """The C compiler the kernels are built with: ``$CC``, else ``cc`` or ``gcc`` on the PATH, or None."""
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def cache_dir() -> Path:
    env = os.environ.get("NPUKIT_KERNEL_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "npukit" / "kernels"


def _build(compiler: str, source: Path, out: Path) -> list[str]:
    """Compile ``source`` into ``out`` with the first flag set that works; returns the flags used."""
    errors = []
    for flags in FLAG_SETS:
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            obj, tmp_so = Path(tmp, "kernel.o"), Path(tmp, out.name)
            omp = [f for f in flags if f == "-fopenmp"]
            for cmd in ([compiler, *COMPILE_FLAGS, *flags, *_extra_flags(), str(source), "-o", str(obj)],
                        [compiler, str(obj), *LINK_FLAGS, *omp, "-o", str(tmp_so)]):
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
                if proc.returncode != 0:
                    errors.append(f"{' '.join(cmd)}: {proc.stderr.strip()[-300:]}")
                    break
            else:
                os.replace(tmp_so, out)  # NOTE: atomic, so that processes building at once never see half a file
                return flags
    raise RuntimeError("; ".join(errors))


def load_functions(name: str, signatures: dict[str, tuple[list, object]],
                   switch: str | None = None) -> ctypes.CDLL | None:
    """``load_library(name)`` with the argument and result types of its C functions set (``{function: (argtypes,
    restype)}``), or None where it cannot be built, or when the environment variable ``switch`` is "0" (logged:
    the caller's torch path runs instead, to compare)."""
    if switch is not None and os.environ.get(switch, "1") == "0":
        _log.info("%s=0: npukit's C kernel %r is switched off, the torch path runs instead", switch, name)
        return None
    lib = load_library(name)
    if lib is not None:
        for function, (argtypes, restype) in signatures.items():
            fn = getattr(lib, function)
            fn.argtypes, fn.restype = argtypes, restype
    return lib


@functools.cache
def load_library(name: str) -> ctypes.CDLL | None:
    """``csrc/<name>.c`` built (once per CPU and source) and loaded, or None (logged) when it cannot be."""
    source = CSRC / f"{name}.c"
    compiler = c_compiler()
    try:
        if compiler is None:
            raise RuntimeError("no C compiler found (apt-get install gcc, or set CC)")
        headers = [h.read_text() for h in sorted(CSRC.glob("*.h"))]  # what the sources #include
        recipe = [source.read_text(), *headers, compiler, repr(FLAG_SETS), repr(COMPILE_FLAGS), repr(LINK_FLAGS),
                  _cpu_id(), repr(_extra_flags())]
        key = hashlib.sha256("\n".join(recipe).encode()).hexdigest()[:16]
        so = cache_dir() / f"{name}-{key}.so"
        if not so.exists():
            so.parent.mkdir(parents=True, exist_ok=True)
            flags = _build(compiler, source, so)
            _log.info("built %s (%s)", so, " ".join(flags) or "no extra flags")
        return ctypes.CDLL(str(so))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        _log.warning("npukit's C kernel %r is unavailable, the slower torch path runs instead: %s: %s",
                     name, type(e).__name__, e)
        return None
