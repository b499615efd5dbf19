"""Graph mode: pure decode steps run the dense pieces of every layer as a graph, one per capture size.

vLLM's idea (``--enforce-eager`` off, ``cudagraph_capture_sizes``), in its piecewise form: a decoder layer is
cut at attention. The two dense pieces around it (``runner.qkv_piece``: norm, q/k/v, RoPE; and
``runner.out_mlp_piece``: o_proj, residual, norm, MLP) have the same shapes at every step of a given batch
size, so they are captured once per capture size (CUDA: ``torch.cuda.CUDAGraph``; Ascend:
``torch.npu.NPUGraph``, UNTESTED; CPU: see below). Paged attention and the KV write, whose shapes change with
the context length, run in between with the step's own block tables and lengths, so a longer context never
recaptures::

    decode step, 3 sequences, capture sizes [1, 2, 4]  ->  padded to 4 rows
    rows  0 1 2 | 3            embed + RoPE (eager) -> zero-padded to 4 rows
          [ qkv graph, size 4 ]                      4 rows (row 3 computes zeros, nobody reads them)
          [ KV write + paged attention ]             rows 0..2 only: padding never touches the KV cache
          [ out_mlp graph, size 4 ]                  4 rows
          ... every layer ...  -> hidden[:3] -> final norm, lm_head (eager)

On CPU there are no kernel launches to record, but the eager step's host work between its kernels (Python
checks, views, allocations, argument conversions) is there, and at batch 1 it is a quarter of the layer loop. In
fp32 and bf16, where npukit's C kernels run, the CPU "graph" is npukit.engine.cpu_graph: every layer's kernel
calls bound once per size to static buffers and replayed (backend "cpu-replay": the eager step's bits). Otherwise
(other precisions; or ``NPUKIT_CPU_GRAPHS=inductor``, to compare) the two pieces are ``torch.compile``d (inductor),
with the matmuls as opaque calls to the kernels the runner's probe chose (see cpu_gemm.CpuLinear): that saves
the element-wise work between them, and costs call machinery around each. Measure both with
``python benchmarks/bench_graph.py --model smollm2-135m-instruct --threads 2 --dtype float32 --context 384``.

A step with any prefill, or more decodes than the largest size, runs eager (as in vLLM). Regional
compilation (inductor): one compiled function per piece and size serves every layer (its guards check shapes,
not whose weights), so compiling costs 2 x len(sizes) compilations whatever the depth of the model.

Failures never stop the engine: a compile or capture error (e.g. no C++ compiler for inductor) or an error
when a graph runs logs a warning and the runner stays eager for its lifetime.
"""
from __future__ import annotations

import bisect
import functools
import logging
import os
import shutil
import time
import types
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import cpu_graph
from .runner import out_mlp_piece, qkv_piece

_log = logging.getLogger(__name__)
# NPUKIT_CPU_GRAPHS=inductor: graph mode on CPU compiles the pieces with torch.compile even where npukit's
# replay of bound kernel calls (npukit.engine.cpu_graph, fp32 / bf16) can run: to compare the two.
CPU_BACKEND_ENV = "NPUKIT_CPU_GRAPHS"


@dataclass
class GraphStats:
    """What graph mode did: the sizes it compiled, what that cost once, and how steps used the graphs."""

    # "cpu-replay" (CPU fp32 / bf16), "inductor" (CPU), "cuda-graph", "npu-graph" (UNTESTED), "eager" (fell back)
    backend: str
    capture_sizes: list[int]
    compile_seconds: float = 0.0    # compiling / capturing every size, paid once at start-up
    num_graph_steps: int = 0        # steps that ran the graphs
    num_eager_steps: int = 0        # steps that ran eager (a prefill in the step, or more decodes than the sizes)
    num_real_rows: int = 0          # decode rows of the graph steps
    num_padded_rows: int = 0        # rows added to reach a capture size (computed, then dropped)
    steps_per_size: dict[int, int] = field(default_factory=dict)
    last_capture_size: int | None = None  # the latest step's size (None: it ran eager)
    last_padded_rows: int = 0
    fallback_reason: str | None = None    # why graph mode was switched off, if it was

    @property
    def padding_waste(self) -> float:
        """Padded rows / all rows the graphs computed (0 when no graph ran)."""
        total = self.num_real_rows + self.num_padded_rows
        return self.num_padded_rows / total if total else 0.0


def padded_size(num_rows: int, sizes: list[int]) -> int | None:
    """The smallest capture size >= num_rows (None: larger than every size, so the step runs eager)."""
    i = bisect.bisect_left(sizes, num_rows)
    return sizes[i] if i < len(sizes) else None


def cpp_compiler() -> str | None:
    """The C++ compiler inductor would use on CPU ($CXX, g++, c++ or clang++), or None."""
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


# (piece, size, model signature) -> its torch.compile'd function, shared by every runner of that shape in this
# process (a second engine on the same model compiles nothing).
_COMPILED: dict[tuple, object] = {}


