"""Throughput: the npukit engine vs Hugging Face static batching vs transformers' continuous batching.

One run, same model object, same workload, numbers side by side:

    python benchmarks/bench_throughput.py                     # 64 requests, prompts 32-512, outputs 16-256
    python benchmarks/bench_throughput.py --quick             # a few minutes on 2 CPU cores
    python benchmarks/bench_throughput.py --dtype bfloat16 --threads 2 --num-prompts 32

Workload: seeded random token ids (no special tokens), greedy, ignore_eos, each request its own output
length. HF static batching pads prompts on the left and runs every batch until its longest output; only
the requested tokens count as output. transformers' continuous batching is the manager behind
``model.generate_batch`` (driven directly so each request gets its own ``max_new_tokens``).

Also printed: batch-1 TPOT (engine vs ``model.generate``), KV cache use and how many sequences fit vs a
contiguous max-length cache of the same bytes, TTFT with and without prefix caching for a shared
512-token system prompt, the share of engine step time spent outside the model forward, and useful model
FLOP/s against the matmul throughput measured in the same process and dtype.

Numbers on a shared machine are noisy: compare the ratios of one run, and rerun before trusting them.
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


# ----------------------------------------------------------------------------------------- workload
@dataclass
class Workload:
    prompts: list[list[int]]
    max_tokens: list[int]

    @property
    def num_output_tokens(self) -> int:
        return sum(self.max_tokens)

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)


def make_workload(vocab_size: int, num_prompts: int = 64, prompt_len=(32, 512), output_len=(16, 256),
                  seed: int = 0, low_id: int = 20) -> Workload:
    """Seeded random prompts (ids >= low_id, i.e. no special tokens) and output lengths, uniform in ranges."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(prompt_len[0], prompt_len[1] + 1, (num_prompts,), generator=g).tolist()
    outs = torch.randint(output_len[0], output_len[1] + 1, (num_prompts,), generator=g).tolist()
    prompts = [torch.randint(low_id, vocab_size, (n,), generator=g).tolist() for n in lens]
    return Workload(prompts, outs)


@dataclass
class RunResult:
    name: str
    wall_s: float
    output_tokens: int
    cpu_s: float = float("nan")  # process CPU time: steadier than wall time on a shared machine
    extra: dict = field(default_factory=dict)

    @property
    def tok_s(self) -> float:
        return self.output_tokens / self.wall_s


def useful_flops(model_config, workload: Workload) -> float:
    """Model FLOPs the workload needs: 2 * linear params per computed token, attention over the causal
    context, lm_head once per generated token. No padding, no recomputation."""
    c = model_config
    hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kvh = c.num_key_value_heads
    per_layer = c.hidden_size * hd * (2 * c.num_attention_heads + 2 * kvh) + 3 * c.hidden_size * c.intermediate_size
    linear = 2 * per_layer * c.num_hidden_layers
    attn_per_ctx_token = 4 * c.num_attention_heads * hd * c.num_hidden_layers
    total = 0.0
    for p, o in zip(workload.prompts, workload.max_tokens):
        n = len(p) + o - 1  # tokens that go through the model (the last sampled one never does)
        total += linear * n + attn_per_ctx_token * n * (n + 1) / 2 + 2 * c.hidden_size * c.vocab_size * o
    return total


def matmul_flops_per_s(dtype: torch.dtype, k: int, n: int, ms=(64, 256, 1024), reps: int = 5) -> float:
    """Best F.linear throughput over a few row counts, this process, this dtype, this thread count."""
    best = 0.0
    with torch.inference_mode():
        w = torch.randn(n, k, dtype=dtype)
        for m in ms:
            a = torch.randn(m, k, dtype=dtype)
            torch.nn.functional.linear(a, w)
            iters = max(1, int(2e9 / (2 * m * k * n)))
            for _ in range(reps):
                t = time.perf_counter()
                for _ in range(iters):
                    torch.nn.functional.linear(a, w)
                best = max(best, 2 * m * k * n * iters / (time.perf_counter() - t))
    return best


