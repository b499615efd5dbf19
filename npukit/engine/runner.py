"""ModelRunner: a paged forward for Llama-family HF models that reuses the loaded model's weights.

One step computes a batch of ``(seq, num_new_tokens)`` entries. Their tokens are flattened into one
``[num_tokens, hidden]`` tensor (no padding to the longest): embeddings, norms, q/k/v/o projections and
the MLP run once over all of them. Only attention is per sequence:

- decode entries (1 new token): fp32 or bf16 on CPU, one call per layer of a C paged-attention kernel that walks
  each sequence's block table and reads K/V in place (``npukit.engine.cpu_attention``); otherwise batched
  SDPA calls over their gathered blocks: sorted by context length, grouped so padding to a group's longest
  context stays small (and, on CPU, so one call gathers ~1 MiB of K: cache-sized gathers were 2x faster
  than one big one), masked;
- prefill chunks (several new tokens): fp32 or bf16 on CPU, all of a step's chunks in one call
  per layer of a C flash-attention kernel over their blocks (``cpu_attention.paged_prefill_attention``);
  otherwise one sequence at a time: a first chunk attends over its own fresh K/V (``is_causal``), a later
  chunk over its gathered context with a causal offset mask.

All index tensors (positions, slots, block tables, masks) are built once per step, not per layer.
On CPU, measured with benchmarks/bench_runner.py: linears run at 60-80 % of the F.linear peak; decode
attention over long contexts is bound by reading K/V from memory. The gather + SDPA path moved each byte
three times and took ~60 % of a 64-sequence step at 384 tokens of context (SmolLM2 fp32, 2-core Xeon); the
kernel makes that step 0.67x as long. (An earlier bf16 C++ kernel with one horizontal sum per (token,
head) was no faster than gather + SDPA: the fp32 kernel's 16 partial sums per dot product, its prefetch of
the next block and 512-bit vectors are what made the difference.)
Supported: LlamaForCausalLM (SmolLM2), MistralForCausalLM, Qwen2ForCausalLM (q/k/v bias),
Qwen3ForCausalLM (q_norm/k_norm). Sliding-window layers are honoured (masks; the kernel's window).
Tensor parallelism: given a ``shard`` (``npukit.parallel.group.Shard``), the runner keeps only its rank's slice of
each weight (the table in ``npukit.parallel.sharding``), attends over its own heads with its own slice of
the KV cache, and all-reduces after o_proj and down_proj; rank 0 gets the logits. Without a shard it
references the HF weights, never copies them.
"""
from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from . import cpu_attention
from .cpu_gemm import CpuLinear, FusedLinear
from .cpu_ops import add_rms_norm, rms_norm, rope
from .kv_cache import KVCache, kv_shape

if TYPE_CHECKING:
    from ..quant.linear import W8A8Group

_log = logging.getLogger(__name__)
# On CPU one decode attention call gathers at most this many bytes of K (and as many of V); see __init__.
CPU_DECODE_CHUNK_BYTES = 1 << 20
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


# _LayerWeights field -> the module whose split (npukit.parallel.sharding.SPLITS) it follows; fields not listed
# (norms, q_norm / k_norm, the row-parallel biases o_b and down_b) are replicated on every rank.
_FIELD_MODULES = {"q_w": "q_proj", "q_b": "q_proj", "k_w": "k_proj", "k_b": "k_proj", "v_w": "v_proj",
                  "v_b": "v_proj", "o_w": "o_proj", "gate_w": "gate_proj", "gate_b": "gate_proj",
                  "up_w": "up_proj", "up_b": "up_proj", "down_w": "down_proj"}


class UnsupportedModelError(ValueError):
    """The paged runner does not know this architecture; use the model's own HF ``generate``."""


@dataclass
class _LayerWeights:
    """References to one HF decoder layer's parameters (the same tensors, never copies)."""

    input_norm: torch.Tensor
    post_norm: torch.Tensor
    q_w: torch.Tensor  # each *_w: the weight tensor, a CpuLinear or a QuantLinear module (see _linear)
    k_w: torch.Tensor
    v_w: torch.Tensor
    o_w: torch.Tensor
    gate_w: torch.Tensor
    up_w: torch.Tensor
    down_w: torch.Tensor
    act: torch.nn.Module
    silu: bool  # act is SiLU: computed in place
    q_b: torch.Tensor | None = None
    k_b: torch.Tensor | None = None
    v_b: torch.Tensor | None = None
    o_b: torch.Tensor | None = None
    gate_b: torch.Tensor | None = None
    up_b: torch.Tensor | None = None
    down_b: torch.Tensor | None = None
    q_norm: torch.Tensor | None = None  # Qwen3: RMSNorm over head_dim before RoPE
    k_norm: torch.Tensor | None = None
    sliding_window: int | None = None
    qkv: FusedLinear | W8A8Group | None = None  # q/k/v in one kernel call where all three run the panel kernel
    gate_up: FusedLinear | W8A8Group | None = None  # gate/up the same (cpu_gemm.FusedLinear; W8A8: quant.linear)
    o: FusedLinear | None = None        # o_proj, down_proj alone: 1-part FusedLinears, a panel-kernel call bound
    down: FusedLinear | None = None     # once (~5 us a call less than through _linear; bias only without TP)


