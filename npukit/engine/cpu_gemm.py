"""fp32 and bf16 linears on the CPU: four ways to compute ``x @ W.T``, and a probe that picks one per row count.

- ``linear``: ``F.linear(x, W)`` (torch's BLAS, MKL on x86).
- ``swapped``: the same product in the other operand order, ``(W @ x.T).T``. The result is a transposed view,
  so only callers that read it in place may take it (o_proj, the MLP, lm_head; q/k/v feed attention in rows).
- ``packed``: oneDNN's matmul on a copy of W reordered once into oneDNN's blocked layout
  (``torch.ops.mkldnn._reorder_linear_weight`` / ``_linear_pointwise``, the ops inductor's freezing pass
  uses). vLLM-CPU does the same with its own oneDNN handle (``dispatch_cpu_unquantized_gemm``). It costs a
  second copy of the weights it packs.
- ``panel``: npukit's own C kernel (``csrc/panel_gemm.c``, built at first use by ``npukit.engine.native``) on a
  copy of W packed in panels of 32 columns: each panel read once, sequentially, for blocks of rows of x (12
  on AVX512, 6 on AVX2) whose sums stay in registers. At 4-64 rows BLAS either reads W at a fraction of the
  memory bandwidth or computes at a fraction of the peak; SmolLM2's 210 layer linears on a 2-core Xeon took,
  at 16 rows, 32 ms with it against 44 swapped, 46 packed and 110 with F.linear (at 1 row MKL's F.linear read
  fastest). The same kernel reads int8 panels (with a scale per output) for npukit.quant's W8A16, and runs
  q/k/v (gate/up) in one call where each of them runs it (``FusedLinear``, vLLM's merged projections).

Which is fastest depends on the CPU, its BLAS, the thread count and the number of rows. What we measured with
SmolLM2 fp32, all 211 linears of a step streamed from memory:

- a 2-core AMD EPYC (AVX2), 2 threads: at 1 row F.linear 30 ms, packed 21.5 ms (memory reads at ~19 instead of
  ~13 GB/s; a plain sum reads at 35); at 2-4 rows swapped 20-22 ms against F.linear's 46-50; lm_head packed at
  every count (1 row 9.7 -> 3.7 ms, 64 rows 54 -> 32 ms); from 128 rows F.linear or swapped, packed slower.
  With 1 thread all three were even at 1 row (33 ms).
- a 2-core Xeon (AVX512, VNNI), 2 threads, before ``panel`` existed: the probe chose packed for q/k/v and
  lm_head from 4 rows on, and for o/mlp at 4-15 rows and the counts from 17 on that are not multiples of 8
  (swapped at 16, 24, .. 56); at 1-2 rows nothing beat F.linear by MARGIN. Decode steps against F.linear only:
  4 rows 0.73x, 8 0.70x, 16 0.56x, 32 0.65x, 48 0.66x, 64 0.95x (``python benchmarks/bench_runner.py --dtype
  float32 --threads 2 --batches 1 2 4 8 16 32 48 64 --context 64 --cpu-kernels``). With ``panel``: it took
  every layer linear at 4-48 rows (F.linear kept 1-3 and 64) and lm_head at 8-32 (packed at 4 and 64); decode
  steps against the table the probe makes without ``panel``, interleaved in one process: 4 sequences 0.79x,
  8 0.59x, 16 0.83x, 24 0.86x, 32 0.91x, 48 0.85x. Packed copies: 621 MiB for SmolLM2.

bf16 weights (a bf16 model, e.g. ``dtype="auto"`` on an AVX512-BF16 CPU) take the same kernels on bf16 rows: the
panel kernel reads bf16 panels and widens the rows to fp32 (one rounding per output, as a bf16 F.linear), oneDNN
packs bf16 weights on AVX512 CPUs only. SmolLM2 bf16 on a 2-core AMD EPYC (AVX512-BF16), decode steps of 384
tokens of context against F.linear's, interleaved in one process: 1 sequence 0.48-0.55x (the panel kernel and
fused q/k/v, gate/up), 8 0.72-0.82x, 32 0.87-0.90x, 64 0.91-0.92x (oneDNN's packed bf16 weights from 8 rows on).

A table from one CPU is wrong on the next (and nobody measured ARM hosts'), so the runner asks this module once
per process, weight shapes and thread count: ``probe`` times each kernel on the model's own weights (a slice
big enough to stream from memory as a step does) at a few row counts of each bucket, and ``choose`` keeps,
per bucket, the fastest kernel that beat F.linear by MARGIN; steps of more rows than the decode buckets (prefill
chunks) take one kernel, timed at 256 rows. About five seconds for SmolLM2, milliseconds for a tiny test model.
"""
from __future__ import annotations