# ----------------------------------------------------------------------------------------- npukit engine
class StepRecorder:
    """Wraps llm.step and llm.runner.execute_model / prepare_inputs to time each engine step's parts."""

    def __init__(self, llm, kv_every: int = 8):
        self.llm, self.kv_every = llm, kv_every
        self.steps: list[dict] = []
        self.kv_samples: list[tuple[float, float, int]] = []  # (kv_cache_usage, kv_utilization, running)
        runner = llm.runner
        orig_step, orig_exec, orig_prep = llm.step, runner.execute_model, runner.prepare_inputs
        cur: dict = {}

        def prepare_inputs(batch):
            t = time.perf_counter()
            out = orig_prep(batch)
            cur["prepare"] = cur.get("prepare", 0.0) + time.perf_counter() - t
            return out

        def execute_model(batch, *a, **kw):
            t = time.perf_counter()
            out = orig_exec(batch, *a, **kw)
            cur["exec"] = cur.get("exec", 0.0) + time.perf_counter() - t
            cur["entries"] = len(batch)
            cur["decodes"] = sum(1 for _, n in batch if n == 1)
            cur["tokens"] = sum(n for _, n in batch)
            return out

        def step():
            cur.clear()
            t = time.perf_counter()
            out = orig_step()
            cur["step"] = time.perf_counter() - t
            if "exec" in cur:
                self.steps.append(dict(cur))
                if len(self.steps) % self.kv_every == 0:
                    s = llm.stats()
                    self.kv_samples.append((s.kv_cache_usage, s.kv_utilization, s.num_running))
            return out

        llm.step, runner.execute_model, runner.prepare_inputs = step, execute_model, prepare_inputs

    def outside_forward(self, full_decode_of: int | None = None) -> tuple[float, float, int]:
        """(share of step time outside execute_model, share in prepare_inputs, steps counted)."""
        steps = [s for s in self.steps if full_decode_of is None
                 or (s["entries"] == full_decode_of and s["decodes"] == full_decode_of)]
        total = sum(s["step"] for s in steps)
        if not total:
            return float("nan"), float("nan"), 0
        return (1 - sum(s["exec"] for s in steps) / total,
                sum(s.get("prepare", 0.0) for s in steps) / total, len(steps))


def make_llm(model, tokenizer, num_kv_blocks: int, **kw):
    from npukit.engine import LLM

    return LLM(model, tokenizer, num_kv_blocks=num_kv_blocks, **kw)


def run_engine(model, tokenizer, workload: Workload, num_kv_blocks: int, max_num_seqs: int = 64,
               max_num_batched_tokens: int = 2048) -> RunResult:
    from npukit.engine import SamplingParams

    llm = make_llm(model, tokenizer, num_kv_blocks, max_num_seqs=max_num_seqs,
                   max_num_batched_tokens=max_num_batched_tokens, enable_prefix_caching=True)
    llm.generate([workload.prompts[0][:16]], SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)  # warm
    rec = StepRecorder(llm)
    params = [SamplingParams(temperature=0, max_tokens=o, ignore_eos=True) for o in workload.max_tokens]
    t, c = time.perf_counter(), time.process_time()
    outs = llm.generate(workload.prompts, params, use_tqdm=False)
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    assert n_out == workload.num_output_tokens, (n_out, workload.num_output_tokens)
    stats = llm.stats()
    peak_running = max((r for _, _, r in rec.kv_samples), default=0)
    res = RunResult("npukit LLM (paged, continuous)", wall, n_out, cpu, dict(
        steps=len(rec.steps), preemptions=stats.num_preemptions, recorder=rec, peak_running=peak_running,
        peak_kv_usage=max((u for u, _, _ in rec.kv_samples), default=float("nan")),
        mean_kv_util=statistics.mean([u for _, u, _ in rec.kv_samples]) if rec.kv_samples else float("nan"),
        ttft=[o.metrics.ttft for o in outs], block_size=llm.config.block_size))
    del llm
    gc.collect()
    return res


# ----------------------------------------------------------------------------------------- HF baselines
def _pad_id(model, tokenizer) -> int:
    for v in (getattr(model.generation_config, "pad_token_id", None), tokenizer.pad_token_id,
              tokenizer.eos_token_id, 0):
        if v is not None:
            return int(v[0] if isinstance(v, (list, tuple)) else v)
    return 0


