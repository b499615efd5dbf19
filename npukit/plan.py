"""Will it fit? The memory bill of a model on a device, for every tensor-parallel size, before any download.

    p = npukit.plan("Qwen/Qwen3-32B", device="300I-Duo", dtype="float16")
    print(p)                     # weights, KV bytes per token, per-TP table, smallest TP that fits
    p.min_tensor_parallel_size   # 2
    p.serve_command              # the `vllm serve` line it implies

`npukit plan MODEL` on the command line prints the same (``--json`` for a JSON object). MODEL is a local
folder or ``config.json``, an embedded model, a hub id already in the local cache, or a name from
`CATALOGUE` (shapes of popular models, with their sources). Only ``config.json`` is read.

The bill per device, the way vLLM sizes its KV cache (``gpu_memory_utilization`` of the whole memory,
minus the weights, minus the peak activations of a profile run, minus non-torch memory; the rest is KV):

    memory x gpu_memory_utilization = weights / tp  +  activations  +  workspace  +  KV cache
                                      (exact)          (estimate)      (estimate)    (what is left)

Exact, to the byte, given config and dtype: weight bytes (per device, from `npukit.parallel.sharding`'s
table) and KV bytes per token. Estimates: activations (``max_num_batched_tokens`` rows through the widest
layer, plus the logits of ``max_num_seqs`` sequences) and the runtime's own workspace. A plan *fits* when
at least one sequence of ``max_model_len`` tokens fits the KV cache (vLLM refuses to start otherwise).
NOTE: this module imports only the standard library at import time (``npukit --help`` stays instant).
"""
from __future__ import annotations

import html
import json
import math
import shlex
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .parallel import sharding as sh

GiB = 1024 ** 3
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
_DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}
QUANTIZATIONS = ("w8a8", "w8a16")
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "glm")
VLLM_DEFAULTS = {"gpu_memory_utilization": 0.9, "max_num_seqs": 256, "max_num_batched_tokens": 2048}
ASCEND_BLOCK_SIZE = 128  # vLLM-Ascend's default --block-size; vLLM's is 16


class PlanError(ValueError):
    """A model config or an option npukit plan cannot use; the message names the field and what to do."""


# ------------------------------------------------------------------------------------------ devices
@dataclass(frozen=True)
class DeviceSpec:
    name: str
    kind: str             # "npu" | "cuda" | "cpu"
    memory_bytes: int     # per device (per chip for multi-chip cards)
    reported: bool        # True: what the runtime reports (torch.npu / torch.cuda total); False: nominal spec
    source: str
    bf16: bool = True
    eager_only: bool = False  # vLLM-Ascend needs --enforce-eager (no graph mode)
    # Non-torch memory per device (runtime context, communication buffers, allocator slack).
    # NOTE: an estimate, not measured by npukit; vLLM measures it in its profile run.
    workspace_bytes: int = GiB


def _gib(x: float) -> int:
    return int(round(x * GiB))


def _gb(x: float) -> int:
    return int(x * 10 ** 9)


# Memory per device. "reported" numbers come from the runtime's own OOM messages ("NPU 0; 43.24 GiB total
# capacity"), which is what torch_npu / torch.cuda can hand out; nominal ones are the datasheet's HBM / DRAM
# size (the runtime reports a few GiB less: e.g. 60.97 GiB of a 64 GB 910B).
DEVICES: dict[str, DeviceSpec] = {d.name: d for d in [
    DeviceSpec("300I-Duo", "npu", _gib(43.24), True,
               "seed 004 (Atlas 300I Duo, Ascend 310P): 'NPU 0; 43.24 GiB total capacity' per chip; the card has "
               "2 chips, 96 GB LPDDR4X (nominal)", bf16=False, eager_only=True),
    *[DeviceSpec(f"910B{i}", "npu", _gib(60.97), True,
                 "vllm-project/vllm-ascend issues #19 and #1987: '60.97 GiB total capacity' on a 64 GB 910B "
                 "(Atlas 800T A2); 910B1-B3 have 64 GB HBM (nominal)") for i in (1, 2, 3)],
    DeviceSpec("910B4", "npu", _gb(32), False, "Atlas 800I A2 with 910B4: 32 GB HBM (nominal)"),
    DeviceSpec("A3", "npu", _gib(61.27), True,
               "sgl-project/sglang issue #29838: '61.27 GiB total capacity' per NPU (die) on Atlas A3; "
               "64 GB HBM per die (nominal)"),
    DeviceSpec("910A", "npu", _gb(32), False, "Ascend 910 (910A): 32 GB HBM (nominal); no bf16, eager only",
               bf16=False, eager_only=True),
    DeviceSpec("A100-40GB", "cuda", _gb(40), False, "NVIDIA A100 40 GB (nominal)"),
    DeviceSpec("A100-80GB", "cuda", _gb(80), False, "NVIDIA A100 80 GB (nominal)"),
    DeviceSpec("H100-80GB", "cuda", _gb(80), False, "NVIDIA H100 80 GB (nominal)"),
    DeviceSpec("H200", "cuda", _gb(141), False, "NVIDIA H200 141 GB (nominal)"),
    DeviceSpec("L40S", "cuda", _gb(48), False, "NVIDIA L40S 48 GB (nominal)"),
    DeviceSpec("RTX4090", "cuda", _gb(24), False, "NVIDIA GeForce RTX 4090 24 GB (nominal)"),
    DeviceSpec("T4", "cuda", _gb(16), False, "NVIDIA T4 16 GB (nominal); no bf16", bf16=False),
]}
_DEVICE_ALIASES = {"310P": "300I-Duo", "300IDUO": "300I-Duo", "ATLAS300IDUO": "300I-Duo", "910B": "910B3",
                   "910_93": "A3", "910C": "A3", "A100": "A100-80GB", "H100": "H100-80GB", "4090": "RTX4090"}


