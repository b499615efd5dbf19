"""The tuning levers side by side in one run: quantization (W8A16 / W8A8) and, later, graph mode.

    python benchmarks/bench_levers.py                                   # SmolLM2
    python benchmarks/bench_levers.py --model qwen2-1024x8 --threads 1
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/bench_levers.py   # an AVX2-only CPU

For each variant (a base dtype + quantization): batch-1 decode TPOT (median of --rounds, --new-tokens
greedy tokens after a --prompt-len prompt) and throughput with --batch sequences decoding together
(prompts of --prompt-len, --new-tokens each, all admitted at once), in process CPU time (steadier than
wall time on a shared machine; with --threads 1 it is the time the work took) and wall time. Ratios are
against the first variant (the unquantised dtype="auto" path). --mixed also runs npukit's 64-request
mixed workload (`npukit bench throughput`'s, seed 0) on the first and the listed variants.
"""
from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import npukit  # noqa: E402
from npukit.bench.workload import Workload, greedy_params, make_workload, run_workload  # noqa: E402
from npukit.engine import LLM  # noqa: E402

VARIANTS = {  # name -> (dtype, quantization, extra engine args; quantize_lm_head goes to load_model)
    "auto": ("auto", None, {}),
    "fp32": ("float32", None, {}),
    "w8a16": ("auto", "w8a16", {}),
    "w8a16-fp32": ("float32", "w8a16", {}),
    "w8a8": ("auto", "w8a8", {}),
    "w8a8-fp32": ("float32", "w8a8", {}),
    "w8a16+lm_head": ("auto", "w8a16", {"quantize_lm_head": True}),  # lm_head int8 too (opt-in, costs top-1)
    "w8a8+lm_head": ("auto", "w8a8", {"quantize_lm_head": True}),
}


def timed(fn):
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def measure(name: str, model_name: str, args) -> dict:
    dtype, quant, extra = VARIANTS[name]
    extra = dict(extra)
    head = extra.pop("quantize_lm_head", False)  # a load_model setting, not an engine one
    (model, tok), load_s, _ = timed(lambda: npukit.load_model(model_name, device=args.device, dtype=dtype,
                                                              quantization=quant, quantize_lm_head=head))
    cpu_clock = model.device.type == "cpu"  # NOTE: on an accelerator the process's CPU time says nothing
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    prompts = [torch.randint(100, min(vocab, 30000), (args.prompt_len,), generator=g).tolist()
               for _ in range(args.batch)]
    llm = LLM(model, tok, num_kv_blocks=args.batch * ((args.prompt_len + args.new_tokens) // 16 + 2),
              max_num_seqs=args.batch, enable_prefix_caching=False, **extra)
    params = greedy_params(args.new_tokens)
    llm.generate([prompts[0][:8]], greedy_params(2), use_tqdm=False)  # warm-up
    tpots = []
    for r in range(args.rounds):
        out, wall, cpu = timed(functools.partial(llm.generate, [prompts[r]], params, use_tqdm=False))
        m = out[0].metrics
        tpots.append(m.tpot * (cpu / wall if cpu_clock else 1))  # NOTE: scaled to CPU time (shared machine)
    _, wall, cpu = timed(lambda: llm.generate(prompts, params, use_tqdm=False))
    cpu = cpu if cpu_clock else wall
    row = {"variant": name, "dtype": str(model.dtype).removeprefix("torch."), "load_s": load_s,
           "weights_MiB": model.load_report.weight_bytes / 2**20,
           "kernels": getattr(getattr(model, "quant_report", None), "kernels", "-"),
           "tpot_ms": 1e3 * statistics.median(tpots), "tpot_range_ms": (1e3 * min(tpots), 1e3 * max(tpots)),
           f"tok_s_at_{args.batch}_cpu": args.batch * args.new_tokens / cpu,
           f"tok_s_at_{args.batch}_wall": args.batch * args.new_tokens / wall}
    if args.mixed and (name == args.variants[0] or name in args.mixed):
        wl = make_workload(tok, 64, (32, 512), (16, 256), seed=0)
        need = sum((len(p) + o) // 16 + 2 for p, o in zip(wl.prompts, wl.max_tokens))
        llm2 = LLM(model, tok, num_kv_blocks=need, max_num_seqs=64, **extra)
        run_workload(llm2, Workload([wl.prompts[0][:16]], [2]), label="warm-up")
        llm2.reset_prefix_cache()
        run, wall, cpu = timed(lambda: run_workload(llm2, wl, label=name))
        cpu = cpu if cpu_clock else wall
        row["mixed_out_tok_s_wall"] = run.num_output_tokens / wall
        row["mixed_out_tok_s_cpu"] = run.num_output_tokens / cpu
    return row


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--variants", nargs="+", default=["auto", "fp32", "w8a16", "w8a16-fp32", "w8a8", "w8a8-fp32"],
                    choices=list(VARIANTS))
    ap.add_argument("--device", default="cpu", help="cpu (default), cuda, npu: on an accelerator the "
                    "'cpu' columns are wall time")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--mixed", nargs="*", default=None, metavar="VARIANT",
                    help="also run the 64-request mixed workload on the first variant and these")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from npukit.device import cpu_has_fast_bf16

    print(f"torch {torch.__version__}, {args.threads} thread(s), native bf16: {cpu_has_fast_bf16()}, "
          f"capability: {torch.backends.cpu.get_cpu_capability()}, model {args.model}")
    rows = [measure(v, args.model, args) for v in args.variants]
    base = rows[0]
    key = f"tok_s_at_{args.batch}_cpu"
    for r in rows:
        line = (f"{r['variant']:<11} {r['dtype']:<9} weights {r['weights_MiB']:7.1f} MiB  "
                f"TPOT(b=1) {r['tpot_ms']:6.2f} ms [{r['tpot_range_ms'][0]:.2f}-{r['tpot_range_ms'][1]:.2f}] "
                f"({r['tpot_ms'] / base['tpot_ms']:.2f}x)  {key} {r[key]:7.1f} ({r[key] / base[key]:.2f}x) "
                f"wall {r[f'tok_s_at_{args.batch}_wall']:7.1f}")
        if "mixed_out_tok_s_cpu" in r:
            line += (f"  mixed {r['mixed_out_tok_s_cpu']:.1f} tok/s cpu "
                     f"({r['mixed_out_tok_s_cpu'] / base['mixed_out_tok_s_cpu']:.2f}x), "
                     f"{r['mixed_out_tok_s_wall']:.1f} wall")
        print(line + f"  [{r['kernels']}]", flush=True)


if __name__ == "__main__":
    main()
