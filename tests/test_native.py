"""npukit's C kernels built for other CPUs than this one.

Each kernel has code paths per vector width (csrc/*.c: AVX512, AVX / AVX2, and plain 4-wide vectors that ARM's
NEON builds and x86 without AVX take), but a machine builds only its own (``-march=native``). Here the kernel
tests run again in a fresh process with ``NPUKIT_CFLAGS`` targeting an AVX2 machine and a machine without AVX,
each into a kernel cache of its own, so a CI host with AVX512 also checks the paths our users' AVX2 ModelArts
flavours and Kunpeng hosts run.
"""
from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from npukit.engine import native

ROOT = Path(__file__).resolve().parent.parent
# the tests that call the C kernels directly or check the engine's tokens against HF on them
KERNEL_TESTS = ["tests/test_cpu_ops.py", "tests/test_cpu_attention.py", "tests/test_runner.py",
                "tests/test_quant.py"]
SELECT = ("cpu_ops or cpu_attention or kernel or panel or greedy_decode_matches_hf_generate_tiny or many_decodes "
          "or bf16_linear or quantize_lm_head or chunked_prefill or bf16_runs_close")
# target -> (flags, the macro that must be defined, the one that must not be, torch's matching CPU capability)
TARGETS = {"avx2": (["-march=haswell"], "__AVX2__", "__AVX512F__", "avx2"),
           "no-avx": (["-march=x86-64"], "__SSE2__", "__AVX__", "default")}

compiler = native.c_compiler()
x86_with_cc = pytest.mark.skipif(compiler is None or platform.machine() not in ("x86_64", "AMD64"),
                                 reason="needs an x86-64 host with a C compiler")


def _macros(flags: list[str]) -> str:
    cmd = [compiler, *native.FLAG_SETS[0], *flags, "-dM", "-E", "-x", "c", os.devnull]
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout


@x86_with_cc
@pytest.mark.parametrize("target", TARGETS)
def test_the_kernel_tests_pass_when_the_kernels_are_built_for_another_cpu(target, tmp_path):
    flags, defined, undefined, capability = TARGETS[target]
    macros = _macros(flags)  # NPUKIT_CFLAGS come after npukit's -march=native, so they decide the target
    assert f"#define {defined} " in macros and f"#define {undefined} " not in macros
    env = dict(os.environ, NPUKIT_CFLAGS=" ".join(flags), NPUKIT_KERNEL_CACHE=str(tmp_path),
               ATEN_CPU_CAPABILITY=capability)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", SELECT,
                           *KERNEL_TESTS], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    built = {p.name.rsplit("-", 1)[0] for p in tmp_path.glob("*.so")}
    assert {"panel_gemm", "paged_attention", "layer_ops", "quant_rows"} <= built, built
