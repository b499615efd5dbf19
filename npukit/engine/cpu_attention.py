"""Paged attention on CPU: C kernels (``csrc/paged_attention.c``) that read K/V in place, for decode and prefill.

The portable path gathers each decode sequence's blocks into a contiguous copy and runs SDPA on it. On a
2-core Xeon, SmolLM2 fp32, 64 sequences of 384 tokens, that gather + SDPA took ~60 % of the decode step: it
moves every K/V byte three times (read, write the copy, read it again) in many small calls. vLLM-CPU, like
vLLM on GPUs, runs a paged-attention kernel instead that walks the block table; this is npukit's, in ~80
lines of C that the compiler vectorises, parallel over sequences with OpenMP: 30 layers of that step in
88 ms where gather + SDPA took ~250 (``python benchmarks/bench_runner.py --context 384`` shows the step
time and attention's share).

Built at first use by ``npukit.engine.native`` (no compiler, a failed build or ``NPUKIT_CPU_ATTENTION=0``, to
compare: the runner stays on gather + SDPA). float32 and bfloat16 (a bf16 model's q and KV cache, computed in fp32,
each output rounded once: SmolLM2 bf16 decode steps over 384 tokens of context on a 2-core AMD EPYC took 12.9 ms
at one sequence and 115 at 64, against 16.4 and 172 with gather + SDPA); other dtypes take the portable path.
Where a bf16 model has many query heads per KV head, or 128-dim heads (``decode_takes_tiles``), the decode kernel
runs its rows on the prefill kernel's tiles instead, on CPUs with AVX512-BF16: qwen2-1024x8's 8 x 64 in 0.77-0.80x
the time at 16-64 sequences, 8 x 128 in 0.45x.

Prefill: all prefill chunks of a step in one call per layer (``paged_prefill_attention``), flash attention's tiled
loop with an online softmax over each sequence's blocks, so a first chunk and a later one over a cached prefix are
the same path, with no gather and no mask. With a bf16 cache on CPUs with AVX512-BF16 it multiplies bf16 pairs
(``vdpbf16ps``). SmolLM2 on a 2-core AMD EPYC, the layers' attention time in a prefill step against the runner's
SDPA path (``python benchmarks/bench_prefill_attention.py``, both in one run): bf16 0.38-0.62x for fresh prompts
of 23-2048 tokens a step, 0.81x for a 548-token chunk after 1500 cached tokens; fp32 0.39-0.75x and 0.97x (there
SDPA's flash attention runs at ~95 GFLOP/s, as the kernel does). Head dims 64 and 128 get unrolled loops, others
a generic one (the tiny test models' 16).
"""
from __future__ import annotations

import ctypes
import functools

import torch

from . import native

KERNELS = {"decode": {torch.float32: "npukit_paged_decode_f32", torch.bfloat16: "npukit_paged_decode_bf16"},
           "prefill": {torch.float32: "npukit_paged_prefill_f32", torch.bfloat16: "npukit_paged_prefill_bf16"}}
_P, _I64 = ctypes.c_void_p, ctypes.c_int64
ARGS = {"decode": [_P, _P, _P, _P, _P, _I64, _I64, _I64, _I64, _I64, _I64, _I64, ctypes.c_float, _P, ctypes.c_int],
        "prefill": [_P, _P, _P, _P, _P, _P, _P, _I64, _I64, _I64, _I64, _I64, _I64, _I64, _I64, ctypes.c_float, _P,
                    ctypes.c_int]}


@functools.cache
def load(dtype: torch.dtype = torch.float32, phase: str = "decode"):
    """The ``phase`` ("decode" or "prefill") kernel for ``dtype`` tensors as a ctypes function, or None when it
    cannot be built or is switched off (``NPUKIT_CPU_ATTENTION=0``), or for a dtype it does not take."""
    signatures = {name: (ARGS[ph], ctypes.c_int) for ph, names in KERNELS.items() for name in names.values()}
    signatures["npukit_paged_decode_tiled"] = ([_I64, _I64, _I64], ctypes.c_int)
    lib = native.load_functions("paged_attention", signatures, switch="NPUKIT_CPU_ATTENTION")
    return None if lib is None or dtype not in KERNELS[phase] else getattr(lib, KERNELS[phase][dtype])


def decode_takes_tiles(num_heads: int, num_kv_heads: int, head_dim: int) -> bool:
    """Whether the bf16 decode kernel runs this head layout on the prefill kernel's tiles (bf16 dot products, the
    softmax weights rounded to bf16 before they multiply V) rather than its fp32 loop: on CPUs with AVX512-BF16,
    where query heads per KV head x head_dim >= 448 (see the end of ``csrc/paged_attention.c``)."""
    if load(torch.bfloat16) is None:
        return False
    return bool(native.load_library("paged_attention").npukit_paged_decode_tiled(num_heads, num_kv_heads, head_dim))