import ctypes
import functools
import statistics
import time
import weakref

import torch
import torch.nn.functional as F

from . import native
from .cpu_ops import DTYPES

KERNELS = ("linear", "swapped", "packed", "panel")
ROW_KERNELS = ("linear", "packed", "panel")  # for callers that need the result in rows
# (the row counts a bucket decides, the ones timed for it). One row count's timing swings from run to run, a
# bucket's sum does not. From 16 rows on, multiples of 8 get their own bucket: there MKL's swapped order won
# clearly and was even or lost at most other counts. 64 rows (a common max_num_seqs) is timed alone: on a Xeon
# (AVX512) F.linear took 77 ms there for the o/mlp projections and 119 ms at 48 rows, swapped 86 and 61.
# Steps of more rows than that (prefill chunks) take one kernel, timed at 256 rows and looked up under PREFILL_ROWS
# (``bucket_rows``). SmolLM2 fp32 on a 2-core AMD EPYC (AVX512): oneDNN's packed weights 0.69x F.linear's time at
# 256 rows, 0.85x at 2048, a prefill-only workload 0.91x; in bf16 even (0.93-1.0x). An AVX2 EPYC measured
# F.linear or swapped faster from 128 rows on: the probe decides.
PREFILL_ROWS = 65
BUCKETS = (
    (range(1, 2), (1,)),
    (range(2, 4), (2, 3)),
    (range(4, 8), (4, 6)),
    (range(8, 16), (8, 12)),
    (range(16, 64, 8), (16, 32, 48)),
    (range(64, 65), (64,)),
    (tuple(m for m in range(17, 65) if m % 8), (20, 33, 50)),
    ((PREFILL_ROWS,), (256,)),
)


def bucket_rows(rows: int) -> int:
    """The key of a row count in a kernel table: itself, or PREFILL_ROWS for any count above the decode buckets."""
    return min(rows, PREFILL_ROWS)


MARGIN = 0.92     # a kernel replaces F.linear in a bucket only where it took at most this fraction of its time
PROBE_BYTES = 48 << 20  # about this many bytes of weights per timing: more than a CPU's caches hold
REPEAT = 3
_cache: dict[tuple, dict] = {}


def pack(weight: torch.Tensor) -> torch.Tensor:
    """An fp32 ``[out, in]`` weight reordered for oneDNN's matmul (a copy, in torch's opaque mkldnn layout)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight, None)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


PANEL = 32  # output columns per panel (csrc/panel_gemm.c's PW)
HALF_ROWS = (torch.bfloat16, torch.float16)  # 16-bit rows the panel kernels take (fp16 widened to fp32 by torch first)


def pack_panels(weight: torch.Tensor) -> torch.Tensor:
    """An ``[N, K]`` weight (fp32, bf16, or int8 for W8A16) as ``[ceil(N / 32), K, 32]`` panels (a copy; the last panel
    zero-padded)."""
    n, k = weight.shape
    padded = torch.zeros(-(-n // PANEL) * PANEL, k, dtype=weight.dtype)
    padded[:n] = weight
    return padded.view(-1, PANEL, k).transpose(1, 2).contiguous()


@functools.cache
def _panel_gemm():
    """The C kernels as ctypes functions by weight dtype, or None (logged) where they cannot be built."""
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    # x, ldx, panels, bias, y, M, N, K, rows16 (bf16 x and y), threads -> status
    float_weights = ([p, i64, p, p, p, i64, i64, i64, i32, i32], i32)
    lib = native.load_functions("panel_gemm", {
        "npukit_panel_gemm_f32": float_weights, "npukit_panel_gemm_bf16": float_weights,
        "npukit_panel_gemm_i8": ([p, i64, p, p, p, p, i64, i64, i64, i32, i32], i32)})  # + scale after panels
    if lib is None:
        return None
    return {torch.float32: lib.npukit_panel_gemm_f32, torch.bfloat16: lib.npukit_panel_gemm_bf16,
            torch.int8: lib.npukit_panel_gemm_i8}  # NOTE: another dtype raises KeyError


@functools.cache
def _panel_gemm_parts():
    """The C kernels that compute several weights' columns side by side (FusedLinear), by weight dtype, or None."""
    if _panel_gemm() is None:
        return None
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    # x, ldx, parts, panels[parts], scales[parts] or NULL, biases[parts] or NULL, N[parts], y, M, K, rows16, threads
    parts = ([p, i64, i64, p, p, p, p, p, i64, i64, i32, i32], i32)
    names = {torch.float32: "f32", torch.bfloat16: "bf16", torch.int8: "i8"}
    lib = native.load_functions("panel_gemm", {f"npukit_panel_gemm_parts_{n}": parts for n in names.values()})
    return {dtype: getattr(lib, f"npukit_panel_gemm_parts_{n}") for dtype, n in names.items()}


