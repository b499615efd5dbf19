"""The element-wise work of a decoder layer: RMSNorm (with the residual add before it), RoPE, SiLU-and-mul.

Each function computes what HF's Llama modules compute, in torch, on any device and dtype. On the CPU in fp32
(eager, not inside ``torch.compile``) it runs one C pass instead (``csrc/layer_ops.c``, built at first use by
``npukit.engine.native``): torch spends 8 ops on an RMSNorm, 12 on RoPE for q and k, each a dispatch and a
temporary tensor, and at one decode row that overhead, ~5 ms of a 55 ms SmolLM2 step on one thread, was all
the cost. vLLM has the same fused ops (``fused_add_rms_norm``, ``rotary_embedding``, ``silu_and_mul``) in its
CPU and GPU kernels. Results: RoPE has torch's bits; RMSNorm and SiLU differ from torch's in the last bit now
and then (a sum and an exp computed in another order), as torch's own AVX2 and AVX512 builds differ.
``NPUKIT_CPU_OPS=0`` keeps torch's ops, to compare.
"""
from __future__ import annotations

import ctypes
import functools
import logging
import os

import torch
import torch.nn.functional as F

from . import native

_log = logging.getLogger(__name__)


@functools.cache
def _ops():
    """csrc/layer_ops.c through ctypes, or None where it cannot be built or is switched off."""
    if os.environ.get("NPUKIT_CPU_OPS", "1") == "0":
        _log.info("NPUKIT_CPU_OPS=0: norms, RoPE and SiLU run as torch ops")
        return None
    lib = native.load_library("layer_ops")
    if lib is not None:
        p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        lib.npukit_add_rms_norm.argtypes = [p, i64, p, i64, p, p, ctypes.c_float, p, i64, i64, i32]
        lib.npukit_rope.argtypes = [p, i64, i64, p, i64, i64, p, p, i64, i64, i32]
        lib.npukit_silu_mul.argtypes = [p, i64, p, i64, i64, i64, i32]
        lib.npukit_add_rms_norm.restype = lib.npukit_rope.restype = lib.npukit_silu_mul.restype = None
    return lib


def _in_c(*tensors: torch.Tensor):
    """The C library when every tensor is an fp32 CPU tensor with unit stride in its last dim (and we are not
    being traced by torch.compile, whose inductor fuses these ops itself), else None."""
    if torch.compiler.is_compiling():
        return None
    for t in tensors:
        if t.dtype is not torch.float32 or t.device.type != "cpu" or t.stride(-1) != 1:
            return None
    return _ops()


def _torch_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # NOTE: the same op order as HF's LlamaRMSNorm (float32 math, cast back, then scale) so fp32 logits match HF
    # bit for bit in the norm and bf16 rounds the same way.
    dtype = x.dtype
    x32 = x.to(torch.float32)
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension (HF's LlamaRMSNorm)."""
    return add_rms_norm(x, None, weight, eps)[0]


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual add and the norm after it: ``(rms_norm(x + delta), x + delta)`` (``delta=None``: no add, and
    the second tensor is ``x``). ``x`` and ``delta`` are left alone."""
    n = x.shape[-1]
    lib = _in_c(x, weight, *(() if delta is None else (delta,)))
    if lib is None or x.numel() == 0 or weight.shape != (n,) or (delta is not None and delta.shape != x.shape):
        s = x if delta is None else x + delta
        return _torch_rms_norm(s, weight, eps), s
    x2 = x.reshape(-1, n)  # a view for rows (stride(-1) == 1), a copy otherwise
    d2 = None if delta is None else delta.reshape(-1, n)
    s = None if d2 is None else torch.empty(x2.shape)
    w, out = weight.contiguous(), torch.empty(x2.shape)
    lib.npukit_add_rms_norm(x2.data_ptr(), x2.stride(0), None if d2 is None else d2.data_ptr(),
                            0 if d2 is None else d2.stride(0), None if s is None else s.data_ptr(), w.data_ptr(),
                            eps, out.data_ptr(), x2.shape[0], n, torch.get_num_threads())
    return out.view(x.shape), (x if s is None else s.view(x.shape))


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of q ``[T, Hq, D]`` and k ``[T, Hk, D]`` by cos, sin ``[T, 1, D]`` (HF's
    ``apply_rotary_pos_emb``: ``x * cos + rotate_half(x) * sin``). In C, q and k are rotated in place."""
    lib = _in_c(q, k, cos, sin)
    if (lib is None or q.shape[-1] % 2 or q.stride(1) != q.shape[2] or k.stride(1) != k.shape[2]
            or k.shape[::2] != q.shape[::2] or not (cos.is_contiguous() and sin.is_contiguous())
            or cos.numel() != q.shape[0] * q.shape[2] or sin.shape != cos.shape):
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
    lib.npukit_rope(q.data_ptr(), q.stride(0), q.shape[1], k.data_ptr(), k.stride(0), k.shape[1], cos.data_ptr(),
                    sin.data_ptr(), q.shape[0], q.shape[2], torch.get_num_threads())
    return q, k


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def silu_and_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` (the SwiGLU MLP's activation), written into ``gate``."""
    lib = _in_c(gate, up)
    if lib is None or gate.dim() != 2 or up.shape != gate.shape:
        return F.silu(gate, inplace=True).mul_(up)
    lib.npukit_silu_mul(gate.data_ptr(), gate.stride(0), up.data_ptr(), up.stride(0), gate.shape[0], gate.shape[1],
                        torch.get_num_threads())
    return gate