def device_spec(device: str | DeviceSpec = "auto", *, memory_gib: float | None = None) -> DeviceSpec:
    """A DeviceSpec from the table, or measured: 'auto' / 'npu' / 'cuda' / 'cpu' / 'npu:1' ask the runtime
    for the device's total memory ('auto' with no NPU / GPU here plans for a 910B3)."""
    if isinstance(device, DeviceSpec):
        spec = device
    else:
        key = str(device).upper().replace(" ", "").replace("ATLAS", "").removeprefix("ASCEND")
        table = {k.upper(): k for k in DEVICES}
        name = table.get(key) or _DEVICE_ALIASES.get(key) or _DEVICE_ALIASES.get(key.replace("-", ""))
        if name:
            spec = DEVICES[name]
        elif str(device).split(":")[0] in ("auto", "npu", "cuda", "cpu"):
            spec = _measured(str(device))
        else:
            raise PlanError(f"unknown device {device!r}: use one of {', '.join(DEVICES)}, or 'npu' / 'cuda' / "
                            "'cpu' / 'auto' to measure the device here (or pass memory_gib=)")
    if memory_gib is not None:
        spec = DeviceSpec(spec.name, spec.kind, _gib(memory_gib), False, f"given: {memory_gib:g} GiB",
                          spec.bf16, spec.eager_only, spec.workspace_bytes)
    return spec


def _measured(device: str) -> DeviceSpec:
    from . import device as device_mod

    kind = device.split(":")[0]
    if kind == "auto":
        kind = device_mod.detect()
        if kind not in ("npu", "cuda"):
            return DEVICES["910B3"]
        device = kind
    stats = device_mod.memory_stats(device)
    name = device_mod.device_name(device)
    no_bf16 = kind == "npu" and any(s in name for s in ("310P", "910A"))
    return DeviceSpec(f"{device} ({name})", kind, stats.total, True, "measured here: the runtime's total memory",
                      bf16=not no_bf16, eager_only=no_bf16, workspace_bytes=0 if kind == "cpu" else GiB)


# ------------------------------------------------------------------------------------------ catalogue
def _qwen2(h, layers, heads, kv, inter, vocab, tie, ctx=32768):
    return dict(model_type="qwen2", hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=kv, intermediate_size=inter, vocab_size=vocab, tie_word_embeddings=tie,
                max_position_embeddings=ctx, torch_dtype="bfloat16")


def _qwen3(h, layers, heads, inter, tie, kv=8, **moe):
    return dict(model_type="qwen3_moe" if moe else "qwen3", hidden_size=h, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv, head_dim=128, intermediate_size=inter,
                vocab_size=151936, tie_word_embeddings=tie, max_position_embeddings=40960,
                torch_dtype="bfloat16", **moe)


def _llama(h, layers, heads, inter):
    return dict(model_type="llama", hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=8, intermediate_size=inter, vocab_size=128256, tie_word_embeddings=False,
                max_position_embeddings=131072, torch_dtype="bfloat16")