@torch.inference_mode()
def run_hf_static(model, tokenizer, workload: Workload, batch_size: int) -> RunResult:
    """model.generate over batches in arrival order, left padded, each until its longest requested output."""
    pad = _pad_id(model, tokenizer)
    model.generate(torch.tensor([workload.prompts[0][:16]]), max_new_tokens=2, do_sample=False, pad_token_id=pad)
    t, c = time.perf_counter(), time.process_time()
    generated = padded = 0
    for i in range(0, len(workload.prompts), batch_size):
        prompts, outs = workload.prompts[i:i + batch_size], workload.max_tokens[i:i + batch_size]
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        n = max(outs)
        out = model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             pad_token_id=pad)
        generated += (out.shape[1] - width) * len(prompts)
        padded += width * len(prompts)
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    return RunResult(f"HF generate, static batches of {batch_size}", wall, workload.num_output_tokens, cpu,
                     dict(computed_output_tokens=generated, padded_prompt_tokens=padded))


def run_hf_continuous(model, workload: Workload, num_kv_tokens: int, max_batch_tokens: int = 2048,
                      max_requests: int = 64) -> RunResult | None:
    """transformers' own continuous batching (the manager behind model.generate_batch)."""
    try:
        from transformers import ContinuousBatchingConfig, GenerationConfig
    except ImportError as e:  # older transformers
        print(f"  transformers continuous batching not available: {e}")
        return None
    page = 256
    cb = ContinuousBatchingConfig(page_size=page, num_blocks=max(1, num_kv_tokens // page),
                                  max_batch_tokens=max_batch_tokens, max_requests_per_batch=max_requests,
                                  auto_switch_to_flash=False)
    gc_ = GenerationConfig(do_sample=False, eos_token_id=-1, pad_token_id=0, max_new_tokens=16)
    attn_impl = model.config._attn_implementation
    try:
        with model.continuous_batching_context_manager(generation_config=gc_, continuous_batching_config=cb,
                                                       warmup=False) as mgr:
            _collect(mgr, [mgr.add_request(workload.prompts[0][:16], max_new_tokens=2, eos_token_id=-1)])  # warm
            t, c = time.perf_counter(), time.process_time()
            ids = [mgr.add_request(p, max_new_tokens=o, eos_token_id=-1)
                   for p, o in zip(workload.prompts, workload.max_tokens)]
            results = _collect(mgr, ids)
            wall, cpu = time.perf_counter() - t, time.process_time() - c
    finally:
        model.set_attn_implementation(attn_impl)  # the manager switches to its paged attention
    n_out = sum(len(r.generated_tokens) for r in results.values())
    return RunResult("transformers generate_batch (continuous)", wall, n_out, cpu)


def _collect(mgr, ids: list[str], timeout_s: float = 3600) -> dict:
    results, deadline = {}, time.perf_counter() + timeout_s
    while len(results) < len(ids):
        if time.perf_counter() > deadline:
            raise TimeoutError("transformers continuous batching did not finish")
        r = mgr.get_result(timeout=1)
        if r is not None and r.is_finished():
            results[r.request_id] = r
    return results


def run_vllm(model_path: str, workload: Workload, dtype: torch.dtype) -> RunResult | None:
    """Optional peer: vLLM (CPU build) when importable. Never a dependency of npukit."""
    try:
        import vllm  # noqa: F401
    except Exception:
        return None
    llm = vllm.LLM(model=model_path, dtype=str(dtype).replace("torch.", ""), seed=0)
    params = [vllm.SamplingParams(temperature=0, max_tokens=o, ignore_eos=True) for o in workload.max_tokens]
    prompts = [{"prompt_token_ids": p} for p in workload.prompts]
    t = time.perf_counter()
    outs = llm.generate(prompts, params)
    wall = time.perf_counter() - t
    return RunResult("vLLM (peer)", wall, sum(len(o.outputs[0].token_ids) for o in outs))


# ----------------------------------------------------------------------------------------- latency / memory
def batch1_tpot(model, tokenizer, prompt_len: int, new_tokens: int, rounds: int, num_kv_blocks: int):
    """Median TPOT of one request: the engine vs model.generate, alternated `rounds` times."""
    from npukit.engine import SamplingParams
    from npukit.metrics import time_generation

    prompt = list(range(100, 100 + prompt_len))
    llm = make_llm(model, tokenizer, num_kv_blocks, enable_prefix_caching=False)
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    eng, hf = [], []
    for _ in range(rounds):
        eng.append(llm.generate([prompt], params, use_tqdm=False)[0].metrics.tpot)
        hf.append(time_generation(model, tokenizer, prompt, max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens).tpot)
    return statistics.median(eng), statistics.median(hf), min(eng), min(hf)


def prefix_ttft(model, tokenizer, num_kv_blocks: int, system_len: int = 512, user_len: int = 32, n: int = 6):
    """Mean TTFT of requests sharing a system prompt, sent one at a time, with and without prefix caching."""
    from npukit.engine import SamplingParams

    g = torch.Generator().manual_seed(1)
    system = torch.randint(20, model.config.vocab_size, (system_len,), generator=g).tolist()
    prompts = [system + torch.randint(20, model.config.vocab_size, (user_len,), generator=g).tolist()
               for _ in range(n + 1)]
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    out = {}
    for caching in (False, True):
        llm = make_llm(model, tokenizer, num_kv_blocks, enable_prefix_caching=caching)
        ttfts = [llm.generate([p], params, use_tqdm=False)[0].metrics.ttft for p in prompts]
        out[caching] = statistics.mean(ttfts[1:])  # the first one fills the cache
        del llm
    return out[False], out[True]


# ----------------------------------------------------------------------------------------- main
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct", help="embedded model name or a local folder")
    ap.add_argument("--dtype", default="auto", help="float32 | bfloat16 | both | auto (float32, and bfloat16 "
                    "too when this CPU has native bf16)")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, nargs=2, default=(32, 512))
    ap.add_argument("--output-len", type=int, nargs=2, default=(16, 256))
    ap.add_argument("--batch-sizes", type=int, nargs="*", default=(8, 16), help="HF static batch sizes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--quick", action="store_true", help="16 prompts of 32-256, outputs 16-64, fewer extras")
    ap.add_argument("--skip", nargs="*", default=(), choices=("static", "continuous", "tpot", "prefix", "vllm"))
    args = ap.parse_args(argv)
    if args.quick:
        args.num_prompts, args.prompt_len, args.output_len = min(args.num_prompts, 16), (32, 256), (16, 64)
    if args.threads:
        torch.set_num_threads(args.threads)

    import npukit
    from npukit.device import cpu_has_fast_bf16

    if args.dtype == "auto":
        dtypes = ["float32"] + (["bfloat16"] if cpu_has_fast_bf16() else [])
    elif args.dtype == "both":
        dtypes = ["float32", "bfloat16"]
    else:
        dtypes = [args.dtype]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, cpu bf16 native: {cpu_has_fast_bf16()}")
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load > cores / 2 and torch.get_num_threads() > 1:
        print(f"  NOTE: load average {load:.1f} on {cores} cores: with several threads, other processes stall every "
              "parallel op (we saw 10x slower steps); --threads 1 and the 'cpu s' columns are steadier here")

    for dtype_name in dtypes:
        model, tok = npukit.load_model(args.model, device="cpu", dtype=dtype_name)
        dtype = model.dtype
        wl = make_workload(model.config.vocab_size, args.num_prompts, args.prompt_len, args.output_len, args.seed)
        max_len = args.prompt_len[1] + args.output_len[1]
        block_size = 16
        # KV cache sized so every request of the workload fits at once (no preemption), +10 %.
        need = sum((len(p) + o + block_size - 1) // block_size for p, o in zip(wl.prompts, wl.max_tokens))
        num_kv_blocks = int(need * 1.1) + 1
        print(f"\n=== {args.model} {dtype_name}: {len(wl.prompts)} requests, prompts {args.prompt_len[0]}-"
              f"{args.prompt_len[1]} ({wl.num_prompt_tokens} tokens), outputs {args.output_len[0]}-"
              f"{args.output_len[1]} ({wl.num_output_tokens} tokens), greedy, ignore_eos ===")

        results = [run_engine(model, tok, wl, num_kv_blocks)]
        eng = results[0]
        print(f"  {eng.name}: {eng.wall_s:.1f} s", flush=True)
        if "static" not in args.skip:
            for b in args.batch_sizes:
                results.append(run_hf_static(model, tok, wl, b))
                print(f"  {results[-1].name}: {results[-1].wall_s:.1f} s", flush=True)
        if "continuous" not in args.skip:
            r = run_hf_continuous(model, wl, num_kv_blocks * block_size)
            if r is not None:
                results.append(r)
                print(f"  {r.name}: {r.wall_s:.1f} s", flush=True)
        if "vllm" not in args.skip:
            r = run_vllm(str(model.load_report.path) if hasattr(model, "load_report") else args.model, wl, dtype)
            if r is None:
                print("  vLLM: not importable here, skipped (optional peer)")
            else:
                results.append(r)

        print(f"\n  {'':44s} {'wall s':>8s} {'out tok/s':>10s} {'npukit speedup':>15s} {'cpu s':>8s} "
              f"{'speedup (cpu s)':>16s}")
        for r in results:
            print(f"  {r.name:44s} {r.wall_s:8.1f} {r.tok_s:10.1f} {eng.tok_s / r.tok_s:14.2f}x {r.cpu_s:8.1f} "
                  f"{r.cpu_s / eng.cpu_s:15.2f}x")

        for r in results:
            if "padded_prompt_tokens" in r.extra:
                print(f"  ({r.name}: {r.extra['padded_prompt_tokens']} prompt and {r.extra['computed_output_tokens']} "
                      f"output token slots computed for {wl.num_prompt_tokens} and {wl.num_output_tokens} real ones)")
        rec: StepRecorder = eng.extra["recorder"]
        flops = useful_flops(model.config, wl)
        peak = matmul_flops_per_s(dtype, model.config.hidden_size, model.config.intermediate_size)
        out_all, prep_all, n_all = rec.outside_forward()
        full = max(s["entries"] for s in rec.steps)
        out_full, prep_full, n_full = rec.outside_forward(full_decode_of=full)
        pre = [s for s in rec.steps if s["tokens"] > s["decodes"]]
        dec = [s for s in rec.steps if s["tokens"] == s["decodes"]]
        print(f"\n  engine steps {eng.extra['steps']} ({len(pre)} with prefill: {sum(s['step'] for s in pre):.1f} s; "
              f"{len(dec)} decode-only: {sum(s['step'] for s in dec):.1f} s), preemptions {eng.extra['preemptions']}, "
              f"mean TTFT {statistics.mean(eng.extra['ttft']):.2f} s (all requests arrive at t=0)")
        print(f"  step time outside the model forward: {out_all:.1%} over all {n_all} steps; "
              f"{out_full:.1%} over the {n_full} decode steps with {full} running sequences "
              f"(index building inside execute_model: {prep_full:.1%} more)")
        print(f"  useful model FLOP/s {flops / eng.wall_s / 1e9:.1f} G vs matmul {peak / 1e9:.1f} G "
              f"in this process ({dtype_name}, {torch.get_num_threads()} threads): {flops / eng.wall_s / peak:.0%}")

        # KV cache: how many sequences fit in the same bytes, paged vs a contiguous max-length cache.
        mean_len = statistics.mean(len(p) + o for p, o in zip(wl.prompts, wl.max_tokens))
        mean_blocks = statistics.mean((len(p) + o + block_size - 1) // block_size
                                      for p, o in zip(wl.prompts, wl.max_tokens))
        slots = num_kv_blocks * block_size
        model_max = int(getattr(model.config, "max_position_embeddings", max_len))
        print(f"  KV cache {num_kv_blocks} blocks x {block_size} = {slots} token slots: peak use "
              f"{eng.extra['peak_kv_usage']:.0%}, mean fill of used blocks {eng.extra['mean_kv_util']:.1%}, "
              f"peak running {eng.extra['peak_running']}")
        print(f"  sequences that fit in those bytes: paged ~{num_kv_blocks / mean_blocks:.0f} (mean length "
              f"{mean_len:.0f}); contiguous per-request max length {max_len}: {slots // max_len}; "
              f"contiguous max_position_embeddings {model_max}: {slots // model_max}")

        if "tpot" not in args.skip:
            rounds = 2 if args.quick else 3
            e_med, h_med, e_min, h_min = batch1_tpot(model, tok, 128, 32 if args.quick else 64, rounds, 64)
            print(f"  batch-1 TPOT (prompt 128): npukit {e_med * 1e3:.1f} ms vs HF generate {h_med * 1e3:.1f} ms "
                  f"(median of {rounds}): {e_med / h_med:.2f}x; best {e_min * 1e3:.1f} vs {h_min * 1e3:.1f} ms")
        if "prefix" not in args.skip:
            cold, warm = prefix_ttft(model, tok, 128, n=3 if args.quick else 6)
            print(f"  TTFT, shared 512-token system prompt + 32 tokens: no prefix caching {cold * 1e3:.0f} ms, "
                  f"prefix caching {warm * 1e3:.0f} ms ({cold / warm:.1f}x faster)")
        del model
        gc.collect()


if __name__ == "__main__":
    main()
