"""Load a model on the best device in the best precision it really supports, and say what happened.

    model, tokenizer = npukit.load_model("smollm2-135m-instruct")   # embedded, offline
    model, tokenizer = npukit.load_model("./my-model", device="npu", dtype="float16")
    model.load_report                                               # device, dtype, why, seconds, memory
"""
from __future__ import annotations

import functools
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import device as _device
from .rows import Rows
from .samples import EMBEDDED, sample_path

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


class ModelLoadError(RuntimeError):
    """The model could not be found or loaded; the message says what to do."""


@dataclass
class LoadReport(Rows):
    source: str
    path: str
    device: str
    device_name: str
    dtype: str
    reasons: list[str] = field(default_factory=list)  # how device and dtype were chosen, fallbacks included
    seconds: float = 0.0
    num_parameters: int = 0
    weight_bytes: int = 0
    memory_before: int = 0  # bytes allocated on the device (process RSS on CPU)
    memory_after: int = 0

    def rows(self) -> list[tuple[str, str]]:
        gib = 1024**3
        return [
            ("model", self.source), ("path", self.path),
            ("device", f"{self.device} ({self.device_name})"), ("dtype", self.dtype),
            ("why", "; ".join(self.reasons) or "-"), ("load time", f"{self.seconds:.2f} s"),
            ("parameters", f"{self.num_parameters / 1e6:.1f} M"),
            ("weights", f"{self.weight_bytes / gib:.3f} GiB"),
            ("memory before → after", f"{self.memory_before / gib:.3f} → {self.memory_after / gib:.3f} GiB"),
        ]


def _state_dict_bytes(model) -> int:
    from .quant.linear import state_dict_bytes

    return state_dict_bytes(model)


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[str(dtype).lower().removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}: use 'auto', 'float32', 'bfloat16' or 'float16'") from None


@functools.lru_cache(maxsize=None)
def cpu_matmul_gflops(dtype: torch.dtype, hidden: int = 576, tokens: int = 32) -> float:
    """Measured GFLOP/s of a matmul of ``tokens`` rows (tokens × hidden × 4·hidden) on this CPU.

    32 rows (the default, what ``dtype="auto"`` compares) is a batch of decoding sequences or a short
    prompt; 1 row is one sequence decoding alone, where reading the weights dominates.
    """
    a = torch.randn(tokens, hidden).to(dtype)
    w = torch.randn(4 * hidden, hidden).to(dtype)
    with torch.inference_mode():
        for _ in range(3):
            torch.nn.functional.linear(a, w)
        best = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(10):
                torch.nn.functional.linear(a, w)
            best = min(best, time.perf_counter() - t)
    return 2 * tokens * hidden * 4 * hidden * 10 / best / 1e9


def choose_dtype(dev: torch.device, requested: str | torch.dtype = "auto") -> tuple[torch.dtype, list[str]]:
    """The dtype to load in, and the reasons. An explicit dtype the device lacks raises ValueError.

    NOTE: a quantised model takes the same dtype. W8A8 on CPU loaded in float32 until its per-row steps ran in C for
    bf16 rows too: on a 2-core AMD EPYC (AVX512-BF16; SmolLM2, ``benchmarks/bench_levers.py --variants auto w8a8
    w8a8-bf16 --threads 2 --mixed w8a8 w8a8-bf16``), against the unquantised bf16 model, fp32 rows gave 1.17x its
    throughput at 64 sequences, 1.06x on the mixed workload and 1.14x its batch-1 TPOT; bf16 rows 1.39x, 1.25x and
    0.97x. W8A16 likewise: bf16 rows beat fp32 ones (TPOT 0.76x / 64 sequences 0.85x / mixed 0.86x against 0.84x
    / 0.52x / 0.63x)."""
    if requested != "auto":
        dtype = parse_dtype(requested)
        ok, why = _device.supports_dtype(dev, dtype)
        if not ok:
            alt = "float16" if dev.type == "npu" else "float32"
            raise ValueError(f"dtype {dtype} is not supported on {dev}: {why}. Use dtype='{alt}' or dtype='auto'.")
        return dtype, [f"{str(dtype).removeprefix('torch.')} requested"]
    reasons: list[str] = []
    if dev.type == "cpu":
        # NOTE: on CPU the fastest dtype depends on the chip (AVX512-BF16 / AMX make bf16 ~2x fp32;
        # without them bf16 is emulated and slower), so measure instead of guessing. fp16 matmul is slow
        # on most CPUs and is not considered.
        if _device.cpu_has_fast_bf16():
            f32, b16 = cpu_matmul_gflops(torch.float32), cpu_matmul_gflops(torch.bfloat16)
            if b16 > 1.2 * f32:
                return torch.bfloat16, [f"CPU has native bf16: measured bf16 {b16:.0f} vs fp32 {f32:.0f} GFLOP/s"]
            reasons.append(f"CPU bf16 not faster: measured bf16 {b16:.0f} vs fp32 {f32:.0f} GFLOP/s")
        else:
            cap = _device.cpu_isa_cap()
            reasons.append(f"CPU has no native bf16 (AVX512-BF16/AMX){': ' + cap if cap else ''}")
        return torch.float32, reasons + ["float32 is fastest here"]
    for dtype in (torch.bfloat16, torch.float16):
        ok, why = _device.supports_dtype(dev, dtype)
        if ok:
            return dtype, reasons + [f"{str(dtype).removeprefix('torch.')} is the best precision {dev.type} supports"]
        reasons.append(f"fallback: {why}")
    return torch.float32, reasons + ["float32: no half precision works on this device"]


