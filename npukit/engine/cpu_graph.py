"""Graph mode on CPU: a decode step's kernel calls bound once per batch size, then replayed.

What a CUDA graph records is the list of kernels a step launches, with their arguments, on buffers allocated
before capture; a replay skips all the host work that produced that list. A CPU has no launches to skip, but
its eager step does the same host work between its kernels: Python checks, views, allocations, argument
conversions. At one decode row that is a quarter of SmolLM2's layer loop (W8A16, 2 threads, 384 tokens of
context: 30 layers replayed 9.5 ms, eager 12.8), and ``torch.compile`` cannot remove it: its compiled pieces
call the matmuls as opaque ops (npukit.engine.cpu_gemm), with their own call machinery around each.

So, per capture size, ``CpuGraph`` allocates static buffers (x, the norm's output, q/k/v, attention's output,
...) that every layer shares, and records each layer's calls on them, in the eager step's order:

- npukit's C kernels (RMSNorm, RoPE, fused panel GEMMs, paged attention) as ctypes calls with every argument
  bound (``functools.partial``: the buffers' addresses, shapes, thread count);
- anything else (a linear on oneDNN's packed weight or F.linear, a quantised kernel, Qwen3's q/k norms, a
  non-SiLU activation) as the very call the eager step makes, on the static inputs, its result copied into a
  static buffer with the strides the eager result has (so the calls after it take the same paths).

A replay then runs, per layer: its bound calls, the KV write and attention (whose arguments change every
step: slots, block tables, context lengths), the rest of its calls. The same kernels on the same rows in the
same layout as the eager step: the same bits, at a batch of a capture size's rows (tests/test_graph.py
compares the logits with ``torch.equal``); a padded batch runs the kernels chosen for its padded size.

fp32 or bf16 with npukit's C kernels (``supports``); other precisions use ``torch.compile`` (npukit.engine.graph).
NOTE: the thread count is bound at capture: ``torch.set_num_threads`` afterwards leaves the replays on the
old count (npukit's C kernels give the same bits at any count; only the speed changes).
"""
from __future__ import annotations

import functools

import torch

from . import cpu_attention, cpu_ops
from .cpu_gemm import FusedLinear
from .runner import _linear, act_and_mul


def supports(runner) -> bool:
    """Whether this runner can replay on CPU: fp32 or bf16 on the CPU, the C kernels built, no tensor parallelism."""
    return (runner.device.type == "cpu" and runner.dtype in cpu_ops.DTYPES and runner.shard is None
            and runner.decode_kernel is not None and cpu_ops._ops() is not None)


def _run_into(fn, args: tuple, outs: tuple) -> None:
    """Call ``fn(*args)`` and copy its results into ``outs`` (an output that is already its buffer: not copied)."""
    results = fn(*args)
    for out, t in zip(outs, results if isinstance(results, tuple) else (results,)):
        if out is not t:
            out.copy_(t)