def panel_linear(x: torch.Tensor, panels: torch.Tensor, out_features: int, bias: torch.Tensor | None = None,
                 scale: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, W, bias)`` by the C kernel: x ``[M, K]``, ``panels = pack_panels(W)``, W ``[out_features, K]``,
    bias ``[out_features]`` or None. An int8 W (W8A16) needs its fp32 ``scale`` per output (``[out_features]``):
    then the result is ``x @ (W * scale[:, None]).T + bias``. bf16 / fp16 rows are widened to fp32 for the kernel
    (its sums are fp32 anyway: like a 16-bit F.linear, one rounding per output) and the result rounded back; bf16 rows
    in the kernel itself (two torch ops fewer a call: ~4 us, some 200 times a decode step), fp16 ones by torch.

    NOTE: called ~200 times a decode step, so the checks are the few that keep the C code inside its tensors."""
    if x.dtype is torch.float16:
        return panel_linear(x.float(), panels, out_features, bias, scale).to(x.dtype)
    if x.stride(-1) != 1:
        x = x.contiguous()
    m, k = x.shape
    if scale is not None and (scale.dtype is not torch.float32 or not scale.is_contiguous()):
        scale = scale.contiguous().float()
    if bias is not None and (bias.dtype is not torch.float32 or not bias.is_contiguous()):
        bias = bias.contiguous().float()
    if (panels.shape[1] != k or x.dtype not in DTYPES or (panels.dtype is torch.int8) != (scale is not None)
            or (scale is not None and scale.numel() != out_features)
            or (bias is not None and bias.numel() != out_features) or panels.shape[0] * PANEL < out_features):
        raise ValueError(f"panel_linear: x {tuple(x.shape)} {x.dtype}, scale "
                         f"{None if scale is None else (tuple(scale.shape), scale.dtype)} do not fit "
                         f"{panels.dtype} panels {tuple(panels.shape)} of {out_features} outputs")
    y = torch.empty(m, out_features, dtype=x.dtype)
    w = (panels.data_ptr(),) if scale is None else (panels.data_ptr(), scale.data_ptr())
    _checked(_panel_gemm()[panels.dtype](x.data_ptr(), x.stride(0), *w, None if bias is None else bias.data_ptr(),
                                         y.data_ptr(), m, out_features, k, x.dtype is torch.bfloat16,
                                         torch.get_num_threads()))
    return y


def _checked(status: int) -> None:
    """Raise for a panel-kernel call's status other than 0."""
    if status == -1:
        raise MemoryError("npukit's panel kernel: out of memory for the fp32 copy of its bf16 rows")
    if status:
        raise RuntimeError(f"npukit's panel kernel did not run (status {status}: parts outside 1..{MAX_PARTS})")


# the kernels that run on a copy of the weight, and how to make it
COPIES = {"packed": pack, "panel": pack_panels}


