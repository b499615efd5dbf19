"""Graduation: from npukit's engine settings to the equivalent vLLM / vLLM-Ascend command lines.

    g = graduate(llm.config, model="Qwen/Qwen2.5-7B-Instruct", dtype="bfloat16", device="npu")
    print(g)                 # vllm serve ..., vllm bench serve / throughput ..., notes, flag table
    g.serve_command          # the `vllm serve` line alone

npukit's knobs carry vLLM's names (see `npukit.engine.config`), so most flags map one to one. The one
that does not is memory: npukit's `kv_cache_memory_fraction` is a share of the memory left *after*
the weights, vLLM's `--gpu-memory-utilization` a share of the *whole* device memory (weights,
activations and KV cache together). We translate it when the weight size and device memory are known.
"""
from __future__ import annotations

import argparse
import html
import json
import math
import re
import shlex
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GiB = 1024 ** 3

# Device memory per NPU (GiB) of common Ascend parts; override with device_memory_gib=.
# NOTE: memory per NPU as torch_npu sees it. An Atlas 300I Duo card carries two 310P chips;
# each chip shows 43.24 GiB to a program (seed 004: Qwen3-32B in fp16 runs out of memory there at TP 1).
ASCEND_HBM_GIB = {"910B4": 32, "910B": 64, "910_93": 64, "910A": 32, "310P": 43.24}
NO_BF16_CHIPS = ("310P", "910A")  # Atlas 300I Duo (310P) and 910A: no bf16, no graph mode
VLLM_DEFAULT_GPU_MEMORY_UTILIZATION = 0.9
ASCEND_BLOCK_SIZE = 128
# Share of one device the weights may take before we ask for more cards: the rest is KV cache + activations.
WEIGHT_SHARE_PER_DEVICE = 0.8
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16",
                 "torch.float32": "float32", "torch.float16": "float16", "torch.bfloat16": "bfloat16"}
EMBEDDED_HUB_IDS = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}


@dataclass
class FlagMapping:
    """One row of the npukit -> vLLM table."""

    npukit: str
    value: Any
    vllm_flag: str
    vllm_value: Any
    note: str = ""


