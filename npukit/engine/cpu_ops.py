"""The element-wise work of a decoder layer: RMSNorm (with the residual add before it) and RoPE.

Each function computes what HF's Llama modules compute, in torch, on any device and dtype. On the CPU in fp32 or
bf16 (eager, not inside ``torch.compile``) it runs one C pass instead (``csrc/layer_ops.c``, built at first use by
``npukit.engine.native``): torch spends 8 ops on an RMSNorm and 12 on RoPE for q and k, each a dispatch and a
temporary tensor, and at one decode row that overhead is all the cost. Measured at one row, one thread (SmolLM2
shapes): residual add + norm 12 us against torch's 30, norm 7 against 25, RoPE 12 against 32; about 1.7 ms of a
batch-1 step. (SiLU-and-mul stays two in-place torch ops: a C pass behind ctypes took longer at one row.) vLLM
has the same fused ops (``fused_add_rms_norm``, ``rotary_embedding``) in its CPU and GPU kernels. Results: RoPE
has torch's bits; the norm differs from torch's in the last bit now and then (its sum is computed in another
order), as torch's own AVX2 and AVX512 builds differ. In bf16 the C passes round each result to bf16 where torch's
bf16 ops round theirs: RoPE and the residual add have torch's bits, the norm the same last-bit caveat.
``NPUKIT_CPU_OPS=0`` keeps torch's ops, to compare.
"""
from __future__ import annotations

import ctypes
import functools

import torch

from . import native


@functools.cache
def _ops():
    """csrc/layer_ops.c through ctypes, or None where it cannot be built or is switched off."""
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    norm = [p, i64, p, i64, p, p, ctypes.c_float, p, i64, i64, i32]
    rope_ = [p, i64, i64, p, i64, i64, p, p, i64, i64, i32]
    lib = native.load_functions("layer_ops", {
        "npukit_add_rms_norm": (norm, None), "npukit_rope": (rope_, None),
        "npukit_add_rms_norm_bf16": (norm, None), "npukit_rope_bf16": (rope_, None)}, switch="NPUKIT_CPU_OPS")
    if lib is None:
        return None
    return {torch.float32: (lib.npukit_add_rms_norm, lib.npukit_rope),
            torch.bfloat16: (lib.npukit_add_rms_norm_bf16, lib.npukit_rope_bf16)}  # dtype -> (norm, rope)


def _lib():
    """The C library, or None inside torch.compile (whose inductor fuses these ops itself) or where it cannot be
    built."""
    return None if torch.compiler.is_compiling() else _ops()


DTYPES = (torch.float32, torch.bfloat16)  # the element types npukit's C kernels read and write (csrc/bf16.h)


def _on_cpu(t: torch.Tensor, dtype: torch.dtype) -> bool:
    return t.dtype is dtype and t.is_cpu