def probe(weights: list[torch.Tensor], threads: int) -> dict[tuple, dict[str, float]]:
    """Summed median seconds of each kernel per bucket (``BUCKETS``' first element -> kernel -> seconds) over
    these CPU weights (fp32 or bf16, [out, in] each; the first ones that make up PROBE_BYTES, a weight bigger than
    that on its first rows) on rows of their dtype, with ``threads`` torch threads. A kernel this torch build
    cannot run is left out. Remembered per process, weight shapes, dtype and thread count."""
    timed, size = [], 0
    for w in weights:
        rows = max(1, min(w.shape[0], (PROBE_BYTES - size) // (w.shape[1] * w.element_size())))
        timed.append(w[:rows])
        size += timed[-1].nbytes
        if size >= PROBE_BYTES:
            break
    key = (tuple(tuple(w.shape) for w in timed), timed[0].dtype, threads)
    if key not in _cache:
        _cache[key] = _measure(timed, threads)
    return _cache[key]


def choose(times: dict[tuple, dict[str, float]], kernels=KERNELS) -> dict[int, str]:
    """Row count -> the fastest of ``kernels`` in its bucket, where that beat F.linear by MARGIN (the row
    counts left out run F.linear)."""
    chosen = {}
    for bucket, t in times.items():
        best = min((k for k in kernels if k in t), key=t.get, default="linear")
        if best != "linear" and t[best] <= MARGIN * t["linear"]:
            chosen.update(dict.fromkeys(bucket, best))
    return chosen


class CpuLinear:
    """An fp32 or bf16 weight on the CPU with the kernel ``choose`` picked for each row count (F.linear for the
    rest).

    ``weight`` is the model's own tensor; ``copies`` holds the packed copies its kernels run on (``COPIES``),
    made here, once: change ``weight`` in place afterwards and they go stale.

    Inside ``torch.compile`` (graph mode) the call is one opaque op, ``npukit::cpu_linear``, that finds this
    object again by its weight: dynamo cannot trace a oneDNN packed tensor, and the compiled pieces still fuse
    the element-wise work around the matmuls while these run the kernels measured here.
    """

    def __init__(self, weight: torch.Tensor, kernels: dict[int, str]):
        if "panel" in kernels.values() and _panel_gemm() is None:
            raise ValueError("the panel kernel needs a C compiler (see npukit.engine.native)")
        self.weight, self.kernels = weight, kernels
        self.copies = {k: COPIES[k](weight.contiguous()) for k in sorted(set(kernels.values())) if k in COPIES}
        _BY_WEIGHT[weight.data_ptr()] = self

    @property
    def copy_bytes(self) -> int:
        return sum(c.nbytes for c in self.copies.values())

    def kernel_for(self, rows: int) -> str:
        return self.kernels.get(bucket_rows(rows), "linear")

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return cpu_linear(x, self.weight, bias)
        kernel = self.kernels.get(bucket_rows(x.shape[0])) if x.dim() == 2 else None
        if kernel == "panel":
            return panel_linear(x, self.copies["panel"], self.weight.shape[0], bias)
        if kernel == "packed":
            return packed_linear(x, self.copies["packed"], bias)
        if kernel == "swapped":
            w = self.weight
            return (torch.mm(w, x.t()) if bias is None else torch.addmm(bias.unsqueeze(1), w, x.t())).t()
        return F.linear(x, self.weight, bias)


class FusedLinear:
    """Linears that read the same rows (q, k, v; gate, up), computed by ONE panel-kernel call at the row counts
    where each of them runs the panel kernel: vLLM's QKVParallelLinear / MergedColumnParallelLinear, on the
    members' own panel copies (nothing concatenated: the kernel takes a list of them). ``fused(x)`` returns each
    member's ``x @ W.T (* scale) + bias`` as views of one ``[M, sum of N]`` result, with the bits of separate
    calls. Saves a kernel call's fixed cost per member: SmolLM2's 30 layers, W8A16, one row, 2 threads: 120
    calls 7.8 ms where the 210 unfused ones took 8.7 (the calls alone), a whole decode step 0.85-0.89x as long.

    Members: CpuLinears or W8A16 QuantLinears (npukit.quant) with a ``panel`` copy, of one weight dtype and input
    width (W8A8's panel kernel quantises its rows first); ``FusedLinear.of`` returns None for anything else (then
    the runner calls them one by one). One member is fine too: the runner binds o_proj and down_proj so, its
    pointers and checks settled once.
    """

    def __init__(self, members: list, biases: list):
        self.members, self.sizes = members, [m.weight.shape[0] for m in members]
        panels = [m.copies["panel"] for m in members]
        scales = [None if s is None else s.float().contiguous() for s in (getattr(m, "weight_scale", None)
                                                                          for m in members)]
        biases = [None if b is None else b.detach().float().contiguous() for b in biases]
        self._keep = scales + biases  # NOTE: the C call reads them (and the arrays below) by address
        self.dtype, self.in_features, self.out_features = panels[0].dtype, panels[0].shape[1], sum(self.sizes)
        arrays = [(ctypes.c_void_p * len(members))(*(t.data_ptr() for t in panels)),
                  None if scales[0] is None else (ctypes.c_void_p * len(members))(*(t.data_ptr() for t in scales)),
                  (ctypes.c_void_p * len(members))(*(None if b is None else b.data_ptr() for b in biases)),
                  (ctypes.c_int64 * len(members))(*self.sizes)]
        self._arrays = arrays
        self._args = [None if a is None else ctypes.addressof(a) for a in arrays]
        self._fn = _panel_gemm_parts()[self.dtype]
        self._panel_at: dict[int, bool] = {}  # row count -> every member runs the panel kernel at it

    @classmethod
    def of(cls, members: list, biases: list) -> FusedLinear | None:
        panels = [getattr(m, "copies", {}).get("panel") for m in members]
        if (any(p is None for p in panels) or any(getattr(m, "method", None) == "w8a8" for m in members)
                or len({p.dtype for p in panels}) > 1 or len({p.shape[1] for p in panels}) > 1
                or len(members) > MAX_PARTS or _panel_gemm_parts() is None):
            return None
        return cls(members, biases)

    def takes(self, x: torch.Tensor) -> bool:
        """Whether ``x``'s rows go through the fused call (float rows, every member on the panel kernel there)."""
        if x.dim() != 2 or (x.dtype is not torch.float32 and x.dtype not in HALF_ROWS):
            return False
        rows = x.shape[0]
        at = self._panel_at.get(rows)
        if at is None:
            at = self._panel_at[rows] = all(m.kernel_for(rows) == "panel" for m in self.members)
        return at

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Each member's result; bf16 rows in the kernel, fp16 rows widened to fp32 for the call and the results cast
        back, as in panel_linear."""
        rows = x.float() if x.dtype is torch.float16 else x
        if rows.stride(-1) != 1:
            rows = rows.contiguous()
        y = torch.empty(x.shape[0], self.out_features, dtype=rows.dtype)
        _checked(self._fn(*self._call_args(rows, y)))
        y = y.to(x.dtype)
        if len(self.sizes) == 1:
            return (y,)
        return y.split_with_sizes(self.sizes, 1)  # NOTE: half the time of Tensor.split (3 vs 6 us for three)

    def bind(self, x: torch.Tensor, y: torch.Tensor):
        """The call on rows ``x`` into ``y`` (``[rows, out_features]``, contiguous, x's dtype: fp32 or bf16) with its
        arguments bound: graph mode's CPU replay (npukit.engine.cpu_graph) makes it once per batch size."""
        if x.stride(-1) != 1 or not y.is_contiguous() or y.dtype is not x.dtype or y.shape != (
                x.shape[0], self.out_features):
            raise ValueError(f"FusedLinear.bind: x {tuple(x.shape)} {x.dtype} (contiguous rows) into y "
                             f"[{x.shape[0]}, {self.out_features}] of its dtype, got y {tuple(y.shape)} {y.dtype}")
        return functools.partial(_call_checked, self._fn, self._call_args(x, y))

    def _call_args(self, x: torch.Tensor, y: torch.Tensor) -> tuple:
        if x.dim() != 2 or x.shape[1] != self.in_features or x.dtype not in DTYPES or y.dtype is not x.dtype:
            raise ValueError(f"FusedLinear: x {tuple(x.shape)} {x.dtype} does not fit float32 or bfloat16 rows of "
                             f"{self.in_features} inputs (into y of their dtype)")
        return (x.data_ptr(), x.stride(0), len(self.sizes), *self._args, y.data_ptr(), x.shape[0], self.in_features,
                x.dtype is torch.bfloat16, torch.get_num_threads())


def _call_checked(fn, args: tuple) -> None:
    _checked(fn(*args))


MAX_PARTS = 8  # csrc/panel_gemm.c's MAX_PARTS


# weight.data_ptr() -> its CpuLinear, while that lives (the runner holds it)
_BY_WEIGHT: weakref.WeakValueDictionary[int, CpuLinear] = weakref.WeakValueDictionary()


_OPS = torch.library.Library("npukit", "FRAGMENT")


def opaque_op(schema: str, impl, fake):
    """``torch.ops.npukit.<name>``: an op that torch.compile calls as it is, without tracing into ``impl``
    (``fake`` gives the result's shape and dtype to the compiler), on every device.

    NOTE: defined with torch.library.Library, not torch.library.custom_op, whose Python wrapper (aliasing checks,
    dynamo switched off and on) cost ~30 us a call inside a compiled graph on a 2-core Xeon; with ~210 matmul
    calls a SmolLM2 decode step, graph/eager went from 1.48x to 1.34x at batch 1."""
    name = schema.split("(")[0]
    _OPS.define(schema)
    _OPS.impl(name, impl, "CompositeExplicitAutograd")
    torch.library.register_fake(f"npukit::{name}", fake, lib=_OPS)
    return getattr(torch.ops.npukit, name)


def _cpu_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` with the kernels of ``weight``'s CpuLinear (F.linear when it has none).
    The result comes back in rows (contiguous), as the compiled graph expects."""
    linear = _BY_WEIGHT.get(weight.data_ptr())
    if linear is None or linear.weight.shape != weight.shape:
        return F.linear(x, weight, bias)
    return linear(x, bias).contiguous()


cpu_linear = opaque_op("cpu_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor", _cpu_linear,
                       lambda x, weight, bias: x.new_empty(*x.shape[:-1], weight.shape[0]))


def _measure(weights: list[torch.Tensor], threads: int) -> dict[tuple, dict[str, float]]:
    g = torch.Generator().manual_seed(0)
    most = max(max(rows) for _, rows in BUCKETS)
    inputs = {k: torch.randn(most, k, generator=g).to(weights[0].dtype) for k in {w.shape[1] for w in weights}}
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            runs = {"linear": _linear_run(weights), "swapped": _swapped_run(weights)}
            try:
                runs["packed"] = _packed_run(weights, inputs)
            except (RuntimeError, AttributeError):  # NOTE: a torch built without oneDNN (mkldnn)
                pass
            if _panel_gemm() is not None:
                runs["panel"] = _panel_run(weights)
            times = {}
            for bucket, probe_rows in BUCKETS:
                # NOTE: the panel kernel is for decode rows: not timed in the prefill bucket
                timed = {k: run for k, run in runs.items() if k != "panel" or max(probe_rows) < PREFILL_ROWS}
                total = dict.fromkeys(timed, 0.0)
                for m in probe_rows:
                    xs = [inputs[w.shape[1]][:m] for w in weights]
                    samples = {k: [] for k in timed}
                    for i in range(REPEAT + 1):  # the first round warms up
                        for k, run in timed.items():
                            t = _timed(k, run, xs)
                            if i:
                                samples[k].append(t)
                    for k in timed:
                        total[k] += statistics.median(samples[k])
                times[tuple(bucket)] = total
            return times
    finally:
        torch.set_num_threads(before)


def _linear_run(weights):
    return lambda xs: [F.linear(x, w) for w, x in zip(weights, xs)]


def _swapped_run(weights):
    return lambda xs: [torch.mm(w, x.t()) for w, x in zip(weights, xs)]


def _packed_run(weights, inputs):
    packed = [pack(w.contiguous()) for w in weights]
    packed_linear(inputs[weights[0].shape[1]][:1], packed[0])  # raises here when oneDNN cannot run it
    return lambda xs: [packed_linear(x, p) for p, x in zip(packed, xs)]


def _panel_run(weights):
    panels = [pack_panels(w) for w in weights]
    return lambda xs: [panel_linear(x, p, w.shape[0]) for p, w, x in zip(panels, weights, xs)]


def _timed(kernel: str, run, xs) -> float:
    """Seconds ``run`` (the ``kernel``'s) took over these inputs."""
    t = time.perf_counter()
    run(xs)
    return time.perf_counter() - t