def resolve_model_path(name_or_path: str | os.PathLike, *, revision: str | None = None,
                       source: str = "hf") -> tuple[Path, str]:
    """Embedded name, local folder or hub id -> a local folder and where it came from."""
    name = str(name_or_path)
    if name in EMBEDDED:
        return sample_path(name), f"embedded:{name}"
    path = Path(name).expanduser()
    if path.is_dir():
        from .hub import check_model_folder

        return check_model_folder(path), f"local:{path}"
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise ModelLoadError(
            f"unknown model {name!r}: not an embedded model ({', '.join(EMBEDDED)}), not a model folder, "
            "and not a hub id like 'Qwen/Qwen2.5-0.5B-Instruct'")
    from .hub import download

    return download(name, source=source, revision=revision), f"{source}:{name}"


def find_bad_file(folder: Path) -> tuple[Path, str] | None:
    """The first file of a model folder that cannot be read (JSON that does not parse, a safetensors file
    whose header is broken or cut short), with the reason; None if they all read."""
    if not Path(folder).is_dir():
        return None
    for f in sorted(Path(folder).glob("*.json")):
        try:
            json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            return f, f"{type(e).__name__}: {e}"
    for f in sorted(Path(folder).glob("*.safetensors")):
        try:
            from safetensors import safe_open

            with safe_open(str(f), framework="pt") as st:
                st.keys()
        except Exception as e:  # noqa: BLE001 - SafetensorError is not importable by a stable name
            return f, f"{type(e).__name__}: {e}"
    return None


def _load_error_message(origin: str, path: Path, e: Exception) -> str:
    bad = find_bad_file(path)
    if bad is not None:
        return (f"could not load {origin} from {path}: {bad[0].name} is damaged ({bad[1]}). Download that file "
                "again (npukit download <model>, or delete it and rerun) or copy it again from a good copy.")
    return (f"could not load {origin} from {path}: {type(e).__name__}: {e}. Check that the folder holds "
            "config.json, the weights (*.safetensors) and the tokenizer files, complete and readable.")


def load_model(name_or_path: str | os.PathLike = "smollm2-135m-instruct", device: str | torch.device = "auto",
               dtype: str | torch.dtype = "auto", *, revision: str | None = None, source: str = "hf",
               trust_remote_code: bool = False, quantization: str | None = None,
               quantize_lm_head: bool | str = False):
    """Load (model, tokenizer) in eval mode on the chosen device; ``model.load_report`` says how.

    quantization: "w8a16" or "w8a8" quantises the decoder's linear layers after loading (npukit.quant;
    ``model.quant_report`` says which kernels were picked and what it saved); ``quantize_lm_head=True`` makes
    lm_head int8 too, ``"bf16"`` stores it in bfloat16 (see npukit.quant.linear)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if quantize_lm_head and quantization is None:
        raise ValueError(f"quantize_lm_head={quantize_lm_head!r} needs a quantization method: pass "
                         "quantization='w8a16' or 'w8a8'")

    dev = _device.resolve(device)
    reasons = [f"{dev.type} picked automatically (npu > cuda > mps > cpu)"] if device in (None, "auto") else []
    torch_dtype, why = choose_dtype(dev, dtype)
    reasons += why
    path, origin = resolve_model_path(name_or_path, revision=revision, source=source)

    before = _device.memory_stats(dev).allocated
    t0 = time.perf_counter()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a "Loading weights" bar per load is noise in notebooks and the CLI
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - OSError, JSONDecodeError, SafetensorError, ...: name the file
        raise ModelLoadError(_load_error_message(origin, path, e)) from e
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    model.to(dev).eval()
    num_parameters = sum(p.numel() for p in model.parameters())
    if quantization is not None:
        from .quant import quantize_model

        report = quantize_model(model, quantization, tokenizer=tokenizer, quantize_lm_head=quantize_lm_head)
        reasons.append(f"quantised: {report.kernels}" + (f"; lm_head too: {report.lm_head}" if report.lm_head else ""))
    _device.synchronize(dev)
    seconds = time.perf_counter() - t0

    model.load_report = LoadReport(
        source=origin, path=str(path), device=str(dev), device_name=_device.device_name(dev),
        dtype=str(torch_dtype).removeprefix("torch."), reasons=reasons, seconds=seconds,
        num_parameters=num_parameters,
        # NOTE: parameters and buffers (a quantised layer's int8 weight and scales are buffers), tied ones once
        weight_bytes=_state_dict_bytes(model),
        memory_before=before, memory_after=_device.memory_stats(dev).allocated,
    )
    return model, tokenizer