# Shapes only (the fields npukit plan reads), copied from each repo's config.json on huggingface.co:
# https://huggingface.co/<hub id>/blob/main/config.json
CATALOGUE: dict[str, dict[str, Any]] = {
    "Qwen/Qwen2.5-0.5B-Instruct": _qwen2(896, 24, 14, 2, 4864, 151936, True),
    "Qwen/Qwen2.5-1.5B-Instruct": _qwen2(1536, 28, 12, 2, 8960, 151936, True),
    "Qwen/Qwen2.5-3B-Instruct": _qwen2(2048, 36, 16, 2, 11008, 151936, True),
    "Qwen/Qwen2.5-7B-Instruct": _qwen2(3584, 28, 28, 4, 18944, 152064, False),
    "Qwen/Qwen2.5-14B-Instruct": _qwen2(5120, 48, 40, 8, 13824, 152064, False),
    "Qwen/Qwen2.5-32B-Instruct": _qwen2(5120, 64, 40, 8, 27648, 152064, False),
    "Qwen/Qwen2.5-72B-Instruct": _qwen2(8192, 80, 64, 8, 29568, 152064, False),
    "Qwen/Qwen3-0.6B": _qwen3(1024, 28, 16, 3072, True),
    "Qwen/Qwen3-1.7B": _qwen3(2048, 28, 16, 6144, True),
    "Qwen/Qwen3-4B": _qwen3(2560, 36, 32, 9728, True),
    "Qwen/Qwen3-8B": _qwen3(4096, 36, 32, 12288, False),
    "Qwen/Qwen3-14B": _qwen3(5120, 40, 40, 17408, False),
    "Qwen/Qwen3-32B": _qwen3(5120, 64, 64, 25600, False),
    "Qwen/Qwen3-30B-A3B": _qwen3(2048, 48, 32, 6144, False, kv=4, num_experts=128, num_experts_per_tok=8,
                                 moe_intermediate_size=768, decoder_sparse_step=1, mlp_only_layers=[]),
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B": _qwen2(1536, 28, 12, 2, 8960, 151936, False, ctx=131072),
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B": _qwen2(3584, 28, 28, 4, 18944, 152064, False, ctx=131072),
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-14B": _qwen2(5120, 48, 40, 8, 13824, 152064, False, ctx=131072),
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B": _qwen2(5120, 64, 40, 8, 27648, 152064, False, ctx=131072),
    "meta-llama/Llama-3.1-8B-Instruct": _llama(4096, 32, 32, 14336),
    "meta-llama/Llama-3.1-70B-Instruct": _llama(8192, 80, 64, 28672),
    "THUDM/glm-4-9b-chat-hf": dict(model_type="glm", hidden_size=4096, num_hidden_layers=40, num_attention_heads=32,
                                   num_key_value_heads=2, head_dim=128, intermediate_size=13696, vocab_size=151552,
                                   tie_word_embeddings=False, attention_bias=True, max_position_embeddings=131072,
                                   torch_dtype="bfloat16"),
}


def _catalogue_key(name: str) -> str | None:
    def norm(s: str) -> str:
        return s.lower().removesuffix("-instruct")
    want = norm(name)
    for key in CATALOGUE:
        if want in (norm(key), norm(key.split("/")[-1])):
            return key
    return None


def load_config(model: str | Path | dict) -> tuple[dict[str, Any], str, str]:
    """(config dict, where it came from, the name vLLM would load) for a folder, config.json, embedded
    model, cached hub id or catalogue name. Never downloads."""
    if isinstance(model, dict):
        return dict(model), "given dict", str(model.get("_name_or_path", "MODEL"))
    name = str(model)
    path = Path(name).expanduser()
    if path.is_file():
        return _read_json(path), f"file:{path}", str(path.parent)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise PlanError(f"{path} has no config.json: point npukit plan at a model folder or a config.json")
        return _read_json(path / "config.json"), f"local:{path}", str(path)
    from .samples import EMBEDDED, sample_path

    if name in EMBEDDED:
        folder = sample_path(name)
        return _read_json(folder / "config.json"), f"embedded:{name}", str(folder)
    key = _catalogue_key(name)
    if name.count("/") == 1 and not name.startswith((".", "/", "~")):
        try:
            from .hub import cached_path

            folder = cached_path(name, allow_patterns="config.json")
        except Exception:  # huggingface_hub missing or a broken cache: fall back to the catalogue
            folder = None
        if folder is not None and (folder / "config.json").is_file():
            return _read_json(folder / "config.json"), f"cached:{name}", name
    if key is not None:
        return dict(CATALOGUE[key]), f"catalogue: https://huggingface.co/{key}/blob/main/config.json", key
    raise PlanError(f"cannot find a config for {name!r}: not a folder or config.json, not an embedded model, "
                    f"not in the local hub cache (download it: npukit download {name} --include config.json), "
                    f"and not in the catalogue ({', '.join(CATALOGUE)})")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise PlanError(f"cannot read {path}: {e}") from e


