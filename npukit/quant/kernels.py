"""The int8 matmuls behind W8A16 and W8A8, one small function per (method, kernel), and the probe that
picks one per device and batch size at load time.

Every kernel computes ``y[M, N] = x[M, K] @ dequant(w)[N, K].T`` for an int8 weight ``w`` with one fp32
scale per output channel (``w_scale[N]``); they differ in what runs underneath:

| method | kernel          | where          | what it does                                                        |
|--------|-----------------|----------------|---------------------------------------------------------------------|
| w8a16  | `int8pack`      | CPU (torch≥2.3)| `aten._weight_int8pack_mm(x, w, scale)`: int8 weights, x in its dtype |
| w8a16  | `int8pack_bf16` | CPU            | the same with x cast to bf16 (wins at M=1 even on AVX2, per DESIGN.md)  |
| w8a16  | `panel`         | CPU            | npukit's C panel GEMM on a copy of w in panels of 32 outputs (below)   |
| w8a16  | `dequant`       | anywhere       | `F.linear(x, w.to(x.dtype)) * scale`: the plain fallback              |
| w8a16  | `npu`           | Ascend         | `torch_npu.npu_weight_quant_batchmatmul` (vLLM-Ascend's W8A16; UNTESTED) |
| w8a8   | `int_mm`        | CPU, CUDA      | x quantised per token, `torch._int_mm` int8×int8→int32 (fast with VNNI) |
| w8a8   | `panel`         | CPU            | x quantised per token, its integers through W8A16's panel kernel      |
| w8a8   | `dequant`       | anywhere       | x quantised per token, the same integers in fp32: no int8 speed  |
| w8a8   | `npu`           | Ascend         | `npu_dynamic_quant` + `npu_quant_matmul` (W8A8_DYNAMIC; UNTESTED) |

``panel`` is npukit.engine.cpu_gemm's panel kernel reading int8 panels: each weight is widened to fp32 in
registers, so batch-1 decode reads a quarter of fp32's bytes (SmolLM2's 210 layer linears at one row, 2 threads
on a 2-core Xeon: 5.7-7.4 ms, against 67-95 for int8pack and 18-21 for fp32 F.linear). It runs on a copy
of the weight (``COPIES``), made once by the layer that holds the weight (QuantLinear): the int8 weights are
then in memory twice (still half of fp32), and the state_dict holds the ``[out, in]`` one. bf16 / fp16 rows are
widened to fp32 for it and the result cast back (``cpu_gemm.panel_linear``): on an AVX512-BF16 CPU (2-core AMD EPYC) a
bf16 model's one-row 1536x576 linear took 55 us on it against 115 for int8pack.

W8A8's decode rows can take the panel kernel too (``w8a8_panel``): x quantised per token, its integers widened to
fp32 and multiplied by the int8 panels (products and sums exact while |sum| < 2**24, as in ``dequant``). It saves
weight bytes, not arithmetic: on a 2-core AMD EPYC (VNNI) SmolLM2's q/k/v-sized 1728x576 linear at one row took
71 us against 115 for ``torch._int_mm``, and at 64 rows 2238 against 267, where int8 arithmetic wins.

W8A8's steps around the int8 matmul, quantising x per token and scaling the int32 sums back to fp32 (or bf16), run
in npukit's C code on CPU for fp32 and bf16 rows (``csrc/quant_rows.c``, the same bits as the torch ops it replaces):
as seven and three torch ops they took longer than the int8 matmuls of a 1,800-token prefill; on bf16 rows (two
casts more) 81 us of a 64-row 192x576 linear whose int8 matmul took 24, 46 us in C (2-core AMD EPYC). The W8A8
kernels are written on the quantised rows (``W8A8_ON_INTEGERS``), so that q/k/v and gate/up quantise theirs once.

NOTE: which one is fastest depends on the CPU (VNNI or not, native bf16 or not) and on M (batch-1 decode
reads weights; 64-row steps compute), so `choose_kernels` times the candidates once per process on the
model's MLP shape, for a small M and a large M, and the layer picks by the rows it gets.
"""
from __future__ import annotations

import ctypes
import functools
import logging
import time
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..engine import cpu_gemm, cpu_ops, native

