"""The tuning levers side by side in one run: quantization (W8A16 / W8A8) and graph mode.

    python benchmarks/bench_levers.py                                   # SmolLM2
    python benchmarks/bench_levers.py --variants fp32 w8a16-fp32 --graph --threads 2   # each with graph mode too
    python benchmarks/bench_levers.py --model qwen2-1024x8 --threads 1
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/bench_levers.py   # an AVX2-only CPU

For each variant (a base dtype + quantization): batch-1 decode TPOT (median of --rounds, --new-tokens
greedy tokens after a --prompt-len prompt) and throughput with --batch sequences decoding together
(prompts of --prompt-len, --new-tokens each, all admitted at once; median of --rounds), in process CPU time
(steadier than wall time on a shared machine; with --threads 1 it is the time the work took) and wall time.
All variants are loaded first and their rounds interleaved, so a slow stretch of a shared machine falls on
every variant. Ratios are against the first variant (the unquantised dtype="auto" path). --mixed also runs
npukit's 64-request mixed workload (`npukit bench throughput`'s, seed 0) on the first and the listed variants.
--graph adds each variant's twin "<variant>+graph" with graph mode on (enforce_eager=False, the default capture
sizes up to --batch; on a CPU in fp32 the replay of bound kernel calls, npukit.engine.cpu_graph).
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
    "bf16": ("bfloat16", None, {}),
    "w8a16": ("auto", "w8a16", {}),
    "w8a16-fp32": ("float32", "w8a16", {}),
    "w8a16-bf16": ("bfloat16", "w8a16", {}),
    "w8a8": ("auto", "w8a8", {}),
    "w8a8-fp32": ("float32", "w8a8", {}),
    "w8a8-bf16": ("bfloat16", "w8a8", {}),
    "w8a16+lm_head": ("auto", "w8a16", {"quantize_lm_head": True}),  # lm_head int8 too (opt-in, costs top-1)
    "w8a16+bf16_head": ("auto", "w8a16", {"quantize_lm_head": "bf16"}),  # lm_head stored in bf16
    "w8a8+lm_head": ("auto", "w8a8", {"quantize_lm_head": True}),
}
GRAPH = "+graph"  # a variant's twin with graph mode on (--graph)


def timed(fn):
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


class Variant:
    """One loaded variant and its engine; the rounds of every variant are interleaved (see main), so the drift of
    a shared machine's speed falls on all of them alike instead of on whichever ran in a slow minute."""

    def __init__(self, name: str, model_name: str, args):
        dtype, quant, extra = VARIANTS[name.removesuffix(GRAPH)]
        self.extra = dict(extra, **({"enforce_eager": False} if name.endswith(GRAPH) else {}))
        head = self.extra.pop("quantize_lm_head", False)  # a load_model setting, not an engine one
        (self.model, self.tok), self.load_s, _ = timed(lambda: npukit.load_model(
            model_name, device=args.device, dtype=dtype, quantization=quant, quantize_lm_head=head))
        self.name, self.args = name, args
        self.cpu_clock = self.model.device.type == "cpu"  # NOTE: on an accelerator the process's CPU time says nothing
        g = torch.Generator().manual_seed(0)
        vocab = self.model.config.vocab_size
        self.prompts = [torch.randint(100, min(vocab, 30000), (args.prompt_len,), generator=g).tolist()
                        for _ in range(args.batch)]
        self.llm = LLM(self.model, self.tok, num_kv_blocks=args.batch * ((args.prompt_len + args.new_tokens) // 16 + 2),
                       max_num_seqs=args.batch, enable_prefix_caching=False, **self.extra)
        self.params = greedy_params(args.new_tokens)
        self.llm.generate([self.prompts[0][:8]], greedy_params(2), use_tqdm=False)  # warm-up
        self.tpots, self.batch_runs = [], []

    def tpot_round(self, r: int) -> None:
        out, wall, cpu = timed(functools.partial(self.llm.generate, [self.prompts[r % len(self.prompts)]], self.params,
                                                 use_tqdm=False))
        self.tpots.append(out[0].metrics.tpot * (cpu / wall if self.cpu_clock else 1))  # NOTE: scaled to CPU time

    def batch_round(self) -> None:
        _, wall, cpu = timed(lambda: self.llm.generate(self.prompts, self.params, use_tqdm=False))
        self.batch_runs.append((wall, cpu if self.cpu_clock else wall))

    def row(self) -> dict:
        args, tokens = self.args, self.args.batch * self.args.new_tokens
        wall, cpu = (statistics.median(t) for t in zip(*self.batch_runs))
        row = {"variant": self.name, "dtype": str(self.model.dtype).removeprefix("torch."), "load_s": self.load_s,
               "weights_MiB": self.model.load_report.weight_bytes / 2**20,
               "kernels": getattr(getattr(self.model, "quant_report", None), "kernels", "-"),
               "tpot_ms": 1e3 * statistics.median(self.tpots),
               "tpot_range_ms": (1e3 * min(self.tpots), 1e3 * max(self.tpots)),
               f"tok_s_at_{args.batch}_cpu": tokens / cpu, f"tok_s_at_{args.batch}_wall": tokens / wall}
        if args.mixed is not None and (self.name == args.variants[0] or self.name in args.mixed):
            wl = make_workload(self.tok, 64, (32, 512), (16, 256), seed=0)
            need = sum((len(p) + o) // 16 + 2 for p, o in zip(wl.prompts, wl.max_tokens))
            llm2 = LLM(self.model, self.tok, num_kv_blocks=need, max_num_seqs=64, **self.extra)
            run_workload(llm2, Workload([wl.prompts[0][:16]], [2]), label="warm-up")
            llm2.reset_prefix_cache()
            run, wall, cpu = timed(lambda: run_workload(llm2, wl, label=self.name))
            cpu = cpu if self.cpu_clock else wall
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
    ap.add_argument("--graph", action="store_true", help="also run each variant with graph mode on (<variant>+graph)")
    args = ap.parse_args(argv)
    if args.graph:
        args.variants = [n for v in args.variants for n in (v, v + GRAPH)]
    torch.set_num_threads(args.threads)
    from npukit.device import cpu_has_fast_bf16

    print(f"torch {torch.__version__}, {args.threads} thread(s), native bf16: {cpu_has_fast_bf16()}, "
          f"capability: {torch.backends.cpu.get_cpu_capability()}, model {args.model}")
    variants = [Variant(v, args.model, args) for v in args.variants]
    for r in range(args.rounds):  # round r of every variant, then round r + 1: interleaved
        for v in variants:
            v.tpot_round(r)
    for _ in range(args.rounds):
        for v in variants:
            v.batch_round()
    rows = [v.row() for v in variants]
    base = rows[0]
    key = f"tok_s_at_{args.batch}_cpu"
    for r in rows:
        line = (f"{r['variant']:<17} {r['dtype']:<9} weights {r['weights_MiB']:7.1f} MiB  "
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