class CpuGraph:
    """One capture size's static buffers and bound calls; ``graph(x, cos, sin, inp)`` runs a decode step of
    ``inp.num_decodes`` real rows (x, cos, sin padded to the size) and returns the hidden states ``[size, hidden]``
    (a static buffer: read it before the next step)."""

    def __init__(self, runner, size: int):
        if not supports(runner):
            raise ValueError("CpuGraph needs a float32 or bfloat16 CPU runner with npukit's C kernels (see supports)")
        self.runner, self.size = runner, size
        self._buffers: dict[tuple, torch.Tensor] = {}
        hidden, dim = runner.embed.shape[1], runner.head_dim
        self.x = self._buffer("x", (size, hidden))
        self.cos, self.sin = self._buffer("cos", (size, 1, dim)), self._buffer("sin", (size, 1, dim))
        self.attn = self._buffer("attn", (size, runner.num_heads * dim))  # rows past a step's real ones stay zero
        self.layers = [self._record(i, lw) for i, lw in enumerate(runner.layers)]

    @torch.inference_mode()
    def __call__(self, x, cos, sin, inp) -> torch.Tensor:
        self.x.copy_(x), self.cos.copy_(cos), self.sin.copy_(sin)
        n, slots, kv = inp.num_decodes, inp.slot_mapping, self.runner.kv_cache.slots
        (bucket,) = inp.decode_buckets  # NOTE: with the C kernel a pure decode step is one bucket
        tables, lens = bucket.block_tables, bucket.ctx_lens
        for i, (before, k, v, attend, after) in enumerate(self.layers):
            for call in before:
                call()
            ks, vs = kv[i]
            ks.index_copy_(0, slots, k[:n])  # the real rows only: padding never reaches the KV cache
            vs.index_copy_(0, slots, v[:n])
            attend(tables, lens, n)
            for call in after:
                call()
        return self.x

    # ------------------------------------------------------------------ recording
    def _buffer(self, name: str, shape: tuple, stride: tuple | None = None) -> torch.Tensor:
        """A zeroed static buffer, the same one for every layer that asks for this name, shape and strides."""
        key = (name, tuple(shape), stride)
        if key not in self._buffers:
            dtype = self.runner.dtype
            self._buffers[key] = (torch.zeros(shape, dtype=dtype) if stride is None else
                                  torch.empty_strided(shape, stride, dtype=dtype).zero_())
        return self._buffers[key]

    def _call(self, calls: list, name: str, fn, *args) -> tuple:
        """Record ``fn(*args)`` as it is: run it once now (on the static inputs) for its results' shapes and strides,
        give each result a buffer like it (or the input it returned: in place), and replay call + copy."""
        results = fn(*args)
        results = results if isinstance(results, tuple) else (results,)
        outs = tuple(t if any(a is t for a in args) else self._buffer(f"{name}{j}", t.shape, t.stride())
                     for j, t in enumerate(results))
        calls.append(functools.partial(_run_into, fn, args, outs))
        return outs

    def _linears(self, calls: list, name: str, fused: FusedLinear | None, x, members: list) -> tuple:
        """Linears reading rows ``x``, as the eager step computes them at this row count: one bound FusedLinear call
        into a ``[rows, sum of outputs]`` buffer (views of it, as FusedLinear returns them; a W8A8Group: its call as
        it is), else each one's _linear."""
        if fused is not None and fused.takes(x):
            if not isinstance(fused, FusedLinear):
                return self._call(calls, name, fused, x)
            y = self._buffer(name, (x.shape[0], fused.out_features))
            calls.append(fused.bind(x, y))
            return (y,) if len(fused.sizes) == 1 else y.split_with_sizes(fused.sizes, 1)
        return tuple(self._call(calls, f"{name}.{j}", _linear, x, w, b)[0] for j, (w, b) in enumerate(members))

    def _norm(self, calls: list, name: str, x, delta, weight) -> tuple:
        """add_rms_norm(x, delta, weight): ``(norm, sum)``; the sum is x itself without delta."""
        eps = self.runner.eps
        out = self._buffer(name, x.shape)
        s = None if delta is None else self._buffer(name + ".sum", x.shape)
        call = cpu_ops.bind_add_rms_norm(x, delta, weight, eps, out, s)
        if call is None:
            return self._call(calls, name, cpu_ops.add_rms_norm, x, delta, weight, eps)
        calls.append(call)
        return out, (x if s is None else s)

    def _record(self, i: int, lw) -> tuple:
        """One layer as (calls before attention, its k and v, attention, calls after it): qkv_piece and out_mlp_piece of
        npukit.engine.runner, step by step."""
        r, size, before, after = self.runner, self.size, [], []
        h = self._norm(before, "h", self.x, None, lw.input_norm)[0]
        q, k, v = self._linears(before, "qkv", lw.qkv, h, [(lw.q_w, lw.q_b), (lw.k_w, lw.k_b), (lw.v_w, lw.v_b)])
        q = q.view(size, r.num_heads, r.head_dim)
        k, v = (t.view(size, r.num_kv_heads, r.head_dim) for t in (k, v))
        if lw.q_norm is not None:
            q = self._call(before, "q_norm", cpu_ops.rms_norm, q, lw.q_norm, r.eps)[0]
            k = self._call(before, "k_norm", cpu_ops.rms_norm, k, lw.k_norm, r.eps)[0]
        rope = cpu_ops.bind_rope(q, k, self.cos, self.sin)
        if rope is None:
            q, k = self._call(before, "rope", cpu_ops.rope, q, k, self.cos, self.sin)
        else:
            before.append(rope)
        if not q.is_contiguous():  # the kernel reads contiguous rows, as eager's q.contiguous() gives it
            q_rows = self._buffer("q_rows", q.shape)
            before.append(functools.partial(q_rows.copy_, q))
            q = q_rows
        attend = cpu_attention.bind(r.decode_kernel, q, r.kv_cache.k_caches[i], r.kv_cache.v_caches[i],
                                    lw.sliding_window, r.scaling, self.attn.view(size, r.num_heads, r.head_dim))
        (o,) = self._linears(after, "o", lw.o, self.attn, [(lw.o_w, lw.o_b)])
        h, s = self._norm(after, "post", self.x, o, lw.post_norm)
        gate, up = self._linears(after, "gate_up", lw.gate_up, h, [(lw.gate_w, lw.gate_b), (lw.up_w, lw.up_b)])
        (act,) = self._call(after, "act", act_and_mul, lw, gate, up)
        (down,) = self._linears(after, "down", lw.down, act, [(lw.down_w, lw.down_b)])
        after.append(functools.partial(torch.add, s, down, out=self.x))
        return before, k, v, attend, after