def paged_decode_attention(kernel, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, ctx_lens: torch.Tensor, window: int | None, scale: float,
                           out: torch.Tensor) -> None:
    """``out[i] = softmax(q[i] K_i^T * scale) V_i`` over the first ``ctx_lens[i]`` positions of sequence i's
    blocks (the last ``window`` of them with a sliding window), written into ``out``.

    ``kernel``: ``load(dtype)`` of the tensors' dtype. ``q``, ``out``: ``[b, num_heads, head_dim]``; caches
    ``[num_blocks, block_size, num_kv_heads, head_dim]``, all of one dtype (float32 or bfloat16); ``block_tables``
    int64 ``[b, max_blocks]``, ``ctx_lens`` int64 ``[b]`` (each at least 1: the step's own token), all contiguous CPU
    tensors. The caller guarantees every block id the lengths reach is a valid block: the kernel does not check.
    """
    _check(kernel, q, k_cache, v_cache, out, block_tables, ctx_lens)
    if block_tables.shape[0] != q.shape[0] or ctx_lens.shape != q.shape[:1]:
        raise ValueError("block_tables [b, max_blocks] and ctx_lens [b] must be int64, one row per query")
    _bound(kernel, q, k_cache, v_cache, window, scale, out)(block_tables, ctx_lens, q.shape[0])


def bind(kernel, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, window: int | None, scale: float,
         out: torch.Tensor):
    """paged_decode_attention with the tensors that stay the same from step to step bound (graph mode's CPU replay,
    npukit.engine.cpu_graph): ``attend(block_tables, ctx_lens, b)`` computes the first ``b`` rows of ``q`` into
    ``out``. The caller passes block tables and lengths as paged_decode_attention takes them (the runner builds
    them so); they are not checked again."""
    _check(kernel, q, k_cache, v_cache, out)
    return _bound(kernel, q, k_cache, v_cache, window, scale, out)


def _bound(kernel, q, k_cache, v_cache, window, scale, out):
    """bind's ``attend``, for tensors already checked."""
    _, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    qp, kp, vp, op = q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), out.data_ptr()
    threads = torch.get_num_threads()

    def attend(block_tables: torch.Tensor, ctx_lens: torch.Tensor, b: int) -> None:
        if kernel(qp, kp, vp, block_tables.data_ptr(), ctx_lens.data_ptr(), b, num_heads, num_kv_heads, head_dim,
                  block_size, block_tables.shape[1], window or 0, scale, op, threads):
            raise MemoryError("the CPU paged-attention kernel could not allocate its score buffer")
    return attend


def paged_prefill_attention(kernel, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, starts: torch.Tensor, lens: torch.Tensor,
                            computed: torch.Tensor, window: int | None, scale: float, out: torch.Tensor) -> None:
    """Causal attention of every prefill chunk of a step over its sequence's blocks, into ``out``.

    Sequence i's chunk is rows ``starts[i] .. starts[i] + lens[i] - 1`` of ``q`` and ``out``, at positions
    ``computed[i] ..``; its K/V (the chunk's own included) are already in the cache. Query position p attends to
    positions ``<= p`` (and ``> p - window`` with a sliding window); other rows of ``out`` are left as they are.
    ``kernel``: ``load(dtype, "prefill")``. ``q`` ``[T, num_heads, head_dim]`` with contiguous heads (any row
    stride: a q/k/v projection's column view), ``out`` contiguous of that shape, caches ``[num_blocks, block_size,
    num_kv_heads, head_dim]``, all of one dtype; ``block_tables`` int64 ``[n, max_blocks]``, the rest int64 ``[n]``,
    contiguous CPU tensors. The caller guarantees that the rows and block ids they reach exist: unchecked here.
    """
    num_tokens, num_heads, head_dim = q.shape
    if q.stride(2) != 1 or q.stride(1) != head_dim or out.shape != q.shape:
        raise ValueError("paged_prefill_attention takes q [T, heads, head_dim] with contiguous heads, out its shape")
    _check(kernel, q[:0], k_cache, v_cache, out, block_tables, starts, lens, computed, phase="prefill")  # q[:0]:
    # its device and dtype (its strides were checked above)
    if len({starts.shape, lens.shape, computed.shape, block_tables.shape[:1]}) > 1:
        raise ValueError("block_tables [n, max_blocks], starts, lens and computed [n] must be of one sequence count")
    _, block_size, num_kv_heads, _ = k_cache.shape
    if kernel(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), block_tables.data_ptr(), starts.data_ptr(),
              lens.data_ptr(), computed.data_ptr(), starts.shape[0], num_heads, num_kv_heads, head_dim, block_size,
              block_tables.shape[1], q.stride(0), window or 0, scale, out.data_ptr(), torch.get_num_threads()):
        raise MemoryError("the CPU prefill attention kernel could not allocate its buffers")


def _check(kernel, q, k_cache, v_cache, out, *index, phase: str = "decode") -> None:
    for t in (q, k_cache, v_cache, out, *index):
        if not t.is_contiguous() or not t.is_cpu:
            raise ValueError(f"paged_{phase}_attention takes contiguous CPU tensors")
    if any(t.dtype != torch.int64 for t in index):
        raise ValueError(f"paged_{phase}_attention's block tables and lengths must be int64")
    if len({q.dtype, k_cache.dtype, v_cache.dtype, out.dtype}) > 1 or q.dtype not in KERNELS[phase]:
        raise ValueError(f"the CPU paged-attention kernel takes float32 or bfloat16 tensors of one dtype, got q "
                         f"{q.dtype}, caches {k_cache.dtype} / {v_cache.dtype}, out {out.dtype}")
    if kernel is not load(q.dtype, phase):
        raise ValueError(f"pass the kernel for {q.dtype} tensors: cpu_attention.load({q.dtype}, {phase!r})")