# ------------------------------------------------------------------------------------------ shapes
@dataclass(frozen=True)
class Shapes:
    """What the bill needs from config.json."""

    model_type: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int   # of the tensor-parallel split (MoE: moe_intermediate_size)
    vocab_size: int
    tie_word_embeddings: bool
    max_position_embeddings: int
    dtype: str
    num_experts: int = 0     # MoE layers (0: dense)
    num_experts_per_tok: int = 0
    num_moe_layers: int = 0


def shapes_of(config: dict[str, Any]) -> Shapes:
    """Read and check the fields; a missing or bad one raises PlanError naming it."""
    mt = config.get("model_type")
    if mt not in SUPPORTED_MODEL_TYPES:
        arch = config.get("architectures")
        raise PlanError(f"model_type {mt!r} (architectures {arch}) is not one npukit plan knows: supported are "
                        f"{', '.join(SUPPORTED_MODEL_TYPES)}")

    def need(key: str, default: Any = None) -> int:
        value = config.get(key, default)
        if value is None:
            raise PlanError(f"config.json of this {mt} model has no {key!r}: npukit plan needs it")
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise PlanError(f"config field {key!r} must be a positive integer, got {value!r}")
        return value

    hidden, heads = need("hidden_size"), need("num_attention_heads")
    head_dim = config.get("head_dim") or hidden // heads
    moe = mt == "qwen3_moe"
    layers = need("num_hidden_layers")
    num_moe = 0
    if moe:
        step, dense = need("decoder_sparse_step", 1), set(config.get("mlp_only_layers") or [])
        num_moe = sum(1 for i in range(layers) if i not in dense and (i + 1) % step == 0)
    dtype = str(config.get("torch_dtype") or config.get("dtype") or "bfloat16").removeprefix("torch.")
    return Shapes(
        model_type=mt, hidden_size=hidden, num_layers=layers, num_heads=heads,
        num_kv_heads=need("num_key_value_heads", heads), head_dim=need("head_dim", head_dim),
        intermediate_size=need("moe_intermediate_size") if moe else need("intermediate_size"),
        vocab_size=need("vocab_size"), tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        max_position_embeddings=need("max_position_embeddings", 4096), dtype=dtype,
        num_experts=need("num_experts") if moe else 0,
        num_experts_per_tok=need("num_experts_per_tok") if moe else 0, num_moe_layers=num_moe)


@dataclass(frozen=True)
class _Tensor:
    name: str          # a key of sharding.SPLITS, or a description of a replicated tensor
    split: str
    out_features: int
    in_features: int
    count: int         # how many of these in the model
    linear: bool       # a weight that int8 quantization converts


def tensors_of(s: Shapes, config: dict[str, Any] | None = None) -> list[_Tensor]:
    """Every parameter tensor of the model, with how tensor parallelism splits it."""
    config = config or {}
    L, h, hd, inter = s.num_layers, s.hidden_size, s.head_dim, s.intermediate_size
    q, kv = s.num_heads * hd, s.num_kv_heads * hd
    t = [_Tensor("embed_tokens", sh.VOCAB, s.vocab_size, h, 1, False),
         _Tensor("norm", sh.REPLICATED, h, 1, 2 * L + 1, False)]
    if not s.tie_word_embeddings:
        t.append(_Tensor("lm_head", sh.VOCAB, s.vocab_size, h, 1, False))
    t += [_Tensor("q_proj", sh.COLUMN, q, h, L, True), _Tensor("k_proj", sh.KV_COLUMN, kv, h, L, True),
          _Tensor("v_proj", sh.KV_COLUMN, kv, h, L, True), _Tensor("o_proj", sh.ROW, h, q, L, True)]
    mt = s.model_type
    qkv_bias = mt == "qwen2" or bool(config.get("attention_bias", mt == "glm"))
    o_bias = mt != "glm" and mt != "qwen2" and bool(config.get("attention_bias", False))
    if qkv_bias:
        t += [_Tensor("q_proj.bias", sh.COLUMN, q, 1, L, False),
              _Tensor("k_proj.bias", sh.KV_COLUMN, kv, 1, L, False),
              _Tensor("v_proj.bias", sh.KV_COLUMN, kv, 1, L, False)]
    if o_bias:
        t.append(_Tensor("o_proj.bias", sh.REPLICATED, h, 1, L, False))
    if mt in ("qwen3", "qwen3_moe"):
        t.append(_Tensor("q_norm/k_norm", sh.REPLICATED, hd, 1, 2 * L, False))
    dense = L - s.num_moe_layers
    n_mlp = [(dense, 1)] + ([(s.num_moe_layers, s.num_experts)] if s.num_moe_layers else [])
    dense_inter = config.get("intermediate_size", inter) if s.num_moe_layers else inter
    for layers, experts in n_mlp:
        if not layers:
            continue
        inter = inter if experts > 1 else dense_inter
        t += [_Tensor("gate_proj", sh.COLUMN, inter, h, layers * experts, True),
              _Tensor("up_proj", sh.COLUMN, inter, h, layers * experts, True),
              _Tensor("down_proj", sh.ROW, h, inter, layers * experts, True)]
        if experts > 1:
            t.append(_Tensor("router", sh.REPLICATED, s.num_experts, h, layers, False))
    if mt == "llama" and config.get("mlp_bias"):
        t += [_Tensor("gate_proj.bias", sh.COLUMN, inter, 1, L, False),
              _Tensor("up_proj.bias", sh.COLUMN, inter, 1, L, False),
              _Tensor("down_proj.bias", sh.REPLICATED, h, 1, L, False)]
    return t