@dataclass
class _Prefill:
    """A prefill chunk: token rows start:end of the flat batch, at positions num_computed...num_computed+n-1."""

    start: int
    end: int
    num_computed: int
    ctx_blocks: torch.Tensor | None  # blocks of positions 0..num_computed+n-1 (None: first chunk, or the C kernel)
    masks: dict[int | None, torch.Tensor | None] = field(default_factory=dict)  # window -> additive [n, ctx]


@dataclass
class _PrefillTables:
    """A step's prefill chunks as the CPU prefill kernel takes them (int64; see paged_prefill_attention)."""

    block_tables: torch.Tensor  # [n, max_blocks] each chunk's blocks up to its last position, padded with 0
    starts: torch.Tensor        # [n] its first row in the flat batch
    lens: torch.Tensor          # [n] its new tokens
    computed: torch.Tensor      # [n] the position of its first new token


@dataclass
class _DecodeBucket:
    """Decode rows start:end (1 token each) attending together over blocks padded to the bucket's longest."""

    start: int
    end: int
    block_ids: torch.Tensor  # [(end - start) * max_blocks] block table rows, padded with block 0, flattened
    max_blocks: int
    masks: dict[int | None, torch.Tensor]  # window -> additive [end - start, 1, 1, max_blocks * block_size]
    ctx_lens: torch.Tensor  # [end - start]: the tokens each row attends to (its context and itself)
    block_tables: torch.Tensor | None = None  # block_ids as [end - start, max_blocks] (the C kernel's input)


@dataclass
class StepEntry:
    """One batch entry as plain data (what rank 0 sends to tensor-parallel workers): the new tokens of a
    sequence at positions num_computed_tokens.., and its block table."""

    request_id: str
    num_computed_tokens: int
    new_token_ids: list[int]
    block_table: list[int]


@dataclass
class StepInputs:
    """Everything the layers need for one step, built once (host lists -> tensors)."""

    input_ids: torch.Tensor       # [T]
    positions: torch.Tensor       # [T]
    slot_mapping: torch.Tensor    # [T]
    decode_buckets: list[_DecodeBucket]  # decode rows come first, longest context first
    prefills: list[_Prefill]      # then the prefill chunks
    rows: list[tuple[int, int]]   # batch entry i computes rows rows[i][0]:rows[i][1], in the caller's order
    num_decodes: int = 0
    prefill_tables: _PrefillTables | None = None  # the same chunks, for the CPU prefill kernel when it runs
    npu_block_table: torch.Tensor | None = None    # use_npu_fused_ops: int32 [num_decodes, max_blocks]
    npu_context_lens: torch.Tensor | None = None   # use_npu_fused_ops: int32 [num_decodes], on the CPU