@dataclass
class Graduation:
    """The vLLM commands equivalent to an npukit setup, with notes. Print it or show it in a notebook."""

    model: str
    serve_args: list[str]
    bench_commands: dict[str, str]
    notes: list[str] = field(default_factory=list)
    table: list[FlagMapping] = field(default_factory=list)
    tensor_parallel_size: int = 1

    @property
    def serve_command(self) -> str:
        return _format_command(["vllm", "serve", self.model] + self.serve_args)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "serve_command": self.serve_command, "serve_args": self.serve_args,
                "bench_commands": self.bench_commands, "notes": self.notes,
                "tensor_parallel_size": self.tensor_parallel_size,
                "table": [vars(r) for r in self.table]}

    def __str__(self) -> str:
        out = ["# Serve with vLLM / vLLM-Ascend", self.serve_command, ""]
        for name, cmd in self.bench_commands.items():
            out += [f"# {name}", cmd, ""]
        if self.notes:
            out.append("Notes:")
            out += [f"- {n}" for n in self.notes]
            out.append("")
        w = max(len(r.npukit) for r in self.table) if self.table else 10
        out.append(f"{'npukit':<{w}}  {'value':<12}  vLLM flag")
        for r in self.table:
            line = f"{r.npukit:<{w}}  {str(r.value):<12}  {r.vllm_flag} {'' if r.vllm_value is None else r.vllm_value}"
            out.append(line.rstrip() + (f"   ({r.note})" if r.note else ""))
        return "\n".join(out)

    def _repr_html_(self) -> str:
        def pre(s: str) -> str:
            return f"<pre>{html.escape(s)}</pre>"

        parts = ["<h4>vllm serve</h4>", pre(self.serve_command)]
        for name, cmd in self.bench_commands.items():
            parts += [f"<h4>{html.escape(name)}</h4>", pre(cmd)]
        if self.notes:
            parts.append("<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in self.notes) + "</ul>")
        rows = "".join(
            f"<tr><td><code>{html.escape(r.npukit)}</code></td><td>{html.escape(str(r.value))}</td>"
            f"<td><code>{html.escape(r.vllm_flag)}"
            f"{'' if r.vllm_value is None else ' ' + html.escape(str(r.vllm_value))}"
            f"</code></td><td>{html.escape(r.note)}</td></tr>" for r in self.table)
        parts.append("<table><tr><th>npukit</th><th>value</th><th>vLLM flag</th><th>note</th></tr>" + rows + "</table>")
        return "".join(parts)


def _format_command(argv: list[str]) -> str:
    """`vllm serve MODEL \\` with one flag (and its value) per line, shell-quoted."""
    head, rest = argv[:3], argv[3:]
    lines = [" ".join(shlex.quote(a) for a in head)]
    i = 0
    while i < len(rest):
        if i + 1 < len(rest) and not rest[i + 1].startswith("--"):
            lines.append(f"{shlex.quote(rest[i])} {shlex.quote(rest[i + 1])}")
            i += 2
        else:
            lines.append(shlex.quote(rest[i]))
            i += 1
    return " \\\n  ".join(lines)


def _norm_dtype(dtype) -> str:
    d = str(dtype).lower()
    d = DTYPE_ALIASES.get(d, d)
    if d not in DTYPE_BYTES and d != "auto":
        raise ValueError(f"dtype must be auto, float32, float16 or bfloat16, got {dtype!r}.")
    return d


def _chip_family(chip: str | None) -> str | None:
    """'Ascend910B3' -> '910B', 'Ascend310P3' -> '310P', '910B4' -> '910B4'."""
    if not chip:
        return None
    c = chip.upper().replace("ASCEND", "")
    for key in ("910B4", "910_93", "910B", "910A", "310P"):
        if key.upper() in c:
            return key
    if re.fullmatch(r"910", c.strip()):
        return "910A"
    return None


def count_parameters(model: str) -> tuple[int | None, str]:
    """Parameter count of a model without loading it: safetensors headers of a local folder (or an
    embedded model), else a size in the name ("Qwen3-32B" -> 32e9). (None, why) when unknown."""
    folder = None
    if model in EMBEDDED_HUB_IDS or model == "tiny-llama":
        from npukit.samples import sample_path

        folder = sample_path(model)
    elif Path(model).expanduser().is_dir():
        folder = Path(model).expanduser()
    if folder is not None:
        total = 0
        for f in sorted(folder.glob("*.safetensors")):
            with open(f, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(n))
            total += sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
        if total:
            return total, f"counted from the safetensors files in {folder}"
    m = re.search(r"(?<![\d.])(\d+(?:\.\d+)?)\s*[bB](?![a-zA-Z])", Path(model).name)
    if m:
        return int(float(m.group(1)) * 1e9), f"estimated from the name ({m.group(0)} parameters)"
    return None, "unknown (pass num_parameters= or weight_bytes=)"


def graduate(config=None, model: str | None = None, *, dtype: str = "auto", device: str = "npu",
             chip: str | None = None, device_memory_gib: float | None = None, num_parameters: int | None = None,
             weight_bytes: int | None = None, served_model_name: str | None = None, host: str = "127.0.0.1",
             port: int = 8000, input_len: int = 256, output_len: int = 128, num_prompts: int = 200,
             max_concurrency: int = 8, backend: str = "openai-chat") -> Graduation:
    """The `vllm serve` / `vllm bench` commands that match an npukit engine setup.

    `config`: an `EngineConfig`, or an `LLM` (its config, model and dtype are used); None = defaults.
    `model`: the hub id or folder vLLM should load (embedded names map to their hub ids).
    `device`: the target, "npu" (vLLM-Ascend) or "cuda". `chip`: e.g. "910B", "310P" (Atlas 300I Duo).
    Memory (for --tensor-parallel-size and --gpu-memory-utilization): `device_memory_gib` per card
    (default: a table of Ascend parts), `weight_bytes` or `num_parameters` (default: counted from a
    local folder, or read from a size in the model name such as "32B").
    """
    config, model, dtype, weight_bytes = _from_llm(config, model, dtype, weight_bytes)
    if not model:
        raise ValueError("graduate() needs model= (a hub id like 'Qwen/Qwen2.5-7B-Instruct' or a model folder).")
    if device not in ("npu", "cuda"):
        raise ValueError(f"device must be 'npu' (vLLM-Ascend) or 'cuda' (vLLM on NVIDIA GPUs), got {device!r}.")
    dtype = _norm_dtype(dtype)
    family = _chip_family(chip) if device == "npu" else None
    if chip and device == "npu" and family is None:
        raise ValueError(f"unknown Ascend chip {chip!r}: use one of {', '.join(ASCEND_HBM_GIB)} (or leave it out).")

    g = Graduation(model=EMBEDDED_HUB_IDS.get(model, model), serve_args=[], bench_commands={})
    _model_notes(model, g.model, host, g.notes)
    vllm_dtype, enforce_eager, args = _dtype_flags(dtype, device, family, g.notes, g.table)
    args += _engine_flags(config, device, g.notes, g.table)
    memory, tp_args = _tensor_parallel(config, model, vllm_dtype, device, family, device_memory_gib,
                                       num_parameters, weight_bytes, g.notes, g.table)
    g.tensor_parallel_size = memory.tp
    args += tp_args
    args += _kv_cache_flags(config, device, memory, g.notes, g.table)
    args += _graph_flags(config, device, enforce_eager, g.notes, g.table)
    g.serve_args = (["--served-model-name", served_model_name] if served_model_name else []) + [
        "--host", host, "--port", str(port)] + args
    g.bench_commands = _bench_commands(g.model, args, served_model_name, host, port, input_len, output_len,
                                       num_prompts, max_concurrency, backend, g.notes)
    return g


def _from_llm(config, model, dtype, weight_bytes):
    """(EngineConfig, model, dtype, weight_bytes), filled in from an LLM where one is given."""
    from npukit.engine.config import EngineConfig

    if config is None or not (hasattr(config, "config") and hasattr(config, "model")):
        return config or EngineConfig(), model, dtype, weight_bytes
    llm, config = config, config.config
    report = getattr(llm.model, "load_report", None)
    if model is None:
        model = getattr(llm.model.config, "_name_or_path", None)
    if dtype == "auto":
        dtype = str(getattr(llm.model, "dtype", "auto")).removeprefix("torch.")
    if weight_bytes is None and report is not None:
        weight_bytes = report.weight_bytes
    return config, model, dtype, weight_bytes


def _model_notes(model: str, vllm_model: str, host: str, notes: list[str]) -> None:
    if vllm_model != model:
        notes.append(f"'{model}' is npukit's embedded copy of {vllm_model}; vLLM loads it from the hub "
                     "(or pass the local folder).")
    if model == "tiny-llama":
        notes.append("tiny-llama is a random test model built locally; point vLLM at its folder "
                     "(npukit.samples.sample_path('tiny-llama')) -- its answers are noise.")
    if host == "127.0.0.1":
        notes.append("vLLM listens on every interface unless told otherwise; the command keeps npukit's "
                     "--host 127.0.0.1 (this machine only). Add --api-key before opening it up.")


def _dtype_flags(dtype: str, device: str, family: str | None, notes: list[str],
                 table: list[FlagMapping]) -> tuple[str, bool, list[str]]:
    """(vLLM's dtype, whether --enforce-eager is needed, the --dtype flag): the Ascend parts without bf16 /
    graph mode get float16 and eager mode."""
    enforce_eager = False
    vllm_dtype = dtype
    if family in NO_BF16_CHIPS:
        enforce_eager = True
        if dtype in ("bfloat16", "auto"):
            notes.append(f"{family} has no bfloat16: using --dtype float16 instead of {dtype}.")
        vllm_dtype = "float16"
        notes.append(f"Atlas 300I Duo (310P) and 910A have no bf16 and no graph mode: vLLM-Ascend needs "
                     f"--enforce-eager --dtype float16 there (this {family} command has both).")
    elif device == "npu" and dtype == "float16":
        notes.append("float16 on NPU: on an Atlas 300I Duo (310P) or 910A, which have no bf16 and no graph "
                     "mode, also add --enforce-eager (pass chip='310P' to get it in the command); on 910B "
                     "bfloat16 is usually the better choice.")
    table.append(FlagMapping("dtype", dtype, "--dtype", vllm_dtype if vllm_dtype != "auto" else None,
                             "auto: the model's own dtype in vLLM; npukit's auto picks per device"))
    return vllm_dtype, enforce_eager, (["--dtype", vllm_dtype] if vllm_dtype != "auto" else [])


# EngineConfig fields that are not one to one: the KV cache size (see _kv_cache_flags), the tensor-parallel
# size (see _tensor_parallel) and graph mode (see _graph_flags); every other field with a vLLM flag (field
# metadata "vllm") maps one to one in _engine_flags.
NOT_ONE_TO_ONE = ("num_kv_blocks", "kv_cache_memory_fraction", "tensor_parallel_size", "enforce_eager",
                  "compile_sizes")
UNSET_NOTES = {"max_model_len": "unset: the model's context length"}


def _engine_flags(config, device: str, notes: list[str], table: list[FlagMapping]) -> list[str]:
    """The one-to-one flags, read from EngineConfig's field metadata: value flags, --flag / --no-flag for
    booleans, nothing for an unset (None) field."""
    from npukit.engine.config import engine_fields

    args: list[str] = []
    for f in engine_fields():
        flag, value = f.metadata.get("vllm"), getattr(config, f.name)
        if flag is None or f.name in NOT_ONE_TO_ONE:
            continue
        if isinstance(value, bool):
            used = flag if value else "--no-" + flag.removeprefix("--")
            table.append(FlagMapping(f.name, value, used, None))
            args.append(used)
        elif value is None:
            table.append(FlagMapping(f.name, None, flag, None, UNSET_NOTES.get(f.name, "unset: vLLM's default")))
        else:
            table.append(FlagMapping(f.name, value, flag, value, _field_note(f.name, config, device, notes)))
            args += [flag, str(value)]
    return args


def _field_note(name: str, config, device: str, notes: list[str]) -> str:
    if name != "block_size":
        return ""
    if device == "npu" and config.block_size != ASCEND_BLOCK_SIZE:
        notes.append(f"--block-size {config.block_size} mirrors npukit; vLLM-Ascend's attention kernels are "
                     f"tuned for --block-size {ASCEND_BLOCK_SIZE} (its default): try it.")
    return f"vLLM-Ascend uses {ASCEND_BLOCK_SIZE}" if device == "npu" else "vLLM's default is 16"


def _graph_flags(config, device: str, chip_eager: bool, notes: list[str], table: list[FlagMapping]) -> list[str]:
    """enforce_eager -> --enforce-eager; with graphs on, compile_sizes -> --compilation-config
    '{"cudagraph_capture_sizes": [...]}' (vLLM's capture sizes; vLLM-Ascend's ACL graph reads the same)."""
    eager = config.enforce_eager or chip_eager
    sizes = json.dumps({"cudagraph_capture_sizes": list(config.compile_sizes)})
    why = "no graph capture"
    if chip_eager and not config.enforce_eager:
        why = "this chip has no graph mode"
        notes.append("enforce_eager=False, but this chip has no graph mode in vLLM-Ascend: --enforce-eager anyway.")
    elif config.enforce_eager and not chip_eager:
        why = "enforce_eager=True"
        notes.append("--enforce-eager because this configuration runs eager (EngineConfig's default). vLLM and "
                     "vLLM-Ascend capture graphs by default, which speeds up small decode batches on GPU / NPU: drop "
                     "the flag (`npukit graduate` leaves it out unless given "
                     "--enforce-eager; --no-enforce-eager here) unless graph capture fails there.")
    flag, note = ("--enforce-eager", why) if eager else ("--no-enforce-eager", "graphs: vLLM's default")
    table.append(FlagMapping("enforce_eager", config.enforce_eager, flag, None, note))
    table.append(FlagMapping("compile_sizes", config.compile_sizes, "--compilation-config", None if eager else sizes,
                             "unused: eager" if eager else "vLLM's cudagraph_capture_sizes"))
    if eager:
        return ["--enforce-eager"]
    if device == "npu":
        notes.append("vLLM-Ascend captures ACL graphs (torch.npu.NPUGraph) by default, at the same "
                     "cudagraph_capture_sizes. The older TorchAir path (--additional-config "
                     "'{\"torchair_graph_config\": {\"enabled\": true, \"graph_batch_sizes\": [...]}}', DeepSeek "
                     "only) was deprecated in v0.11.0 and removed in v0.12.0rc1. If capture fails or runs out of "
                     "streams, use fewer sizes or --enforce-eager.")
    return ["--compilation-config", sizes]


@dataclass
class _Memory:
    weight_bytes: int | None
    device_memory_gib: float | None
    tp: int


def _tensor_parallel(config, model, vllm_dtype, device, family, device_memory_gib, num_parameters, weight_bytes,
                     notes: list[str], table: list[FlagMapping]) -> tuple[_Memory, list[str]]:
    """(weights, device memory and tensor parallel size; the --tensor-parallel-size flag): the weights vs the
    device memory decide how many cards."""
    dtype_bytes = DTYPE_BYTES.get(vllm_dtype if vllm_dtype != "auto" else "bfloat16")
    if weight_bytes is None:
        if num_parameters is None:
            num_parameters, why = count_parameters(model)
        else:
            why = "given"
        if num_parameters is not None:
            weight_bytes = num_parameters * dtype_bytes
            notes.append(f"Weights: {num_parameters / 1e9:.2f} B parameters ({why}) x {dtype_bytes} bytes = "
                         f"{weight_bytes / GiB:.1f} GiB.")
    if device_memory_gib is None and device == "npu":
        device_memory_gib = ASCEND_HBM_GIB[family or "910B"]
        if family is None:
            notes.append(f"Assuming {device_memory_gib} GiB per NPU (Atlas 800T A2 / 910B); pass chip= or "
                         "device_memory_gib= for your card (npu-smi info shows it).")
    tp, args = config.tensor_parallel_size, []
    if tp > 1:
        args = ["--tensor-parallel-size", str(tp)]
        notes.append(f"--tensor-parallel-size {tp} as in npukit; `npukit plan {model} --device ...` shows whether "
                     "a smaller size fits your devices.")
    elif weight_bytes is not None and device_memory_gib:
        per_card = WEIGHT_SHARE_PER_DEVICE * device_memory_gib * GiB
        tp = 1 << max(0, math.ceil(math.log2(weight_bytes / per_card))) if weight_bytes > per_card else 1
        if tp > 1:
            notes.append(f"{weight_bytes / GiB:.1f} GiB of weights do not fit in {WEIGHT_SHARE_PER_DEVICE:.0%} of one "
                         f"{device_memory_gib:g} GiB card (the rest is KV cache and activations): "
                         f"--tensor-parallel-size {tp} splits them over {tp} cards (one card fails with "
                         "'NPU out of memory').")
            args = ["--tensor-parallel-size", str(tp)]
        if tp > 8:
            notes.append("More than 8 cards: one Ascend server usually has 8 NPUs, so this needs several nodes "
                         "(--pipeline-parallel-size) or a quantised model (e.g. W8A8) to fit.")
    why = ("as in npukit" if config.tensor_parallel_size > 1 else
           f"weights {weight_bytes / GiB:.1f} GiB vs device memory" if weight_bytes else "weights unknown")
    table.append(FlagMapping("tensor_parallel_size", config.tensor_parallel_size, "--tensor-parallel-size", tp, why))
    return _Memory(weight_bytes, device_memory_gib, tp), args


def _kv_cache_flags(config, device: str, memory: _Memory, notes: list[str], table: list[FlagMapping]) -> list[str]:
    """num_kv_blocks -> --num-gpu-blocks-override; kv_cache_memory_fraction -> --gpu-memory-utilization
    (not the same quantity: translated when the weight size and device memory are known)."""
    args: list[str] = []
    if config.num_kv_blocks is not None:
        table.append(FlagMapping("num_kv_blocks", config.num_kv_blocks, "--num-gpu-blocks-override",
                                 config.num_kv_blocks, "a fixed KV cache size, as in npukit"))
        args += ["--num-gpu-blocks-override", str(config.num_kv_blocks)]
        if config.block_size != ASCEND_BLOCK_SIZE and device == "npu":
            notes.append("--num-gpu-blocks-override counts blocks of --block-size tokens: keep both together.")
    frac, weight_bytes = config.kv_cache_memory_fraction, memory.weight_bytes
    if config.num_kv_blocks is not None:
        table.append(FlagMapping("kv_cache_memory_fraction", frac, "--gpu-memory-utilization", None,
                                 "unused: num_kv_blocks fixes the KV cache size"))
    elif weight_bytes is not None and memory.device_memory_gib:
        total = memory.device_memory_gib * GiB * memory.tp
        gmu = (weight_bytes + frac * max(0.0, total - weight_bytes)) / total
        gmu = round(min(0.95, max(0.1, gmu + 0.02)), 2)  # + a little for activations
        table.append(FlagMapping("kv_cache_memory_fraction", frac, "--gpu-memory-utilization", gmu,
                                 "share of the whole device memory, weights included"))
        args += ["--gpu-memory-utilization", str(gmu)]
        notes.append(f"Memory: npukit's kv_cache_memory_fraction={frac} is a share of the memory left *after* the "
                     f"weights; vLLM's --gpu-memory-utilization is a share of the *whole* card, weights and "
                     f"activations included. The same KV budget here is about {gmu}. vLLM's default "
                     f"{VLLM_DEFAULT_GPU_MEMORY_UTILIZATION} gives the KV cache far more room (more concurrent "
                     "sequences); on OOM lower --max-num-seqs before this.")
    else:
        table.append(FlagMapping("kv_cache_memory_fraction", frac, "--gpu-memory-utilization", None,
                                 "not translated: weight size or device memory unknown"))
        notes.append(f"Memory: npukit's kv_cache_memory_fraction={frac} (share of the memory left after the weights) "
                     f"has no direct vLLM flag; vLLM's --gpu-memory-utilization (default "
                     f"{VLLM_DEFAULT_GPU_MEMORY_UTILIZATION}) is a share of the whole device memory, weights included.")
    return args


def _bench_commands(vllm_model: str, engine_flags: list[str], served_model_name, host: str, port: int,
                    input_len: int, output_len: int, num_prompts: int, max_concurrency: int, backend: str,
                    notes: list[str]) -> dict[str, str]:
    """vllm bench serve / throughput and npukit bench serve, for the same workload."""
    name = served_model_name or vllm_model
    endpoint = "/v1/chat/completions" if backend == "openai-chat" else "/v1/completions"
    bench_serve = ["vllm", "bench", "serve", "--backend", backend, "--endpoint", endpoint, "--model", name]
    if served_model_name:
        bench_serve += ["--tokenizer", vllm_model]
        notes.append("vllm bench serve loads its tokenizer from --model; with --served-model-name pass --tokenizer "
                     "with the real hub id or folder, or it tries to download the served name.")
    bench_serve += ["--base-url", f"http://{host}:{port}", "--dataset-name", "random",
                    "--random-input-len", str(input_len), "--random-output-len", str(output_len),
                    "--num-prompts", str(num_prompts), "--max-concurrency", str(max_concurrency)]
    throughput = ["vllm", "bench", "throughput", "--model", vllm_model, "--input-len", str(input_len),
                  "--output-len", str(output_len), "--num-prompts", str(num_prompts)]
    throughput += engine_flags  # the engine flags; the server flags do not apply offline
    npukit_bench = ["npukit", "bench", "serve", "--backend", backend, "--base-url", f"http://{host}:{port}",
                    "--random-input-len", str(input_len), "--random-output-len", str(output_len),
                    "--num-prompts", str(num_prompts), "--max-concurrency", str(max_concurrency)]
    return {
        "online: vllm bench serve (against the server above)": _format_command(bench_serve),
        "offline: vllm bench throughput": _format_command(throughput),
        "the same measurement with npukit's client (works against both servers)": _format_command(npukit_bench),
    }


# --------------------------------------------------------------------------------------------------
# CLI: npukit graduate
# --------------------------------------------------------------------------------------------------


def add_graduate_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The `npukit graduate` flags: the same engine flags as `npukit serve`, plus the target hardware."""
    from npukit.engine.config import add_engine_args

    p.add_argument("model", nargs="?", default="smollm2-135m-instruct",
                   help="hub id or folder vLLM should load (embedded names map to their hub ids)")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    p.add_argument("--device", choices=["npu", "cuda"], default="npu", help="target: npu (vLLM-Ascend) or cuda")
    p.add_argument("--chip", default=None, help="Ascend chip: 910B, 910B4, 910A, 310P (Atlas 300I Duo), 910_93")
    p.add_argument("--device-memory-gib", type=float, default=None, help="memory per card in GiB (default: by chip)")
    p.add_argument("--num-parameters", type=float, default=None, help="parameter count, e.g. 7e9 (default: counted)")
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    # NOTE: npukit runs eager by default (see EngineConfig.enforce_eager); the command you graduate to
    # should not: graph mode is vLLM's default and a large win on NPUs and GPUs. --enforce-eager still maps.
    return add_engine_args(p, defaults={"enforce_eager": False},
                           notes={"enforce_eager": "run vLLM eager (default here: graph mode on, vLLM's default)"})


def build_graduate_parser() -> argparse.ArgumentParser:
    return add_graduate_args(argparse.ArgumentParser(
        prog="npukit graduate", description="Print the vllm serve / vllm bench commands matching npukit settings."))


def run_graduate(args: argparse.Namespace) -> int:
    from npukit.args import error
    from npukit.engine.config import EngineConfig, engine_args

    try:
        config = EngineConfig(**engine_args(args))
        g = graduate(config, args.model, dtype=args.dtype, device=args.device, chip=args.chip,
                     device_memory_gib=args.device_memory_gib,
                     num_parameters=int(args.num_parameters) if args.num_parameters else None,
                     served_model_name=args.served_model_name, host=args.host, port=args.port)
    except ValueError as e:
        return error(str(e))
    print(json.dumps(g.to_dict(), indent=2) if args.json else g)
    return 0


def graduate_main(argv: list[str] | None = None) -> int:
    """`npukit graduate ...` as a function."""
    return run_graduate(build_graduate_parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(graduate_main())