def weight_bytes(tensors: list[_Tensor], s: Shapes, tp: int, itemsize: int, quantization: str | None) -> int:
    """Bytes of one device's weights at this tensor-parallel size (tp=1: the whole model)."""
    total = 0
    for t in tensors:
        n = sh.shard_numel(t.split, t.out_features, t.in_features, tp, head_dim=s.head_dim,
                           num_kv_heads=s.num_kv_heads)
        if quantization and t.linear:
            out_channels = n // (t.in_features if t.split != sh.ROW else t.in_features // tp)
            total += t.count * (n + out_channels * itemsize)  # int8 weight + one scale per output channel
        else:
            total += t.count * n * itemsize
    return total


# ------------------------------------------------------------------------------------------ the plan
@dataclass
class TPPlan:
    tensor_parallel_size: int
    weight_bytes_per_device: int
    kv_bytes_per_token_per_device: int
    activation_bytes_per_device: int
    kv_cache_bytes_per_device: int
    kv_blocks_per_device: int
    kv_tokens_per_device: int
    max_num_seqs_at_max_model_len: int
    fits: bool
    reason: str


@dataclass
class Plan:
    model: str
    config_source: str
    model_type: str
    dtype: str
    quantization: str | None
    device: DeviceSpec
    num_parameters: int
    weight_bytes: int
    kv_bytes_per_token: int
    workspace_bytes_per_device: int
    max_model_len: int
    max_num_seqs: int
    max_num_batched_tokens: int
    gpu_memory_utilization: float
    block_size: int
    plans: list[TPPlan]
    min_tensor_parallel_size: int | None
    notes: list[str] = field(default_factory=list)

    def plan_for(self, tensor_parallel_size: int) -> TPPlan:
        for p in self.plans:
            if p.tensor_parallel_size == tensor_parallel_size:
                return p
        raise KeyError(f"tensor_parallel_size={tensor_parallel_size} is not valid for this model; valid: "
                       f"{[p.tensor_parallel_size for p in self.plans]}")

    @property
    def serve_args(self) -> list[str]:
        tp = self.min_tensor_parallel_size or self.plans[-1].tensor_parallel_size
        args = ["vllm", "serve", self.model, "--tensor-parallel-size", str(tp), "--dtype", self.dtype,
                "--max-model-len", str(self.max_model_len), "--max-num-seqs", str(self.max_num_seqs),
                "--gpu-memory-utilization", f"{self.gpu_memory_utilization:g}", "--block-size", str(self.block_size)]
        if self.device.eager_only:
            args.append("--enforce-eager")
        if self.quantization and self.device.kind == "npu":
            args += ["--quantization", "ascend"]
        return args

    @property
    def serve_command(self) -> str:
        return " ".join(shlex.quote(a) for a in self.serve_args)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["device"] = asdict(self.device)
        d["serve_command"] = self.serve_command
        return d

    def rows(self) -> list[tuple[str, ...]]:
        head = ("TP", "weights/dev", "KV/token/dev", "activations", "KV cache/dev", "KV tokens/dev",
                f"seqs of {self.max_model_len}", "fits")
        body = [(str(p.tensor_parallel_size), _size(p.weight_bytes_per_device),
                 f"{p.kv_bytes_per_token_per_device / 1024:.1f} KiB", _size(p.activation_bytes_per_device),
                 _size(p.kv_cache_bytes_per_device), f"{p.kv_tokens_per_device:,}",
                 str(p.max_num_seqs_at_max_model_len), "yes" if p.fits else "no: " + p.reason)
                for p in self.plans]
        return [head, *body]

    def summary(self) -> list[str]:
        d = self.device
        budget = d.memory_bytes * self.gpu_memory_utilization
        lines = [
            f"model      {self.model} ({self.model_type}; config from {self.config_source})",
            f"device     {d.name}: {_size(d.memory_bytes)} per device "
            f"({'runtime-reported' if d.reported else 'nominal'}; {d.source})",
            f"budget     {self.gpu_memory_utilization:g} x memory = {_size(budget)} per device "
            f"(--gpu-memory-utilization), of which {_size(self.workspace_bytes_per_device)} runtime workspace "
            "(estimate)",
            f"weights    {_count(self.num_parameters)} parameters, {self.weight_bytes:,} bytes "
            f"({_size(self.weight_bytes)}) in {self.dtype}"
            + (f" with {self.quantization}" if self.quantization else ""),
            f"KV cache   {self.kv_bytes_per_token:,} bytes per token ({self.kv_bytes_per_token / 1024:.1f} KiB); "
            f"max_model_len {self.max_model_len:,} = {_size(self.kv_bytes_per_token * self.max_model_len)} "
            "per sequence",
        ]
        if self.min_tensor_parallel_size:
            lines.append(f"smallest tensor-parallel size that fits: {self.min_tensor_parallel_size}")
        else:
            lines.append("no tensor-parallel size fits: quantize, lower --max-model-len, use a bigger device, "
                         "pipeline parallelism or a smaller model")
        return lines

    def __str__(self) -> str:
        rows = self.rows()
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        table = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        return "\n".join(self.summary() + [""] + table + [""] + [f"note: {n}" for n in self.notes]
                         + ["", self.serve_command])

    def _repr_html_(self) -> str:
        esc = html.escape
        rows = self.rows()
        head = "".join(f"<th>{esc(c)}</th>" for c in rows[0])
        body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows[1:])
        notes = "".join(f"<li>{esc(n)}</li>" for n in self.notes)
        return (f"<pre>{esc(chr(10).join(self.summary()))}</pre><table><tr>{head}</tr>{body}</table>"
                f"<ul>{notes}</ul><pre>{esc(self.serve_command)}</pre>")