log = logging.getLogger("npukit.quant")

METHODS = ("w8a16", "w8a8")
INT8_MAX = 127  # symmetric: -127..127, so negating a value never overflows


class QuantizationError(ValueError):
    """A quantization setting that cannot run here; the message says what to do instead."""


def quantize_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float weight [N, K] -> (int8 [N, K], fp32 scale [N]): one symmetric scale per output row."""
    w32 = w.detach().float()
    scale = w32.abs().amax(dim=1).clamp_min(1e-8) / INT8_MAX
    q = torch.round(w32 / scale[:, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations [M, K] -> (int8 [M, K], fp32 scale [M, 1]): one symmetric scale per row, at run time.

    fp32 and bf16 rows on CPU go through npukit's C code (``csrc/quant_rows.c``: one pass, the same bits), else
    torch."""
    lib = _quant_rows() if x.device.type == "cpu" and x.dtype in cpu_ops.DTYPES and x.dim() == 2 else None
    if lib is not None:
        if x.stride(-1) != 1:
            x = x.contiguous()
        q, scale = torch.empty(x.shape, dtype=torch.int8), torch.empty(x.shape[0], 1)
        lib.npukit_quantize_rows(x.data_ptr(), x.stride(0), q.data_ptr(), scale.data_ptr(), x.shape[0], x.shape[1],
                                 x.dtype == torch.bfloat16, _threads(x.shape[0]))
        return q, scale
    return _quantize_per_token_torch(x)


def _quantize_per_token_torch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x32 = x.float()
    scale = x32.abs().amax(dim=1, keepdim=True).clamp_min_(1e-8).div_(INT8_MAX)
    # NOTE: |x / scale| <= 127 by construction, so no clamp; multiplying by 1/scale is one pass cheaper.
    return (x32 * scale.reciprocal()).round_().to(torch.int8), scale