def _torch_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # NOTE: the same op order as HF's LlamaRMSNorm (float32 math, cast back, then scale) so fp32 logits match HF
    # bit for bit in the norm and bf16 rounds the same way.
    dtype = x.dtype
    x32 = x.to(torch.float32)
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension (HF's LlamaRMSNorm); ``[T, heads, head_dim]`` too (Qwen3's q/k norms)."""
    if x.dim() != 2 and x.is_contiguous() and x.numel():
        return add_rms_norm(x.view(-1, x.shape[-1]), None, weight, eps)[0].view(x.shape)
    return add_rms_norm(x, None, weight, eps)[0]


# NOTE: the checks below are attribute reads on purpose: at one decode row these functions run 90 times a step,
# and a reshape or a Size comparison costs as much as the C pass itself.
def _norm_fits(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor) -> bool:
    """Whether the C norm takes these tensors (fp32 or bf16 CPU rows, all of one dtype, each row contiguous)."""
    dtype = x.dtype
    if not (x.dim() == 2 and dtype in DTYPES and _on_cpu(x, dtype) and _on_cpu(weight, dtype) and weight.dim() == 1
            and weight.is_contiguous()):
        return False
    return x.stride(1) == 1 and weight.shape[0] == x.shape[1] and (
        delta is None or (_on_cpu(delta, dtype) and delta.shape == x.shape and delta.stride(1) == 1))


def _norm_args(x, delta, weight, eps, out, s) -> tuple:
    """The C norm's arguments: ``out = rms_norm(s)``, ``s = x + delta`` (``s=None``: no add, ``out = rms_norm(x)``)."""
    m, n = x.shape
    return (x.data_ptr(), x.stride(0), None if s is None else delta.data_ptr(), 0 if s is None else delta.stride(0),
            None if s is None else s.data_ptr(), weight.data_ptr(), eps, out.data_ptr(), m, n, torch.get_num_threads())


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual add and the norm after it: ``(rms_norm(x + delta), x + delta)`` (``delta=None``: no add, and
    the second tensor is ``x``). ``x`` and ``delta`` are left alone."""
    lib = _lib()
    if lib is not None and _norm_fits(x, delta, weight):
        out = torch.empty(x.shape, dtype=x.dtype)
        s = None if delta is None else torch.empty(x.shape, dtype=x.dtype)
        lib[x.dtype][0](*_norm_args(x, delta, weight, eps, out, s))
        return out, (x if s is None else s)
    s = x if delta is None else x + delta
    return _torch_rms_norm(s, weight, eps), s


def bind_add_rms_norm(x, delta, weight, eps, out, s):
    """add_rms_norm's C call with its arguments bound, writing into ``out`` (and ``s``, the sum; None without
    ``delta``), or None where add_rms_norm would not take the C path (graph mode on CPU: npukit.engine.cpu_graph)."""
    lib = _ops()
    if lib is None or not _norm_fits(x, delta, weight):
        return None
    return functools.partial(lib[x.dtype][0], *_norm_args(x, delta, weight, eps, out, s))


def _rope_fits(q, k, cos, sin) -> bool:
    """Whether the C RoPE takes these tensors (fp32 or bf16 CPU, all of one dtype, each head's row contiguous, one
    cos/sin row per token)."""
    dtype = q.dtype
    if not (q.dim() == 3 and k.dim() == 3 and dtype in DTYPES and _on_cpu(q, dtype) and _on_cpu(k, dtype)
            and _on_cpu(cos, dtype) and _on_cpu(sin, dtype) and cos.is_contiguous() and sin.is_contiguous()):
        return False
    (m, _, d), (mk, _, dk), qs, ks = q.shape, k.shape, q.stride(), k.stride()  # NOTE: each read once
    return (d % 2 == 0 and qs[2] == 1 and qs[1] == d and ks[2] == 1 and ks[1] == d and mk == m and dk == d
            and cos.numel() == m * d and sin.numel() == m * d)


def _rope_args(q, k, cos, sin) -> tuple:
    (m, hq, d), qs = q.shape, q.stride()
    return (q.data_ptr(), qs[0], hq, k.data_ptr(), k.stride(0), k.shape[1], cos.data_ptr(), sin.data_ptr(), m, d,
            torch.get_num_threads())


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of q ``[T, Hq, D]`` and k ``[T, Hk, D]`` by cos, sin ``[T, 1, D]`` (HF's
    ``apply_rotary_pos_emb``: ``x * cos + rotate_half(x) * sin``). In C, q and k are rotated in place."""
    lib = _lib()
    if lib is not None and _rope_fits(q, k, cos, sin):
        lib[q.dtype][1](*_rope_args(q, k, cos, sin))
        return q, k
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def bind_rope(q, k, cos, sin):
    """rope's C call (in place on q and k) with its arguments bound, or None where rope would not take it."""
    lib = _ops()
    if lib is None or not _rope_fits(q, k, cos, sin):
        return None
    return functools.partial(lib[q.dtype][1], *_rope_args(q, k, cos, sin))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