def _size(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if abs(n) >= GiB / 10 else f"{n / 2**20:.1f} MiB"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def _norm_dtype(dtype: str) -> str:
    d = str(dtype).lower().removeprefix("torch.")
    d = _DTYPE_ALIASES.get(d, d)
    if d != "auto" and d not in DTYPE_BYTES:
        raise PlanError(f"dtype must be auto, float32, float16 or bfloat16, got {dtype!r}")
    return d


def activation_bytes(s: Shapes, tp: int, itemsize: int, max_num_batched_tokens: int, max_num_seqs: int) -> int:
    """Estimate of the peak activations of one step on one device: ``max_num_batched_tokens`` rows of the
    residual stream, the normed input and a projection output (3 x hidden), this rank's q/k/v and attention
    output, and its gate and up halves of the MLP; plus the logits of ``max_num_seqs`` sequences in the model
    dtype and twice in float32 (logits, then probabilities)."""
    kv_pr = sh.kv_heads_per_rank(s.num_kv_heads, tp)
    inter = s.intermediate_size // tp * max(1, s.num_experts_per_tok)
    width = 3 * s.hidden_size + (2 * s.num_heads // tp + 2 * kv_pr) * s.head_dim + 2 * inter
    logits = min(max_num_seqs, max_num_batched_tokens) * s.vocab_size * (itemsize + 8)
    return max_num_batched_tokens * width * itemsize + logits


def _plan_dtype(dtype: str, s, dev, quantization: str | None, notes: list[str]) -> str:
    """The dtype to plan in ("auto": the checkpoint's, float16 where the device has no bf16)."""
    dtype = _norm_dtype(dtype)
    if dtype == "auto":
        dtype = s.dtype if s.dtype in DTYPE_BYTES else "bfloat16"
        if dtype == "bfloat16" and not dev.bf16:
            dtype = "float16"
            notes.append(f"{dev.name} has no bfloat16: planned in float16 (--dtype float16).")
    elif dtype == "bfloat16" and not dev.bf16:
        raise PlanError(f"{dev.name} has no bfloat16: use dtype='float16' (vLLM-Ascend on 300I Duo: "
                        "--dtype float16 --enforce-eager)")
    if quantization is not None and quantization not in QUANTIZATIONS:
        raise PlanError(f"quantization must be one of {', '.join(QUANTIZATIONS)} (or None), got {quantization!r}")
    if quantization:
        notes.append(f"{quantization}: linear weights int8 + one {dtype} scale per output channel; embeddings, "
                     "lm_head, norms, biases and the KV cache stay in " + dtype + " (an estimate of a quantized "
                     "checkpoint: vLLM-Ascend loads msModelSlim ones with --quantization ascend).")
    return dtype


def _tp_plan(tp: int, tensors, s, itemsize: int, quantization: str | None, dev, util: float,
             max_num_batched_tokens: int, max_num_seqs: int, max_model_len: int, block_size: int) -> TPPlan:
    """One tensor-parallel size: bytes per device, the KV blocks left, and whether max_model_len fits."""
    budget = int(dev.memory_bytes * util)
    blocks_per_seq = math.ceil(max_model_len / block_size)
    w = weight_bytes(tensors, s, tp, itemsize, quantization)
    kv_tok = 2 * s.num_layers * sh.kv_heads_per_rank(s.num_kv_heads, tp) * s.head_dim * itemsize
    act = activation_bytes(s, tp, itemsize, max_num_batched_tokens, max_num_seqs)
    free = budget - w - act - dev.workspace_bytes
    blocks = max(0, free // (kv_tok * block_size))
    fits, reason = blocks >= blocks_per_seq, ""
    if free <= 0:
        reason = (f"weights {_size(w)} + activations {_size(act)} + workspace {_size(dev.workspace_bytes)} "
                  f"exceed {util:g} x {_size(dev.memory_bytes)}: out of memory at start-up")
    elif not fits:
        reason = (f"KV cache holds {blocks * block_size:,} tokens < max_model_len {max_model_len:,}: "
                  "lower --max-model-len or raise the tensor-parallel size")
    return TPPlan(tp, w, kv_tok, act, blocks * kv_tok * block_size, blocks, blocks * block_size,
                  blocks // blocks_per_seq, fits, reason)


def plan(model: str | Path | dict = "Qwen/Qwen3-8B", *, device: str | DeviceSpec = "auto", dtype: str = "auto",
         quantization: str | None = None, max_model_len: int | None = None, max_num_seqs: int | None = None,
         max_num_batched_tokens: int | None = None, gpu_memory_utilization: float | None = None,
         block_size: int | None = None, memory_gib: float | None = None, max_tensor_parallel_size: int = 64) -> Plan:
    """The memory bill of ``model`` on ``device`` for every valid tensor-parallel size (see the module doc).

    Options carry vLLM's names and defaults (``gpu_memory_utilization`` 0.9, ``max_num_seqs`` 256,
    ``max_num_batched_tokens`` 2048, ``block_size`` 128 on Ascend and 16 elsewhere, ``max_model_len``
    the model's context). ``quantization``: "w8a8" / "w8a16" estimate int8 linear weights with one scale
    per output channel in the model dtype; embeddings, lm_head, norms and biases stay in the model dtype.
    """
    config, source, vllm_model = load_config(model)
    s = shapes_of(config)
    dev = device_spec(device, memory_gib=memory_gib)
    notes: list[str] = []
    if device == "auto" and dev.name in DEVICES:
        notes.append(f"no NPU or GPU here: planned for a {dev.name}; choose with --device ({', '.join(DEVICES)}).")
    dtype = _plan_dtype(dtype, s, dev, quantization, notes)
    itemsize = DTYPE_BYTES[dtype]
    max_model_len = max_model_len or s.max_position_embeddings
    max_num_seqs = max_num_seqs or VLLM_DEFAULTS["max_num_seqs"]
    max_num_batched_tokens = max_num_batched_tokens or VLLM_DEFAULTS["max_num_batched_tokens"]
    util = VLLM_DEFAULTS["gpu_memory_utilization"] if gpu_memory_utilization is None else gpu_memory_utilization
    if not 0 < util <= 1:
        raise PlanError(f"gpu_memory_utilization must be in (0, 1], got {util!r}")
    block_size = block_size or (ASCEND_BLOCK_SIZE if dev.kind == "npu" else 16)
    for name, v in (("max_model_len", max_model_len), ("max_num_seqs", max_num_seqs),
                    ("max_num_batched_tokens", max_num_batched_tokens), ("block_size", block_size)):
        if not isinstance(v, int) or v <= 0:
            raise PlanError(f"{name} must be a positive int, got {v!r}")
    if max_model_len > s.max_position_embeddings:
        notes.append(f"max_model_len {max_model_len} is above the model's max_position_embeddings "
                     f"{s.max_position_embeddings}: vLLM refuses it unless told otherwise.")

    tensors = tensors_of(s, config)
    plans = [_tp_plan(tp, tensors, s, itemsize, quantization, dev, util, max_num_batched_tokens, max_num_seqs,
                      max_model_len, block_size)
             for tp in sh.valid_tp_sizes(s.num_heads, s.num_kv_heads, s.intermediate_size,
                                         up_to=max_tensor_parallel_size)]
    min_tp = next((p.tensor_parallel_size for p in plans if p.fits), None)
    if min_tp and min_tp > 8:
        notes.append("more than 8 devices: one Ascend server has 8 NPUs (16 on A3), so this needs several nodes "
                     "(--pipeline-parallel-size across them) or quantization.")
    if s.num_kv_heads < (min_tp or 1):
        notes.append(f"only {s.num_kv_heads} KV heads: at tensor-parallel sizes above {s.num_kv_heads} each KV head is "
                     "replicated, so the KV cache per token per device stops shrinking.")
    if s.num_moe_layers:
        notes.append("MoE: experts are split by tensor parallelism like a dense MLP (no expert parallelism); "
                     "activations count the top-k experts' MLP width per token (an estimate).")
    from .graduate import EMBEDDED_HUB_IDS

    return Plan(
        model=EMBEDDED_HUB_IDS.get(str(model), vllm_model), config_source=source, model_type=s.model_type,
        dtype=dtype, quantization=quantization, device=dev,
        num_parameters=sum(t.count * t.out_features * t.in_features for t in tensors),
        weight_bytes=weight_bytes(tensors, s, 1, itemsize, quantization),
        kv_bytes_per_token=2 * s.num_layers * s.num_kv_heads * s.head_dim * itemsize,
        workspace_bytes_per_device=dev.workspace_bytes, max_model_len=max_model_len, max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens, gpu_memory_utilization=util, block_size=block_size,
        plans=plans, min_tensor_parallel_size=min_tp, notes=notes)


# ------------------------------------------------------------------------------------------ CLI
def add_plan_args(p) -> None:
    p.add_argument("model", help="model folder, config.json, embedded model, cached hub id or catalogue name "
                                 "(e.g. Qwen/Qwen3-32B; `--list` shows the catalogue)", nargs="?")
    p.add_argument("--device", default="auto",
                   help=f"one of {', '.join(DEVICES)}; or npu / cuda / cpu / auto to measure this machine's device "
                        "(auto without an NPU / GPU: 910B3)")
    p.add_argument("--memory-gib", type=float, default=None, help="override the memory per device, in GiB")
    p.add_argument("--dtype", default="auto", help="auto (the config's; float16 on 300I Duo / 910A), float32, "
                                                   "bfloat16, float16")
    p.add_argument("--quantization", choices=QUANTIZATIONS, default=None,
                   help="estimate int8 linear weights (+ a scale per output channel)")
    p.add_argument("--max-model-len", type=int, default=None, help="default: the model's max_position_embeddings")
    p.add_argument("--max-num-seqs", type=int, default=None, help="default: 256 (vLLM's)")
    p.add_argument("--max-num-batched-tokens", type=int, default=None, help="default: 2048")
    p.add_argument("--gpu-memory-utilization", type=float, default=None, help="default: 0.9 (vLLM's)")
    p.add_argument("--block-size", type=int, default=None, help="default: 128 on Ascend, 16 elsewhere")
    p.add_argument("--list", action="store_true", help="list the catalogue and the device table, then exit")
    p.add_argument("--json", action="store_true", help="print the plan as a JSON object")


def run_plan(args) -> int:
    from .args import error

    if args.list:
        print("catalogue (shapes from each repo's config.json):")
        print("\n".join(f"  {k}" for k in CATALOGUE))
        print("devices:")
        print("\n".join(f"  {d.name:<10} {_size(d.memory_bytes):>10}  {'reported' if d.reported else 'nominal '}  "
                        f"{d.source}" for d in DEVICES.values()))
        return 0
    if not args.model:
        from npukit.i18n import t

        return error(t("cli.plan_needs_model"))
    try:
        p = plan(args.model, device=args.device, dtype=args.dtype, quantization=args.quantization,
                 max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                 max_num_batched_tokens=args.max_num_batched_tokens,
                 gpu_memory_utilization=args.gpu_memory_utilization, block_size=args.block_size,
                 memory_gib=args.memory_gib)
    except (PlanError, ValueError) as e:
        return error(str(e))
    print(json.dumps(p.to_dict(), indent=2) if args.json else p)
    return 0