def _scale_rows(acc: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int32 sums [M, N] -> ``acc * x_scale * w_scale`` (x_scale [M, 1], w_scale [N]) computed in fp32, returned in
    ``dtype``; in C on CPU for fp32 and bf16 (one pass instead of three or four), else torch."""
    lib = _quant_rows() if acc.device.type == "cpu" and dtype in cpu_ops.DTYPES else None
    if lib is None:
        return acc.to(torch.float32, memory_format=torch.contiguous_format).mul_(x_scale).mul_(w_scale).to(dtype)
    acc, x_scale, w_scale = acc.contiguous(), x_scale.contiguous(), w_scale.float().contiguous()
    y = torch.empty(acc.shape, dtype=dtype)
    lib.npukit_scale_rows(acc.data_ptr(), x_scale.data_ptr(), w_scale.data_ptr(), y.data_ptr(), acc.shape[0],
                          acc.shape[1], dtype == torch.bfloat16, _threads(acc.shape[0]))
    return y


def _threads(rows: int) -> int:
    """Threads for csrc/quant_rows.c, which splits rows: no more than there are rows (a decode row on two threads
    woke a thread for nothing)."""
    return max(1, min(torch.get_num_threads(), rows))


@functools.cache
def _quant_rows():
    """csrc/quant_rows.c through ctypes, or None (logged once) where it cannot be built."""
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    return native.load_functions("quant_rows", {
        "npukit_quantize_rows": ([p, i64, p, p, i64, i64, ctypes.c_int, ctypes.c_int], None),
        "npukit_scale_rows": ([p, p, p, p, i64, i64, ctypes.c_int, ctypes.c_int], None)})


# ---------------------------------------------------------------- W8A16: int8 weights, float activations
def w8a16_int8pack(x, w, w_scale):
    return torch.ops.aten._weight_int8pack_mm(x, w, w_scale.to(x.dtype))


def w8a16_int8pack_bf16(x, w, w_scale):
    return torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), w, w_scale.to(torch.bfloat16)).to(x.dtype)


def w8a16_dequant(x, w, w_scale):
    # NOTE: scaling the output rows equals scaling the weight rows first (one scale per output channel),
    # and touches N numbers per row instead of N*K.
    return F.linear(x, w.to(x.dtype)) * w_scale.to(x.dtype)


def w8a16_panel(x, w, w_scale):
    return cpu_gemm.panel_linear(x, _panels(w), w.shape[0], scale=w_scale)


def _panels(w: torch.Tensor) -> torch.Tensor:
    """The panel copy the layer that holds ``w`` made (make_copy)."""
    panels = _COPIES.get(_key(w))
    if panels is None:  # NOTE: a weight nobody packed (the probe's checks): pack it now
        panels = cpu_gemm.pack_panels(w)
    return panels


# the kernels that run on a copy of the int8 weight in their own layout, and how to make it
COPIES = {"panel": cpu_gemm.pack_panels}
# a weight (its address, shape and strides: a shard can start where the whole weight does) -> the copy made for
# it, while the copy lives (the layer that holds the weight keeps it)
_COPIES: weakref.WeakValueDictionary[tuple, torch.Tensor] = weakref.WeakValueDictionary()


def _key(w: torch.Tensor) -> tuple:
    return w.data_ptr(), w.shape, w.stride()


def make_copy(kernel: str, w: torch.Tensor) -> torch.Tensor | None:
    """The copy of ``w`` that ``kernel`` runs on, or None when it runs on ``w`` itself. Keep it as long as ``w``:
    the kernel finds it by ``w`` (change ``w`` in place afterwards and it goes stale)."""
    if kernel not in COPIES:
        return None
    copy = _COPIES[_key(w)] = COPIES[kernel](w)
    return copy


def w8a16_npu(x, w, w_scale):  # UNTESTED: no Ascend NPU here; the call vLLM-Ascend's W8A16 method makes
    import torch_npu

    # NOTE: vLLM-Ascend transposes the weight to [K, N] (and casts it to the NZ format) once at load.
    return torch_npu.npu_weight_quant_batchmatmul(x=x, weight=w.t(), antiquant_scale=w_scale.to(x.dtype))


# ---------------------------------------------------------------- W8A8: int8 weights and activations
# On CPU, W8A8 linears of at most this many rows compute ``W @ x.T`` (see w8a8_int_mm).
CPU_SWAPPED_INT_MM_ROWS = 8


# Each W8A8 kernel below is written on the integer rows: ``qx`` int8 [M, K] and ``x_scale`` [M, 1] from
# quantize_per_token, the result in ``dtype`` (the activations'). Linears that read the same rows (q/k/v,
# gate/up) quantise them once and call these (npukit.quant.linear.W8A8Group); KERNELS["w8a8"] wraps each as a
# kernel of x.
def w8a8_int_mm(qx, x_scale, w, w_scale, dtype):
    if qx.device.type == "cpu" and qx.shape[0] <= CPU_SWAPPED_INT_MM_ROWS:
        # NOTE: oneDNN's int8 GEMM ran the decode shapes (1-8 rows) of SmolLM2's layers and int8 lm_head
        # 0.66-0.91x as long in this order, conversion to float rows included; the integers are the same
        # (exact sums), so the output is bit for bit what the other order gives. From 16 rows on it lost.
        acc = torch._int_mm(w, qx.t()).t()
    else:
        acc = torch._int_mm(qx, w.t())  # int32 [M, N]: exact integer dot products
    return _scale_rows(acc, x_scale, w_scale, dtype)


def w8a8_dequant(qx, x_scale, w, w_scale, dtype):
    # NOTE: the same integers multiplied in fp32. Products and their sums stay exact while |sum| < 2**24
    # (127*127*K for K <= 1040; typical rows are far below), so this matches int_mm almost bit for bit.
    acc = F.linear(qx.float(), w.float())
    return acc.mul_(x_scale).mul_(w_scale).to(dtype)


def w8a8_panel(qx, x_scale, w, w_scale, dtype):
    # NOTE: the integer rows through W8A16's panel kernel (int8 panels widened to fp32 in registers): at decode rows
    # it reads the int8 weights at memory speed, where oneDNN's int8 GEMM reads them slower. The products and their
    # sums are exact integers while |sum| < 2**24, as in w8a8_dequant.
    return cpu_gemm.panel_linear(qx.float(), _panels(w), w.shape[0], scale=w_scale).mul_(x_scale).to(dtype)


W8A8_ON_INTEGERS = {"int_mm": w8a8_int_mm, "panel": w8a8_panel, "dequant": w8a8_dequant}


def _on_quantized_rows(kernel):
    def run(x, w, w_scale):
        return kernel(*quantize_per_token(x), w, w_scale, x.dtype)
    return run


def w8a8_npu(x, w, w_scale):  # UNTESTED: the calls of vLLM-Ascend's W8A8_DYNAMIC method
    import torch_npu

    qx, pertoken_scale = torch_npu.npu_dynamic_quant(x)
    return torch_npu.npu_quant_matmul(qx, w.t(), w_scale, pertoken_scale=pertoken_scale.flatten(),
                                      output_dtype=x.dtype)


KERNELS = {
    "w8a16": {"int8pack": w8a16_int8pack, "int8pack_bf16": w8a16_int8pack_bf16, "panel": w8a16_panel,
              "dequant": w8a16_dequant, "npu": w8a16_npu},
    "w8a8": {**{name: _on_quantized_rows(kernel) for name, kernel in W8A8_ON_INTEGERS.items()}, "npu": w8a8_npu},
}


def _int8_linear(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, method: str, kernel: str) -> torch.Tensor:
    """``KERNELS[method][kernel](x, w, w_scale)``, an op that torch.compile calls without tracing into it.

    NOTE: traced, inductor got these kernels wrong (torch 2.13, CPU): ``_int_mm(w, qx.t())`` with ``qx``
    quantised in the same graph gave garbage at one row (so W8A8 graph-mode decode at batch 1 did), and
    ``_weight_int8pack_mm`` of a bf16 cast failed to lower. Opaque, they compute what eager computes.
    """
    return KERNELS[method][kernel](x, w, w_scale).contiguous()


int8_linear = cpu_gemm.opaque_op(
    "int8_linear(Tensor x, Tensor w, Tensor w_scale, str method, str kernel) -> Tensor", _int8_linear,
    lambda x, w, w_scale, method, kernel: x.new_empty(x.shape[0], w.shape[0]))


def candidates(method: str, device_type: str, dtype: torch.dtype) -> list[str]:
    """Kernels worth trying for `method` on this device and activation dtype (the fallback last)."""
    if device_type == "npu":
        return ["npu", "dequant"]
    if method == "w8a16":
        if device_type in ("cpu", "cuda"):
            extra = ["int8pack_bf16"] if device_type == "cpu" and dtype != torch.bfloat16 else []
            if device_type == "cpu" and cpu_gemm._panel_gemm() is not None:
                extra.append("panel")  # npukit's C kernel, where a C compiler built it (npukit.engine.native)
            return ["int8pack"] + extra + ["dequant"]
        return ["dequant"]
    if device_type == "cpu":
        return ["int_mm"] + (["panel"] if cpu_gemm._panel_gemm() is not None else []) + ["dequant"]
    return ["int_mm", "dequant"] if device_type == "cuda" else ["dequant"]


@dataclass
class KernelPlan:
    """Which kernel a quantised linear runs: `small` for at most `cutoff` rows (decode), else `large`."""

    method: str
    small: str
    large: str
    cutoff: int = 16
    reasons: list[str] = field(default_factory=list)  # the probe's timings, or why a kernel was forced

    def __post_init__(self):
        for kernel in (self.small, self.large):
            if kernel not in KERNELS[self.method]:
                raise QuantizationError(f"unknown {self.method} kernel {kernel!r}; the kernels are "
                                        f"{', '.join(KERNELS[self.method])}")

    def pick(self, rows: int) -> str:
        return self.small if rows <= self.cutoff else self.large

    def run(self, x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
        """``x [M, K]`` through the kernel picked for M rows; inside torch.compile as one opaque op
        (``int8_linear``), so a compiled graph runs exactly the eager kernel."""
        kernel = self.pick(x.shape[0])
        if torch.compiler.is_compiling():
            return int8_linear(x, w, w_scale, self.method, kernel)
        return KERNELS[self.method][kernel](x, w, w_scale)

    def describe(self) -> str:
        if self.small == self.large:
            return f"{self.method}: {self.small}"
        return f"{self.method}: {self.small} for <= {self.cutoff} rows, {self.large} above"


def _time_us(fn, device: torch.device, budget_s: float = 0.25) -> float:
    """Best of 3: on CPU in process CPU time (on a shared machine wall time counts other processes' turns),
    elsewhere in wall time with the device synchronised."""
    if device.type == "cpu":
        clock = time.process_time
    else:
        from ..device import synchronize

        def clock():
            synchronize(device)
            return time.perf_counter()
    fn()  # warm-up (and first-call allocations)
    t0 = clock()
    fn()
    once = clock() - t0
    reps = max(1, min(20, int(budget_s / max(once, 1e-4))))
    best = once
    for _ in range(3):
        t0 = clock()
        for _ in range(reps):
            fn()
        best = min(best, (clock() - t0) / reps)
    return best * 1e6


@functools.lru_cache(maxsize=None)
def _probe(method: str, device: str, dtype: torch.dtype, n: int, k: int, rows: tuple[int, ...],
           threads: int) -> tuple:
    """{rows: (best kernel, {kernel: µs or error})} for random int8 weights of shape [n, k]; on CPU, rows above
    STREAM_ROWS with ``threads`` threads (the model's)."""
    dev = torch.device(device)
    if dev.type != "cpu":
        return _probe_rows(method, dev, dtype, n, k, rows)
    # NOTE: decode rows are timed on one thread: on a busy machine a multi-threaded kernel waits for a descheduled
    # sibling thread (we saw 100x swings at these microsecond calls), while one thread ranks the kernels by the
    # work they do. Larger row counts are timed with the model's threads: the kernels scale differently. At 64
    # rows of SmolLM2's fp32 W8A16 linears on a 2-core AMD EPYC, "dequant" won on one thread by 10 % and lost by
    # 20-60 % on two (its int8 -> fp32 widening of the weight does not split), so the one-thread probe gave it
    # every batch above 16 rows: W8A16 in fp32 ran 0.53x the bf16 model's 32-sequence throughput, 0.64x since.
    before = torch.get_num_threads()
    try:
        out = []
        for m in rows:
            torch.set_num_threads(1 if m <= STREAM_ROWS else threads)
            out += _probe_rows(method, dev, dtype, n, k, (m,))
        return tuple(out)
    finally:
        torch.set_num_threads(before)


# Decode-sized rows are timed on copies of the weight that add up to this many bytes (at most STREAM_COPIES of
# them: a model that small stays in cache), more than a CPU's caches hold: a decode step streams every layer's
# weights from memory, and a kernel that wins on one weight kept in cache (torch._int_mm in W8A8 at one row,
# here) can lose reading them.
STREAM_BYTES, STREAM_COPIES = 32 << 20, 64
STREAM_ROWS = 16


def _probe_rows(method: str, dev: torch.device, dtype: torch.dtype, n: int, k: int, rows: tuple[int, ...]) -> tuple:
    g = torch.Generator().manual_seed(0)
    w, w_scale = quantize_per_channel(torch.randn(n, k, generator=g))
    w, w_scale = w.to(dev), w_scale.to(dev)
    out = []
    with torch.inference_mode():
        for m in rows:
            copies = min(STREAM_COPIES, STREAM_BYTES // w.nbytes) if m <= STREAM_ROWS else 0
            ws = [w] + [w.clone() for _ in range(copies)]
            x = torch.randn(m, k, generator=g).to(dev, dtype)
            results: dict[str, float | str] = {}
            # NOTE: int8pack_bf16 rounds fp32 / fp16 rows to bf16: only for decode rows, where it can save bytes read.
            # For larger batches (prefill, many sequences) the rows keep their precision: there it won by a hair on
            # two threads and would have moved W8A16's teacher-forced top-1 agreement (97.7 -> 97.5 %).
            for name in (c for c in candidates(method, dev.type, dtype) if m <= STREAM_ROWS or c != "int8pack_bf16"):
                try:
                    packed = [make_copy(name, wi) for wi in ws]  # noqa: F841 - made beforehand, as a layer does
                    _check(method, name, x, w, w_scale)
                    results[name] = _time_us(functools.partial(_run_all, KERNELS[method][name], x, ws, w_scale),
                                             dev) / len(ws)
                except Exception as e:  # noqa: BLE001 - a kernel this build/device lacks is simply skipped
                    results[name] = f"unavailable ({type(e).__name__}: {str(e).splitlines()[0][:80]})"
            timed = {k_: v for k_, v in results.items() if isinstance(v, float)}
            best = min(timed, key=timed.get) if timed else None
            out.append((m, best, tuple(results.items())))
    return tuple(out)


def _run_all(kernel, x, ws, w_scale) -> None:
    for w in ws:
        kernel(x, w, w_scale)


def _check(method: str, kernel: str, x, w, w_scale) -> None:
    """Raise RuntimeError unless the kernel computes what the dequantise-then-matmul reference does.

    NOTE: a kernel can run and be wrong: with ``ONEDNN_MAX_CPU_ISA=AVX2`` on a CPU with VNNI (our AVX2
    emulation), torch._int_mm went to oneDNN's AVX2 int8 path and returned wrong sums (2-5 % relative error).
    """
    if method == "w8a8":
        ref = KERNELS[method]["dequant"](x, w, w_scale)
    else:
        ref = w8a16_dequant(x.double(), w, w_scale.double())
    err = ((KERNELS[method][kernel](x, w, w_scale).double() - ref.double()).norm() / ref.double().norm()).item()
    low_precision = x.dtype in (torch.bfloat16, torch.float16) or kernel.endswith("bf16")
    if not err < (2e-2 if low_precision else 1e-4):  # bf16 activations: ~4e-3; fp32: ~1e-7
        raise RuntimeError(f"relative error {err:.1e} against the reference")


def choose_kernels(method: str, device: torch.device | str, dtype: torch.dtype, shape: tuple[int, int], *,
                   kernel: str | None = None, small_rows: int = 1, large_rows: int = 64) -> KernelPlan:
    """Measure the candidate kernels once (per process, device, dtype, shape and thread count) and pick per batch size.

    ``kernel`` forces one kernel for every batch size (e.g. ``"dequant"`` for numbers that are the same
    on every CPU). Raises QuantizationError when no kernel runs here at all.
    """
    if method not in KERNELS:
        raise QuantizationError(f"unknown quantization method {method!r}; use one of {', '.join(METHODS)}")
    dev = torch.device(device)
    if kernel is not None:
        plan = KernelPlan(method, kernel, kernel, reasons=[f"{kernel} forced"])  # raises for an unknown kernel
        g = torch.Generator().manual_seed(0)
        w, w_scale = quantize_per_channel(torch.randn(96, 64, generator=g))
        try:
            _check(method, kernel, torch.randn(8, 64, generator=g).to(dev, dtype), w.to(dev), w_scale.to(dev))
        except Exception as e:  # noqa: BLE001 - cannot run here, or runs wrong: say so before any request
            raise QuantizationError(f"the forced {method} kernel {kernel!r} does not work on {dev} "
                                    f"({type(e).__name__}: {str(e).splitlines()[0][:120]}); leave kernel unset "
                                    "and the probe picks one that does") from e
        return plan
    n, k = shape
    probe = _probe(method, str(dev), dtype, n, k, (small_rows, large_rows), torch.get_num_threads())
    reasons, picks = [], []
    for m, best, results in probe:
        shown = ", ".join(f"{name} {v:.0f} µs" if isinstance(v, float) else f"{name} {v}" for name, v in results)
        reasons.append(f"M={m} [{n}x{k}]: {shown}")
        picks.append(best)
    if None in picks:
        raise QuantizationError(
            f"no {method} kernel runs on {dev} with {str(dtype).removeprefix('torch.')} activations "
            f"({'; '.join(reasons)}); load without quantization, or in another dtype / on another device")
    plan = KernelPlan(method, picks[0], picks[1], cutoff=max(small_rows, large_rows // 4), reasons=reasons)
    if method == "w8a8" and "dequant" in (plan.small, plan.large) and dev.type != "npu":
        log.warning("W8A8 on %s runs the dequantise-then-matmul fallback for some batch sizes (%s): same "
                    "numbers as int8, no int8 speed-up (%s)",
                    dev, plan.describe(),
                    "torch._int_mm on CUDA needs more than 16 rows" if dev.type == "cuda"
                    else "torch._int_mm is fast only with AVX512-VNNI on CPU")
    return plan