def _linear(x: torch.Tensor, w, b: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear for a float weight; a CpuLinear (fp32 or bf16 on CPU: the kernel the runner's probe chose for this
    row count, npukit.engine.cpu_gemm) computes with its bias; a quantised layer (npukit.quant.QuantLinear)
    projects, then the bias."""
    if isinstance(w, torch.Tensor):
        return F.linear(x, w, b)
    if isinstance(w, CpuLinear):
        return w(x, b)
    y = w.project(x)
    return y if b is None else y + b


def _weight(lin):
    """A projection's weight tensor, or the module itself when it is quantised (then _linear calls it)."""
    return lin.weight if isinstance(lin, torch.nn.Linear) else lin


# ---------------------------------------------------------------------- the dense pieces of a decoder layer
# NOTE: plain functions of tensors (and a layer's _LayerWeights), so that one torch.compile of each serves
# every layer (regional compilation: the guards check shapes, not which layer's weights), and the eager path
# runs the very same code.
def qkv_piece(lw: _LayerWeights, x, cos, sin, eps: float, num_heads: int, num_kv_heads: int, head_dim: int):
    """input norm -> q, k, v projections (-> Qwen3's q/k norms) -> RoPE: ``[T, heads, head_dim]`` each."""
    num_tokens = x.shape[0]
    h = rms_norm(x, lw.input_norm, eps)
    # NOTE: is_compiling first: a compiled piece never reads lw.qkv (no guard on which layer's object it is)
    if not torch.compiler.is_compiling() and lw.qkv is not None and lw.qkv.takes(h):
        q, k, v = lw.qkv(h)
    else:
        q, k, v = _linear(h, lw.q_w, lw.q_b), _linear(h, lw.k_w, lw.k_b), _linear(h, lw.v_w, lw.v_b)
    q = q.view(num_tokens, num_heads, head_dim)
    k = k.view(num_tokens, num_kv_heads, head_dim)
    v = v.view(num_tokens, num_kv_heads, head_dim)
    if lw.q_norm is not None:
        q = rms_norm(q, lw.q_norm, eps)
        k = rms_norm(k, lw.k_norm, eps)
    q, k = rope(q, k, cos, sin)
    return q, k, v


def out_mlp_piece(lw: _LayerWeights, x, attn, eps: float, all_reduce=None):
    """x + o_proj(attn), then + MLP(post norm): the layer's output ``[T, hidden]``."""
    h, x = add_rms_norm(x, _row_parallel(attn, lw.o_w, lw.o_b, all_reduce, lw.o), lw.post_norm, eps)
    if not torch.compiler.is_compiling() and lw.gate_up is not None and lw.gate_up.takes(h):
        gate, up = lw.gate_up(h)
    else:
        gate, up = _linear(h, lw.gate_w, lw.gate_b), _linear(h, lw.up_w, lw.up_b)
    return x + _row_parallel(act_and_mul(lw, gate, up), lw.down_w, lw.down_b, all_reduce, lw.down)


def act_and_mul(lw: _LayerWeights, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``act(gate) * up``; SiLU in place, into ``gate`` (~10 % of a CPU prefill step went to allocating and
    touching these temporaries)."""
    return F.silu(gate, inplace=True).mul_(up) if lw.silu else lw.act(gate) * up


def _row_parallel(x: torch.Tensor, w, b: torch.Tensor | None, all_reduce=None,
                  bound: FusedLinear | None = None) -> torch.Tensor:
    """o_proj / down_proj (``bound``: the same weight as a 1-part FusedLinear, with the bias only when there is
    no all_reduce, or None): under tensor parallelism a partial sum per rank, all-reduced, then the bias once."""
    if bound is not None and not torch.compiler.is_compiling() and bound.takes(x):
        y = bound(x)[0]
        if all_reduce is None:
            return y
    elif all_reduce is None:
        return _linear(x, w, b)
    else:
        y = _linear(x, w)
    all_reduce(y)
    return y if b is None else y + b


class ModelRunner:
    """Paged forward over a loaded HF model. ``execute_model(batch)`` is the one call the engine makes.

    ``decode_chunk_bytes``: most K bytes one batched decode attention call gathers (None: 1 MiB on CPU,
    unlimited elsewhere). ``use_npu_fused_ops``: on an Ascend NPU, write K/V with
    ``torch_npu._npu_reshape_and_cache`` and run decode attention with ``torch_npu._npu_paged_attention``
    straight on the block tables (the ops vLLM-Ascend uses). UNTESTED: written from vLLM-Ascend's calls,
    never run on an NPU by us; off by default.
    """

    def __init__(self, model, block_size: int, num_kv_blocks: int, *, decode_chunk_bytes: int | None = None,
                 use_npu_fused_ops: bool = False, shard=None):
        config = model.config
        model_type = getattr(config, "model_type", None)
        inner = getattr(model, "model", None)
        if model_type not in SUPPORTED_MODEL_TYPES or inner is None or not hasattr(inner, "layers"):
            raise UnsupportedModelError(
                f"the paged engine supports {', '.join(SUPPORTED_MODEL_TYPES)} causal LMs, not "
                f"{type(model).__name__} (model_type={model_type!r}); generate with the model's own Hugging Face "
                "path instead: model.generate(input_ids, max_new_tokens=...)"
            )
        if not isinstance(block_size, int) or block_size <= 0:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        if not isinstance(num_kv_blocks, int) or num_kv_blocks <= 0:
            raise ValueError(f"num_kv_blocks must be a positive int, got {num_kv_blocks!r}")
        self.block_size = block_size
        self.num_kv_blocks = num_kv_blocks
        self.device = inner.embed_tokens.weight.device
        self.dtype = inner.embed_tokens.weight.dtype
        num_layers, self.num_kv_heads, self.head_dim = kv_shape(config)
        self.num_heads = config.num_attention_heads
        self.eps = config.rms_norm_eps
        self.vocab_size = model.lm_head.weight.shape[0]
        self.embed = inner.embed_tokens.weight
        self.final_norm = inner.norm.weight
        self.lm_head_w = _weight(model.lm_head)  # a QuantLinear when lm_head was quantised (quantize_lm_head)
        self.rotary_emb = inner.rotary_emb
        self.scaling = inner.layers[0].self_attn.scaling
        self.layers = [self._layer_weights(layer, config) for layer in inner.layers[:num_layers]]
        self.shard = shard
        if shard is not None:
            self._keep_shard(shard, config.intermediate_size)
        else:
            self.model = model  # NOTE: a sharded runner keeps no reference, so the full weights can be freed
        # the packed copies of weights that QuantLinears and CpuLinears (see _choose_cpu_kernels) keep
        self.packed_bytes = sum(c.nbytes for v in self._fields() for c in getattr(v, "copies", {}).values())
        if self.device.type == "cpu" and self.dtype in (torch.float32, torch.bfloat16) and shard is None:
            self._choose_cpu_kernels()
        self._fuse_projections()
        # fp32 or bf16 on CPU: decode and prefill attention in C kernels that read K/V in place (cpu_attention);
        # None (no compiler, other dtypes and devices): gather the blocks and run SDPA.
        self.decode_kernel = cpu_attention.load(self.dtype) if self.device.type == "cpu" else None
        self.prefill_kernel = cpu_attention.load(self.dtype, "prefill") if self.device.type == "cpu" else None
        # NOTE: on CPU small gathers stay in cache and reuse malloc'd memory: one big gather per layer made
        # a 64-sequence decode step ~2x slower (fp32 SmolLM2) than 1 MiB chunks. Elsewhere one call per bucket.
        if decode_chunk_bytes is None:
            decode_chunk_bytes = CPU_DECODE_CHUNK_BYTES if self.device.type == "cpu" else 1 << 62
        per_block = block_size * self.num_kv_heads * self.head_dim * self.dtype.itemsize
        self.decode_blocks_per_call = max(1, decode_chunk_bytes // per_block)
        if use_npu_fused_ops and self.device.type != "npu":
            raise ValueError(f"use_npu_fused_ops=True needs the model on an Ascend NPU (torch_npu); it is on "
                             f"{self.device}. Leave it False elsewhere.")
        self.use_npu_fused_ops = use_npu_fused_ops
        self.prepare_seconds = 0.0  # total time in build_inputs (index building), for StepTiming
        self.windows = sorted({w.sliding_window for w in self.layers}, key=lambda w: (w is not None, w or 0))
        if use_npu_fused_ops and self.windows != [None]:
            raise ValueError("use_npu_fused_ops does not handle sliding-window layers; leave it False")
        self.kv_cache = KVCache.allocate(num_layers, num_kv_blocks, block_size, self.num_kv_heads,
                                         self.head_dim, self.dtype, self.device)
        self.graph = None  # graph mode: a npukit.engine.graph.GraphRunner that LLM attaches (enforce_eager=False)

    def _keep_shard(self, shard, intermediate_size: int) -> None:
        """Replace every weight by this rank's slice (copies), per npukit.parallel.sharding.SPLITS."""
        from ..parallel import sharding as sh

        sh.check_tp(self.num_heads, self.num_kv_heads, intermediate_size, shard.world_size)
        tp, rank, kv = shard.world_size, shard.rank, self.num_kv_heads
        cut = functools.partial(sh.shard_tensor, tp=tp, rank=rank, head_dim=self.head_dim, num_kv_heads=kv)
        head = self.lm_head_w
        tied = isinstance(head, torch.Tensor) and head.data_ptr() == self.embed.data_ptr()
        self.embed = cut(self.embed, sh.SPLITS["embed_tokens"])
        if not isinstance(head, torch.Tensor):  # a quantised lm_head: its int8 rows and their scales
            self.lm_head_w = head.shard(functools.partial(cut, split=sh.SPLITS["lm_head"]), row_parallel=False)
        else:
            self.lm_head_w = self.embed if tied else cut(head, sh.SPLITS["lm_head"])
        self.vocab_start = rank * self.embed.shape[0]
        for lw in self.layers:
            for name, module in _FIELD_MODULES.items():
                t = getattr(lw, name)
                if isinstance(t, torch.Tensor):
                    setattr(lw, name, cut(t, sh.SPLITS[module]))
                elif t is not None:  # a QuantLinear: its int8 weight is cut like the float one
                    setattr(lw, name, t.shard(functools.partial(cut, split=sh.SPLITS[module]),
                                              row_parallel=sh.SPLITS[module] == sh.ROW))
        self.num_heads //= tp
        self.num_kv_heads = sh.kv_heads_per_rank(kv, tp)

    def _choose_cpu_kernels(self) -> None:
        """fp32 or bf16 on CPU: wrap the float weights in CpuLinears that run, per row count, the kernel measured
        fastest here (npukit.engine.cpu_gemm: F.linear, (W @ x.T).T, oneDNN on a packed copy or npukit's C kernel on a
        copy packed in panels; ~4.5 s for SmolLM2, once per process, shapes and thread count). q/k/v need rows,
        so never take the transposed one. Packed copies (oneDNN's, panels) are taken only while they fit in a
        quarter of the available memory."""
        from .. import device as device_mod
        from .cpu_gemm import COPIES, KERNELS, ROW_KERNELS, choose, probe

        threads = torch.get_num_threads()
        dense, qkv = ("o_w", "gate_w", "up_w", "down_w"), ("q_w", "k_w", "v_w")
        members = []  # (owner, attribute, the probe's times for it, the kernels it may run)
        if all(isinstance(getattr(lw, f), torch.Tensor) for lw in self.layers for f in dense + qkv):  # not quantised
            times = probe([getattr(lw, f) for lw in self.layers for f in dense], threads)
            members += [(lw, f, times, KERNELS if f in dense else ROW_KERNELS)
                        for lw in self.layers for f in dense + qkv]
        if isinstance(self.lm_head_w, torch.Tensor):
            members.append((self, "lm_head_w", probe([self.lm_head_w], threads), KERNELS))
        tables = [choose(times, kernels) for _, _, times, kernels in members]
        copies = sum(getattr(o, f).nbytes * len(COPIES.keys() & set(t.values()))
                     for (o, f, _, _), t in zip(members, tables))
        if copies > device_mod.memory_stats(self.device).free // 4:
            _log.info("fp32 CPU linears without packed copies: %d MiB would not fit in a quarter of the free "
                      "memory", copies >> 20)
            tables = [choose(times, tuple(k for k in kernels if k not in COPIES)) for _, _, times, kernels in members]
        for (owner, f, _, _), table in zip(members, tables):
            if table:
                linear = CpuLinear(getattr(owner, f), table)
                setattr(owner, f, linear)
                self.packed_bytes += linear.copy_bytes

    def _fuse_projections(self) -> None:
        """q/k/v and gate/up of each layer in one C call each where they run the panel kernel (CpuLinears,
        W8A16 QuantLinears: cpu_gemm.FusedLinear), or their rows quantised once (W8A8 QuantLinears:
        npukit.quant.linear.W8A8Group); o_proj and down_proj as 1-part calls; None elsewhere, and they run one by
        one through _linear."""
        from ..quant.linear import W8A8Group  # NOTE: here, as npukit.quant imports the engine's kernels

        tp = self.shard is not None  # NOTE: then o/down's bias is added after the all-reduce, not in the call
        for lw in self.layers:
            qkv = [lw.q_w, lw.k_w, lw.v_w], [lw.q_b, lw.k_b, lw.v_b]
            gate_up = [lw.gate_w, lw.up_w], [lw.gate_b, lw.up_b]
            lw.qkv = FusedLinear.of(*qkv) or W8A8Group.of(*qkv)
            lw.gate_up = FusedLinear.of(*gate_up) or W8A8Group.of(*gate_up)
            lw.o = FusedLinear.of([lw.o_w], [None if tp else lw.o_b])
            lw.down = FusedLinear.of([lw.down_w], [None if tp else lw.down_b])

    def _fields(self) -> list:
        """lm_head's and every layer's weights (tensors, CpuLinears, QuantLinears) and other fields."""
        return [self.lm_head_w] + [v for lw in self.layers for v in vars(lw).values()]

    @property
    def weight_bytes(self) -> int:
        """Bytes of the weights this runner uses (a rank's shard under tensor parallelism), tied ones once."""
        seen: dict[int, int] = {}
        tensors = [self.embed, self.final_norm]
        for v in self._fields():
            if isinstance(v, CpuLinear):  # its packed copy is counted in packed_bytes
                v = v.weight
            if isinstance(v, torch.Tensor):
                tensors.append(v)
            elif isinstance(v, torch.nn.Module):  # a QuantLinear: int8 weight + scales
                tensors.extend(v.buffers())
        for t in tensors:
            seen[t.data_ptr()] = t.numel() * t.element_size()
        return sum(seen.values())

    @staticmethod
    def _layer_weights(layer, config) -> _LayerWeights:
        attn, mlp = layer.self_attn, layer.mlp
        if config.model_type == "mistral":
            window = getattr(config, "sliding_window", None)
        else:
            window = getattr(attn, "sliding_window", None)
        # NOTE: a quantised projection (QuantLinear) stands in for its weight; its bias is kept apart, as
        # nn.Linear's is, so tensor parallelism slices it (column) or adds it once after the all-reduce (row).
        bias = lambda lin: lin.bias  # noqa: E731
        return _LayerWeights(
            input_norm=layer.input_layernorm.weight, post_norm=layer.post_attention_layernorm.weight,
            q_w=_weight(attn.q_proj), k_w=_weight(attn.k_proj), v_w=_weight(attn.v_proj), o_w=_weight(attn.o_proj),
            q_b=bias(attn.q_proj), k_b=bias(attn.k_proj), v_b=bias(attn.v_proj), o_b=bias(attn.o_proj),
            gate_w=_weight(mlp.gate_proj), up_w=_weight(mlp.up_proj), down_w=_weight(mlp.down_proj),
            gate_b=bias(mlp.gate_proj), up_b=bias(mlp.up_proj), down_b=bias(mlp.down_proj), act=mlp.act_fn,
            silu=getattr(config, "hidden_act", None) in ("silu", "swish"),
            q_norm=attn.q_norm.weight if hasattr(attn, "q_norm") else None,
            k_norm=attn.k_norm.weight if hasattr(attn, "k_norm") else None,
            sliding_window=window,
        )

    # ------------------------------------------------------------------ step inputs
    def step_entries(self, batch) -> list[StepEntry]:
        """Check a batch of (seq, num_new_tokens) and turn it into plain StepEntry data."""
        bs, entries = self.block_size, []
        for seq, n in batch:
            start = seq.num_computed_tokens
            if n < 1 or start + n > len(seq.token_ids):
                raise ValueError(
                    f"sequence {seq.request_id!r}: cannot compute {n} tokens from position {start}, it has "
                    f"{len(seq.token_ids)} tokens"
                )
            if (start + n + bs - 1) // bs > len(seq.block_table):
                raise ValueError(
                    f"sequence {seq.request_id!r}: block table has {len(seq.block_table)} blocks of {bs} tokens, "
                    f"too few for positions up to {start + n - 1}; allocate blocks before execute_model"
                )
            entries.append(StepEntry(seq.request_id, start, seq.token_ids[start:start + n], seq.block_table))
        return entries

    def prepare_inputs(self, batch) -> StepInputs:
        """Flatten a batch of (seq, num_new_tokens): decode rows first (longest context first), then prefills."""
        return self.build_inputs(self.step_entries(batch))

    def build_inputs(self, entries: list[StepEntry]) -> StepInputs:
        """The step's index tensors from plain entries (see prepare_inputs)."""
        bs = self.block_size
        decodes = sorted(((i, e, len(e.new_token_ids)) for i, e in enumerate(entries) if len(e.new_token_ids) == 1),
                         key=lambda x: -x[1].num_computed_tokens)
        prefills = [(i, e, len(e.new_token_ids)) for i, e in enumerate(entries) if len(e.new_token_ids) != 1]
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        rows: dict[int, tuple[int, int]] = {}  # entry index -> (start row, end row)
        for i, e, n in decodes + prefills:
            start = e.num_computed_tokens
            rows[i] = (len(input_ids), len(input_ids) + n)
            input_ids.extend(e.new_token_ids)
            positions.extend(range(start, start + n))
            table = e.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, start + n))

        as_long = self._as_long
        npu_table = npu_lens = None
        if self.use_npu_fused_ops and decodes:  # UNTESTED (no NPU here): one fused call over block tables
            width = max(len(s.block_table) for _, s, _ in decodes)
            npu_table = torch.tensor([s.block_table + [0] * (width - len(s.block_table)) for _, s, _ in decodes],
                                     dtype=torch.int32, device=self.device)
            npu_lens = torch.tensor([s.num_computed_tokens + 1 for _, s, _ in decodes], dtype=torch.int32)
        return StepInputs(
            input_ids=as_long(input_ids), positions=as_long(positions), slot_mapping=as_long(slots),
            decode_buckets=[] if npu_table is not None else self._decode_buckets([s for _, s, _ in decodes]),
            prefills=[self._prefill(seq, n, rows[i][0]) for i, seq, n in prefills],
            prefill_tables=self._prefill_tables(prefills, rows) if self.prefill_kernel and prefills else None,
            rows=[rows[i] for i in range(len(entries))],
            num_decodes=len(decodes), npu_block_table=npu_table, npu_context_lens=npu_lens,
        )

    def _as_long(self, xs) -> torch.Tensor:
        return torch.tensor(xs, dtype=torch.long, device=self.device)

    def _decode_buckets(self, seqs) -> list[_DecodeBucket]:
        """Decode sequences (longest context first) -> spans of similar length, one padded attention each
        (with the CPU kernel one span of them all: it reads each row's own blocks, padding costs nothing)."""
        bs, buckets = self.block_size, []
        num_blocks = [(s.num_computed_tokens + bs) // bs for s in seqs]
        if self.decode_kernel is None:
            spans = self._bucket(num_blocks, self.decode_blocks_per_call)
        else:
            spans = [(0, len(seqs))] if seqs else []
        for start, end in spans:
            group = seqs[start:end]
            max_blocks = num_blocks[start]  # NOTE: sorted, longest first
            # NOTE: padding points at block 0: read, then masked out (the cache is zero-initialised).
            ids = [b for s in group for b in (s.block_table + [0] * max_blocks)[:max_blocks]]
            ctx = self._as_long([s.num_computed_tokens + 1 for s in group])[:, None]  # [b, 1]
            if self.decode_kernel is not None:  # it reads K/V at these ids unchecked
                if ids and not 0 <= min(ids) <= max(ids) < self.num_kv_blocks:
                    raise ValueError(f"block ids must be in [0, {self.num_kv_blocks}), got {min(ids)}..{max(ids)}")
                ids = self._as_long(ids)  # NOTE: the kernel's [b, max_blocks] view made here, not in every layer
                buckets.append(_DecodeBucket(start, end, ids, max_blocks, {}, ctx[:, 0], ids.view(-1, max_blocks)))
                continue
            key_pos = torch.arange(max_blocks * bs, device=self.device)[None, :]        # [1, L]
            masks = {}
            for w in self.windows:
                mask = key_pos < ctx
                if w is not None:
                    mask &= key_pos >= ctx - w  # NOTE: HF's sliding window: key > query_pos - window
                masks[w] = self._additive(mask)[:, None, None, :]
            buckets.append(_DecodeBucket(start, end, self._as_long(ids), max_blocks, masks, ctx[:, 0]))
        return buckets

    def _prefill(self, seq, n: int, start_row: int) -> _Prefill:
        """A prefill chunk of n tokens: its context blocks (if it has earlier tokens) and causal masks (neither
        where the C kernel attends: it reads the blocks, see _prefill_tables)."""
        nc, bs = seq.num_computed_tokens, self.block_size
        if self.prefill_kernel is not None:
            return _Prefill(start_row, start_row + n, nc, None)
        ctx_len = nc + n
        ctx_blocks = self._as_long(seq.block_table[:(ctx_len + bs - 1) // bs]) if nc > 0 else None
        masks: dict[int | None, torch.Tensor | None] = {}
        q_pos = torch.arange(nc, ctx_len, device=self.device)[:, None]
        k_pos = torch.arange(ctx_len, device=self.device)[None, :]
        for w in self.windows:
            if nc == 0 and (w is None or w >= n):
                masks[w] = None  # plain causal over its own tokens: SDPA is_causal
                continue
            mask = k_pos <= q_pos
            if w is not None:
                mask &= k_pos > q_pos - w
            masks[w] = self._additive(mask)
        return _Prefill(start_row, start_row + n, nc, ctx_blocks, masks)

    def _prefill_tables(self, prefills, rows) -> _PrefillTables:
        """The prefill chunks ``(entry index, entry, n)`` as the C kernel takes them; their block ids checked, since
        it reads K/V at them unchecked."""
        bs = self.block_size
        tables = [e.block_table[:(e.num_computed_tokens + n + bs - 1) // bs] for _, e, n in prefills]
        width = max(len(t) for t in tables)
        ids = [b for t in tables for b in t + [0] * (width - len(t))]
        if not 0 <= min(ids) <= max(ids) < self.num_kv_blocks:
            raise ValueError(f"block ids must be in [0, {self.num_kv_blocks}), got {min(ids)}..{max(ids)}")
        starts, lens = [rows[i][0] for i, _, _ in prefills], [n for _, _, n in prefills]
        computed = [e.num_computed_tokens for _, e, _ in prefills]
        return _PrefillTables(self._as_long(ids).view(len(tables), width),
                              *map(self._as_long, (starts, lens, computed)))

    def _additive(self, mask: torch.Tensor) -> torch.Tensor:
        # NOTE: SDPA turns a bool mask into this on every call; built once per step it is shared by all layers.
        return torch.zeros(mask.shape, dtype=self.dtype, device=mask.device).masked_fill_(~mask, float("-inf"))

    @staticmethod
    def _bucket(num_blocks: list[int], max_blocks_per_call: int = 1 << 30, ratio: float = 0.75,
                min_size: int = 4) -> list[tuple[int, int]]:
        """Split a descending list of block counts into spans for one padded attention call each.

        A span ends when the next count drops below ``ratio`` times its first (padding stays within
        ~1/ratio, once the span has ``min_size`` members) or when the padded span would hold more than
        ``max_blocks_per_call`` blocks.
        """
        spans, start = [], 0
        for j in range(1, len(num_blocks) + 1):
            if (j == len(num_blocks) or (j - start + 1) * num_blocks[start] > max_blocks_per_call
                    or (j - start >= min_size and num_blocks[j] < ratio * num_blocks[start])):
                spans.append((start, j))
                start = j
        return spans

    # ------------------------------------------------------------------ forward
    def execute_model(self, batch, all_logits: bool = False) -> torch.Tensor | None:
        """Float32 logits of the last new token of each entry (all new tokens with all_logits=True).

        Does not mutate the sequences: the engine advances num_computed_tokens after the step.
        Under tensor parallelism only rank 0 gets logits; the other ranks get None.
        """
        if not batch:
            raise ValueError("execute_model needs at least one (seq, num_new_tokens) entry")
        return self.execute_entries(self.step_entries(batch), all_logits)

    def execute_entries(self, entries: list[StepEntry], all_logits: bool = False) -> torch.Tensor | None:
        """execute_model for plain entries (what a tensor-parallel worker receives)."""
        t = time.perf_counter()
        inputs = self.build_inputs(entries)
        self.prepare_seconds += time.perf_counter() - t  # read by LLM's per-step timing (StepTiming)
        return self.execute(inputs, all_logits)

    @torch.inference_mode()
    def execute(self, inputs: StepInputs, all_logits: bool = False) -> torch.Tensor | None:
        if all_logits:
            idx = [r for start, end in inputs.rows for r in range(start, end)]
        else:
            idx = [end - 1 for _, end in inputs.rows]
        hidden = self.forward(inputs)
        hidden = hidden[torch.tensor(idx, dtype=torch.long, device=self.device)]
        hidden = rms_norm(hidden, self.final_norm, self.eps)
        logits = _linear(hidden, self.lm_head_w).contiguous()  # rows (a CpuLinear may give a transposed view)
        if self.shard is not None:  # each rank has a vocab slice: rank 0 gathers them (None elsewhere)
            logits = self.shard.gather_last_dim(logits)
            if logits is None:
                return None
            logits = logits[:, :self.vocab_size]
        return logits.float()

    def forward(self, inp: StepInputs) -> torch.Tensor:
        """Hidden states after the last decoder layer (before the final norm), ``[T, hidden]``.

        With graph mode on (``self.graph``, npukit.engine.graph) a pure decode step runs its dense pieces as a
        compiled graph of a padded batch size; attention stays eager on the real rows either way."""
        if self.graph is not None:
            hidden = self.graph.forward(inp)
            if hidden is not None:
                return hidden
        x = self._embed(inp.input_ids)
        cos, sin = self.rotary(inp.positions)
        return self.run_layers(x, cos, sin, inp, self.qkv, self.out_mlp)

    def rotary(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE cos, sin ``[T, 1, head_dim]`` of the positions."""
        cos, sin = self.rotary_emb(self.final_norm, positions[None, :])
        return cos[0][:, None, :], sin[0][:, None, :]

    def run_layers(self, x, cos, sin, inp: StepInputs, qkv, out_mlp) -> torch.Tensor:
        """The decoder layers: ``qkv`` and ``out_mlp`` (dense, per row: eager or a compiled graph) around the
        KV write and paged attention, which run eagerly on the step's real rows (the first ``len(input_ids)``;
        rows past them are graph padding and never reach the KV cache)."""
        n = inp.input_ids.shape[0]
        for layer_idx, lw in enumerate(self.layers):
            q, k, v = qkv(layer_idx, x, cos, sin)
            if q.shape[0] != n:
                q, k, v = q[:n], k[:n], v[:n]
            self._write_kv(layer_idx, k, v, inp.slot_mapping)
            attn = self._attention(layer_idx, lw.sliding_window, q, k, v, inp)
            if attn.shape[0] != x.shape[0]:
                attn = F.pad(attn, (0, 0, 0, x.shape[0] - n))
            x = out_mlp(layer_idx, x, attn)
        return x

    def qkv(self, layer_idx: int, x, cos, sin):
        """Eager q, k, v of one layer (see qkv_piece)."""
        return qkv_piece(self.layers[layer_idx], x, cos, sin, self.eps, self.num_heads, self.num_kv_heads,
                         self.head_dim)

    def out_mlp(self, layer_idx: int, x, attn):
        """Eager o_proj + MLP of one layer (see out_mlp_piece); all-reduced under tensor parallelism."""
        reduce = None if self.shard is None else self.shard.all_reduce
        return out_mlp_piece(self.layers[layer_idx], x, attn, self.eps, reduce)

    def _write_kv(self, layer_idx: int, k, v, slot_mapping) -> None:
        if self.use_npu_fused_ops:  # UNTESTED: the KV write vLLM-Ascend uses (int32 slots, positional args)
            import torch_npu

            kc, vc = self.kv_cache.k_caches[layer_idx], self.kv_cache.v_caches[layer_idx]
            torch_npu._npu_reshape_and_cache(k.contiguous(), v.contiguous(), kc, vc, slot_mapping.int())
        else:
            self.kv_cache.write(layer_idx, k, v, slot_mapping)

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        if self.shard is None:
            return F.embedding(ids, self.embed)
        # NOTE: a vocab shard: ids outside it look up row 0 and are zeroed; the all-reduce adds the shards.
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.embed.shape[0])
        x = F.embedding(local.masked_fill(outside, 0), self.embed)
        x.masked_fill_(outside[:, None], 0)
        self.shard.all_reduce(x)
        return x

    def _attention(self, layer_idx: int, window: int | None, q, k, v, inp: StepInputs) -> torch.Tensor:
        """Attention output ``[T, num_heads * head_dim]`` for all rows of the step."""
        num_tokens = q.shape[0]
        out = q.new_empty(num_tokens, self.num_heads, self.head_dim)
        groups = self.num_heads // self.num_kv_heads
        if inp.npu_block_table is not None:  # UNTESTED: fused paged decode attention on Ascend
            import torch_npu

            nd = inp.num_decodes
            torch_npu._npu_paged_attention(
                query=q[:nd].contiguous(), key_cache=self.kv_cache.k_caches[layer_idx],
                value_cache=self.kv_cache.v_caches[layer_idx], num_kv_heads=self.num_kv_heads,
                num_heads=self.num_heads, scale_value=self.scaling, block_table=inp.npu_block_table,
                context_lens=inp.npu_context_lens, out=out[:nd])
        for d in inp.decode_buckets:
            nd = d.end - d.start
            if self.decode_kernel is not None:
                whole = nd == num_tokens  # NOTE: a pure decode step (one bucket here): no slices to make
                cpu_attention.paged_decode_attention(
                    self.decode_kernel, (q if whole else q[d.start:d.end]).contiguous(),
                    self.kv_cache.k_caches[layer_idx], self.kv_cache.v_caches[layer_idx], d.block_tables, d.ctx_lens,
                    window, self.scaling, out if whole else out[d.start:d.end])
                continue
            # One query per sequence: fold the query heads of a KV group into SDPA's "query length" so
            # K/V are never repeated: q [b, kv_heads, group, D] against K/V [b, kv_heads, L, D].
            kk, vv = self.kv_cache.gather_blocks(layer_idx, d.block_ids, nd)
            qd = q[d.start:d.end].view(nd, self.num_kv_heads, groups, self.head_dim)
            o = F.scaled_dot_product_attention(qd, kk.transpose(1, 2), vv.transpose(1, 2),
                                               attn_mask=d.masks[window], scale=self.scaling)
            out[d.start:d.end] = o.reshape(nd, self.num_heads, self.head_dim)
        if inp.prefill_tables is not None:
            t = inp.prefill_tables
            cpu_attention.paged_prefill_attention(
                self.prefill_kernel, q, self.kv_cache.k_caches[layer_idx], self.kv_cache.v_caches[layer_idx],
                t.block_tables, t.starts, t.lens, t.computed, window, self.scaling, out)
        else:
            self._sdpa_prefills(layer_idx, window, q, k, v, inp.prefills, out)
        return out.view(num_tokens, self.num_heads * self.head_dim)

    def _sdpa_prefills(self, layer_idx: int, window: int | None, q, k, v, prefills: list[_Prefill], out) -> None:
        """Prefill attention without the C kernel: SDPA per chunk, over its gathered blocks after the first."""
        for p in prefills:
            qp = q[p.start:p.end].transpose(0, 1)[None]  # [1, H, n, D]
            if p.ctx_blocks is None:
                kp, vp = k[p.start:p.end], v[p.start:p.end]
            else:
                kp, vp = self.kv_cache.gather_blocks(layer_idx, p.ctx_blocks, 1)
                kp, vp = kp[0, :p.end - p.start + p.num_computed], vp[0, :p.end - p.start + p.num_computed]
            mask = p.masks[window]
            o = F.scaled_dot_product_attention(
                qp, kp.transpose(0, 1)[None], vp.transpose(0, 1)[None], attn_mask=mask,
                is_causal=mask is None, scale=self.scaling, enable_gqa=self.num_heads > self.num_kv_heads)
            out[p.start:p.end] = o[0].transpose(0, 1)

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy-on-write: copy each (src, dst) block's K/V in every layer."""
        for s, d in pairs:
            if not (0 <= s < self.num_kv_blocks and 0 <= d < self.num_kv_blocks):
                raise ValueError(f"block ids must be in [0, {self.num_kv_blocks}), got ({s}, {d})")
        self.kv_cache.copy_blocks(pairs)
