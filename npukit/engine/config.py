"""EngineConfig: every setting of the engine, defined once, each with the `vllm serve` flag it mirrors.

A field's metadata holds its vLLM flag (`vllm`), a help line, and `cli=False` where the field is not a
command-line flag. Everything else reads the fields:

- `LLM(model, **engine_args)` keeps the keyword arguments that are fields (like nano-vllm's `Config`);
- `add_engine_args(parser)` / `engine_args(namespace)`: the `npukit serve`, `bench throughput` and
  `graduate` flags (`--block-size` for `block_size`, `--no-enable-prefix-caching` for booleans);
- `npukit.graduate` maps each field with a `vllm` flag one to one (`_engine_flags`; the two KV-cache sizing
  fields are translated by `_kv_cache_flags`, enforce_eager / compile_sizes by `_graph_flags`);
  list fields (compile_sizes) take comma-separated values on the command line (`--compile-sizes 1,2,4`);
- the engine dashboard shows a widget per field (`dashboards/engine.engine_widgets`: a generic one unless
  it tunes it), `bench/workload.KNOBS` records every field of a run, `bench/vllm_peer.ENGINE_FLAGS` takes
  the vLLM flags of the fields in `PEER_ENGINE_FIELDS`.

NOTE: adding a setting touches exactly: one `setting(...)` field here (default, `vllm=` flag or None, `help=`;
`cli=False` to keep it off the command line), a check in `__post_init__` if it needs one, and the engine
code that uses it. Every command line, graduate's table, the dashboard and the run records follow
(tests/test_engine_config.py checks that). Only if vLLM's flag means something different (as
kv_cache_memory_fraction) does graduate need a translation of its own.

| npukit                    | vllm serve                    |
|---------------------------|-------------------------------|
| block_size                | --block-size                  |
| num_kv_blocks             | --num-gpu-blocks-override     |
| kv_cache_memory_fraction  | --gpu-memory-utilization (*)  |
| max_num_seqs              | --max-num-seqs                |
| max_num_batched_tokens    | --max-num-batched-tokens      |
| max_model_len             | --max-model-len               |
| enable_prefix_caching     | --enable-prefix-caching       |
| enable_chunked_prefill    | --enable-chunked-prefill      |
| tensor_parallel_size      | --tensor-parallel-size        |
| quantization              | --quantization (**)           |
| enforce_eager             | --enforce-eager               |
| compile_sizes             | --compilation-config (***)    |

(**) npukit quantises the float checkpoint at load (w8a16 / w8a8); vLLM-Ascend's `--quantization ascend`
loads a checkpoint that msModelSlim already quantised (see npukit.quant).

(***) `'{"cudagraph_capture_sizes": [...]}'`: vLLM's capture sizes; vLLM-Ascend's ACL graph reads the same.

(*) not the same quantity: see the field's note.
This module is stdlib only: the CLI imports it to build its flags without loading torch.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any


def setting(default: Any, *, vllm: str | None, help: str, cli: bool = True,  # noqa: A002 - argparse's name
            vllm_alias: bool = False, choices: tuple | None = None) -> Any:
    """A field of EngineConfig: its default, the vLLM flag it mirrors (None: vLLM has none) and its help.
    vllm_alias: the CLI also accepts the vLLM flag (only where it means exactly the same).
    choices: the values a string field accepts. A list default is copied for each config."""
    metadata = {"vllm": vllm, "help": help, "cli": cli, "vllm_alias": vllm_alias, "choices": choices}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


QUANTIZATION_METHODS = ("w8a16", "w8a8")  # npukit.quant.METHODS (kept here: this module is stdlib only)
DEFAULT_COMPILE_SIZES = [1, 2, 4, 8, 16, 32, 64]  # vLLM's start ([1, 2, 4] + every 8 ...), cut at 64


@dataclass
class EngineConfig:
    block_size: int = setting(
        16, vllm="--block-size", help="tokens per KV block (vLLM: 16 on GPU, 128 on Ascend)")
    num_kv_blocks: int | None = setting(
        None, vllm="--num-gpu-blocks-override", vllm_alias=True,
        help="number of KV blocks (default: derived from --kv-cache-memory-fraction)")
    # NOTE: unlike vLLM's --gpu-memory-utilization (which covers weights + activations + KV), this
    # fraction applies to the memory left *after* the weights are loaded; on CPU to available RAM.
    kv_cache_memory_fraction: float = setting(
        0.3, vllm="--gpu-memory-utilization",
        help="share of the memory left after the weights that the KV cache may take (not vLLM's "
             "--gpu-memory-utilization, which counts weights and activations too)")
    max_num_seqs: int = setting(64, vllm="--max-num-seqs", help="most sequences running in one batch")
    max_num_batched_tokens: int = setting(
        2048, vllm="--max-num-batched-tokens", help="token budget of one engine step")
    max_model_len: int | None = setting(
        None, vllm="--max-model-len", help="longest prompt + completion (default: the model's)")
    enable_prefix_caching: bool = setting(
        True, vllm="--enable-prefix-caching", help="reuse the KV blocks of shared prompt prefixes")
    enable_chunked_prefill: bool = setting(
        True, vllm="--enable-chunked-prefill", help="split long prompts across steps")
    # NOTE: N > 1 spawns N - 1 worker processes (npukit.parallel); the heads must divide by N.
    tensor_parallel_size: int = setting(
        1, vllm="--tensor-parallel-size", vllm_alias=True,
        help="split every layer over this many processes / devices (Megatron tensor parallelism)")
    quantization: str | None = setting(
        None, vllm="--quantization", choices=QUANTIZATION_METHODS,
        help="quantise the decoder's linear layers at load: w8a16 (int8 weights) or w8a8 (int8 weights and "
             "per-token int8 activations, smoothed); vLLM-Ascend's --quantization ascend instead loads an "
             "msModelSlim-quantised checkpoint")
    # NOTE: True by default here (vLLM's default is False): the notebooks teach the eager step first, and where
    # graph mode compiles (torch.compile: CPUs in fp16) it costs seconds per size.
    enforce_eager: bool = setting(
        True, vllm="--enforce-eager",
        help="run every step eagerly; --no-enforce-eager runs pure decode steps as a compiled graph per capture "
             "size (CPU fp32 / bf16: bound kernel calls replayed; other CPU precisions: torch.compile, seconds per "
             "size; CUDA graphs on GPU)")
    compile_sizes: list[int] = setting(
        DEFAULT_COMPILE_SIZES, vllm="--compilation-config",
        help="decode batch sizes that get a graph, comma-separated (vLLM's cudagraph_capture_sizes); a batch pads "
             "up to the next size, larger ones run eager; sizes above max_num_seqs are skipped")

    def __post_init__(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(msg)

        def is_int(x) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        need(is_int(self.block_size) and self.block_size > 0,
             f"block_size must be a positive int (vLLM uses 16 on GPU, 128 on Ascend), got {self.block_size!r}")
        need(self.num_kv_blocks is None or (is_int(self.num_kv_blocks) and self.num_kv_blocks > 0),
             f"num_kv_blocks must be None (auto) or a positive int, got {self.num_kv_blocks!r}")
        fraction = self.kv_cache_memory_fraction
        need(isinstance(fraction, (int, float)) and not isinstance(fraction, bool)
             and 0.0 < self.kv_cache_memory_fraction <= 1.0,
             f"kv_cache_memory_fraction must be in (0, 1], got {self.kv_cache_memory_fraction!r}")
        need(is_int(self.max_num_seqs) and self.max_num_seqs > 0,
             f"max_num_seqs must be a positive int, got {self.max_num_seqs!r}")
        need(is_int(self.max_num_batched_tokens) and self.max_num_batched_tokens > 0,
             f"max_num_batched_tokens must be a positive int, got {self.max_num_batched_tokens!r}")
        need(self.max_model_len is None or (is_int(self.max_model_len) and self.max_model_len > 0),
             f"max_model_len must be None or a positive int, got {self.max_model_len!r}")
        need(is_int(self.tensor_parallel_size) and self.tensor_parallel_size > 0,
             f"tensor_parallel_size must be a positive int, got {self.tensor_parallel_size!r}")
        need(self.quantization is None or self.quantization in QUANTIZATION_METHODS,
             f"quantization must be None or one of {', '.join(QUANTIZATION_METHODS)}, got {self.quantization!r}")
        sizes = self.compile_sizes
        need(isinstance(sizes, (list, tuple)) and len(sizes) > 0 and all(is_int(s) and s > 0 for s in sizes)
             and list(sizes) == sorted(set(sizes)),
             f"compile_sizes must be a non-empty list of positive ints, sorted and unique (e.g. [1, 2, 4, 8]), "
             f"got {sizes!r}")
        self.compile_sizes = list(sizes)
        for name in ("enable_prefix_caching", "enable_chunked_prefill", "enforce_eager"):
            need(isinstance(getattr(self, name), bool), f"{name} must be True or False, got {getattr(self, name)!r}")
        if not self.enable_chunked_prefill and self.max_model_len is not None:
            need(self.max_num_batched_tokens >= self.max_model_len,
                 f"without chunked prefill a whole prompt must fit one step: max_num_batched_tokens "
                 f"({self.max_num_batched_tokens}) must be >= max_model_len ({self.max_model_len}); "
                 "raise it or enable_chunked_prefill=True")

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> tuple[EngineConfig, dict[str, Any]]:
        """(EngineConfig of the kwargs that are fields, the other kwargs)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in kwargs.items() if k in names}), {k: v for k, v in kwargs.items()
                                                                           if k not in names}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def engine_fields() -> tuple[dataclasses.Field, ...]:
    """EngineConfig's fields, in declaration order."""
    return dataclasses.fields(EngineConfig)