def _inductor_cache_per_cpu_capability() -> None:
    """Keep inductor's on-disk cache apart per CPU capability (unless TORCHINDUCTOR_CACHE_DIR is set).

    NOTE: with ATEN_CPU_CAPABILITY=avx2 on an AVX512 machine (how we test the AVX2 path), inductor reused
    kernels its cache held from an AVX512 run and greedy tokens came out as garbage; a fresh cache was correct.
    """
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    default = os.path.abspath(default_cache_dir())
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (None, default):  # inductor writes its default there itself
        capability = torch.backends.cpu.get_cpu_capability().lower()
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = f"{default}-{capability}"


def _compiled(piece, size: int, signature: tuple):
    """torch.compile of a piece for one batch size, static shapes, no graph breaks allowed."""
    key = (piece.__name__, size, signature)
    if key not in _COMPILED:
        _inductor_cache_per_cpu_capability()
        _COMPILED[key] = torch.compile(_own_copy(piece), dynamic=False, fullgraph=True)
    return _COMPILED[key]


def _own_copy(fn):
    """fn with a code object of its own. NOTE: torch.compile caches per code object, with at most
    torch._dynamo.config.recompile_limit entries (8); one copy per (piece, size, model shape) holds one
    entry, so many sizes or models in one process never hit the limit (which fullgraph=True makes an error)."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


def _signature(runner) -> tuple:
    """What a compiled piece depends on besides the batch size: the first layer's weights' kinds, shapes and
    dtypes (every layer has the same), the head layout and the norm epsilon."""
    def kind(v):
        return (tuple(v.shape), v.dtype, str(v.device)) if isinstance(v, torch.Tensor) else type(v).__name__
    lw = runner.layers[0]
    return (tuple((k, kind(v)) for k, v in vars(lw).items() if k != "act"), runner.num_heads, runner.num_kv_heads,
            runner.head_dim, runner.eps)


class GraphRunner:
    """Graph mode for a ModelRunner (``runner.graph``): ``forward(inputs)`` runs a pure decode step on the
    graphs and returns the hidden states, or None when the step must run eager."""

    def __init__(self, runner, compile_sizes: list[int]):
        self.runner = runner
        self.sizes = sorted(compile_sizes)
        device = runner.device.type
        backend = {"cpu": "inductor", "cuda": "cuda-graph", "npu": "npu-graph"}.get(device, "eager")
        if backend == "inductor" and cpu_graph.supports(runner) and os.environ.get(CPU_BACKEND_ENV) != "inductor":
            backend = "cpu-replay"
        self.stats = GraphStats(backend=backend, capture_sizes=list(self.sizes))
        self.steps: dict[int, object] = {}  # size -> step(x, cos, sin, inputs) -> hidden states [size, hidden]
        if runner.shard is not None:
            self._fall_back("graph mode runs at tensor_parallel_size 1 only")
        elif backend == "eager":
            self._fall_back(f"no graph backend for device {device!r} (cpu, cuda, npu have one)")
        elif backend == "inductor" and cpp_compiler() is None:
            self._fall_back("torch.compile (inductor) needs a C++ compiler on CPU and none was found: "
                            "apt-get install g++ (or set CXX)")
        else:
            start = time.perf_counter()
            try:
                self._capture(backend)
            except Exception as e:  # noqa: BLE001 - any compile / capture failure: run eager, never crash
                self._fall_back(f"compiling the graphs failed: {type(e).__name__}: {e}")
            else:
                self.stats.compile_seconds = time.perf_counter() - start

    @property
    def enabled(self) -> bool:
        return bool(self.steps)

    def _fall_back(self, reason: str) -> None:
        _log.warning("graph mode off, running eager: %s", reason)
        self.steps = {}
        self.stats.backend, self.stats.fallback_reason = "eager", reason

    # ------------------------------------------------------------------ compile / capture
    @torch.inference_mode()
    def _capture(self, backend: str) -> None:
        r = self.runner
        if backend == "cpu-replay":
            for size in self.sizes:
                self.steps[size] = cpu_graph.CpuGraph(r, size)
        elif backend == "inductor":
            for size in self.sizes:
                qkv, out_mlp = self._compiled_pieces(size)
                self._warm_up(size, qkv, out_mlp)  # compiles now, at start-up, not in the first request's step
                self.steps[size] = functools.partial(r.run_layers, qkv=qkv, out_mlp=out_mlp)
        else:  # UNTESTED on npu
            graphs = DeviceGraphs(r, torch.cuda if backend == "cuda-graph" else torch.npu)
            for size in self.sizes:
                self.steps[size] = graphs.capture(size)

    def _compiled_pieces(self, size: int) -> tuple:
        r = self.runner
        qkv, out = (_compiled(piece, size, _signature(r)) for piece in (qkv_piece, out_mlp_piece))
        return (lambda i, x, cos, sin: qkv(r.layers[i], x, cos, sin, r.eps, r.num_heads, r.num_kv_heads, r.head_dim),
                lambda i, x, attn: out(r.layers[i], x, attn, r.eps))

    def _warm_up(self, size: int, qkv, out_mlp) -> None:
        """Run every layer's pieces once at this size (dummy rows) so that torch.compile compiles now."""
        r = self.runner
        x = torch.zeros(size, r.embed.shape[1], dtype=r.dtype, device=r.device)
        cos, sin = r.rotary(torch.zeros(size, dtype=torch.long, device=r.device))
        attn = torch.zeros(size, r.num_heads * r.head_dim, dtype=r.dtype, device=r.device)
        for i in range(len(r.layers)):
            qkv(i, x, cos, sin)
            out_mlp(i, x, attn)

    # ------------------------------------------------------------------ a step
    def forward(self, inp) -> torch.Tensor | None:
        """Hidden states ``[num_decodes, hidden]`` of a pure decode step run on the graphs; None: run it eager."""
        n = inp.num_decodes
        size = padded_size(n, self.sizes) if self.steps and not inp.prefills and n == len(inp.rows) else None
        self.stats.last_capture_size, self.stats.last_padded_rows = size, 0
        if size is None:
            self.stats.num_eager_steps += 1
            return None
        try:
            hidden = self._forward(inp, size, n)
        except Exception as e:  # noqa: BLE001 - the step reruns eager; the runner stays eager
            self._fall_back(f"a graph step failed: {type(e).__name__}: {e}")
            self.stats.last_capture_size = None
            self.stats.num_eager_steps += 1
            return None
        s = self.stats
        s.num_graph_steps += 1
        s.num_real_rows += n
        s.num_padded_rows += size - n
        s.steps_per_size[size] = s.steps_per_size.get(size, 0) + 1
        s.last_padded_rows = size - n
        return hidden

    def _forward(self, inp, size: int, n: int) -> torch.Tensor:
        r = self.runner
        x = r._embed(inp.input_ids)
        cos, sin = r.rotary(inp.positions)
        if size > n:  # padding rows: zeros (their q, k, v and outputs are computed, then dropped)
            x, cos, sin = (F.pad(t, (0, 0) * (t.dim() - 1) + (0, size - n)) for t in (x, cos, sin))
        return self.steps[size](x, cos, sin, inp)[:n]


class DeviceGraphs:
    """CUDA graphs (``torch.cuda.CUDAGraph``) or Ascend ACL graphs (``torch.npu.NPUGraph``, UNTESTED): one
    graph per (capture size, layer, piece), reading and writing static buffers of that size.

    NOTE: every graph reads its inputs from and writes its outputs into buffers allocated before capture
    (outside the shared memory pool), and frees all its temporaries by the end of its capture: so graphs can
    share one pool and replay in any order without overwriting each other's results.
    """

    def __init__(self, runner, api):
        self.runner, self.api = runner, api
        self.pool = api.graph_pool_handle()

    def capture(self, size: int):
        """Capture both pieces of every layer at this size; a step(x, cos, sin, inputs) that replays them."""
        r = self.runner
        new = lambda *shape: torch.zeros(*shape, dtype=r.dtype, device=r.device)  # noqa: E731
        heads, kv, dim = r.num_heads, r.num_kv_heads, r.head_dim
        b = {"x": new(size, r.embed.shape[1]), "cos": new(size, 1, dim), "sin": new(size, 1, dim),
             "attn": new(size, heads * dim), "q": new(size, heads, dim), "k": new(size, kv, dim),
             "v": new(size, kv, dim)}
        graphs = {}
        for i, lw in enumerate(r.layers):
            def qkv_body(lw=lw):
                q, k, v = qkv_piece(lw, b["x"], b["cos"], b["sin"], r.eps, heads, kv, dim)
                b["q"].copy_(q), b["k"].copy_(k), b["v"].copy_(v)

            def out_body(lw=lw):
                b["x"].copy_(out_mlp_piece(lw, b["x"], b["attn"], r.eps))

            graphs[i, "qkv"], graphs[i, "out"] = self._graph(qkv_body), self._graph(out_body)

        def qkv(i, x, cos, sin):
            graphs[i, "qkv"].replay()
            return b["q"], b["k"], b["v"]

        def out_mlp(i, x, attn):
            b["attn"].copy_(attn)
            graphs[i, "out"].replay()
            return b["x"]

        def step(x, cos, sin, inp):
            b["x"].copy_(x), b["cos"].copy_(cos), b["sin"].copy_(sin)  # the buffers stand in for the inputs
            return r.run_layers(b["x"], b["cos"], b["sin"], inp, qkv, out_mlp)
        return step

    def _graph(self, body):
        api = self.api
        stream = api.Stream()
        stream.wait_stream(api.current_stream())
        with api.stream(stream):  # warm up on a side stream before capture (as torch's docs do)
            body()
        api.current_stream().wait_stream(stream)
        api.synchronize()
        graph = api.CUDAGraph() if api is torch.cuda else api.NPUGraph()
        with api.graph(graph, pool=self.pool):
            body()
        return graph