def cli_flag(f: dataclasses.Field) -> str:
    """npukit's own flag for a field: `--max-num-seqs` for max_num_seqs."""
    return "--" + f.name.replace("_", "-")


def _arg_type(f: dataclasses.Field):
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    if kind.startswith("list[int]"):
        return int_list
    return float if kind.startswith("float") else str if kind.startswith("str") else int


def int_list(text: str) -> list[int]:
    """A list flag's value: `1,2,4,8` (or `[1, 2, 4]`) -> [1, 2, 4, 8]."""
    try:
        return [int(x) for x in text.strip().strip("[]").split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 1,2,4,8, got {text!r}") from None


def add_engine_args(parser: argparse.ArgumentParser, *, defaults: dict[str, Any] | None = None,
                    exclude: tuple[str, ...] = (), notes: dict[str, str] | None = None) -> argparse.ArgumentParser:
    """One flag per EngineConfig field (except `exclude` and fields marked cli=False).

    Unset flags parse to None (the field's default applies) unless `defaults` names a value for them.
    `notes[name]` replaces a field's help line where a command fills the default in its own way."""
    defaults, notes = defaults or {}, notes or {}
    group = parser.add_argument_group("engine settings (EngineConfig; vLLM's flag in brackets)")
    for f in engine_fields():
        if f.name in exclude or not f.metadata.get("cli", True):
            continue
        default = defaults.get(f.name)
        shown = f.default if default is None else default
        vllm = f.metadata.get("vllm")
        text = (notes.get(f.name, f.metadata["help"]) + ("" if shown is None else f" (default: {shown})")
                + (f" [vLLM: {vllm}]" if vllm else ""))
        flags = [cli_flag(f)] + ([vllm] if f.metadata.get("vllm_alias") and vllm != cli_flag(f) else [])
        if f.type in (bool, "bool"):
            group.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction, default=default,
                               help=text)
        else:
            group.add_argument(*flags, dest=f.name, type=_arg_type(f), default=default, help=text,
                               choices=f.metadata.get("choices"))
    return parser


def engine_args(namespace: argparse.Namespace) -> dict[str, Any]:
    """The EngineConfig fields that the parsed flags set (None = not given: the field's default applies)."""
    return {f.name: getattr(namespace, f.name) for f in engine_fields()
            if getattr(namespace, f.name, None) is not None}
