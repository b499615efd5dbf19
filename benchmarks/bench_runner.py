"""The paged runner alone: step time by batch shape, where it goes, and FLOP/s vs the matmul peak.

    python benchmarks/bench_runner.py                          # SmolLM2, float32 and bfloat16 (when native)
    python benchmarks/bench_runner.py --dtype bfloat16 --threads 2 --batches 1 16 64 --context 256
    python benchmarks/bench_runner.py --dtype float32 --threads 2 --batches 1 2 4 8 16 32 64 --context 64 --cpu-kernels
    python benchmarks/bench_runner.py --dtype float32 --threads 2 --batches 4 8 16 32 48 --cpu-kernels panel

For each dtype: one prefill step of --prefill-tokens tokens (as --prefill-seqs prompts) and decode steps of
B sequences with --context tokens each (non-contiguous blocks). Each is timed as the median of --repeat
runs in process CPU time (steadier than wall time on a shared machine) and reported with its useful model
FLOP/s next to the F.linear throughput measured in the same process, dtype and thread count. The decode
rows also show the time with attention skipped (K/V still written): the share attention takes. With
--cpu-kernels they also show the step's wall time with every linear through F.linear (with kernel names, e.g.
`--cpu-kernels panel`: with the table the probe makes without them, in a second runner), timed in turn with
the default (fp32 CPU linears run the kernel the runner's probe found fastest for their row count: F.linear,
``(W @ x.T).T``, oneDNN on a packed copy or npukit's panel kernel, see ``npukit.engine.cpu_gemm``); the choice
is printed.
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

from npukit.bench.flops import matmul_flops_per_s, step_flops  # noqa: E402


def _median_time(fn, repeat: int, clock=time.process_time) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t = clock()
        fn()
        times.append(clock() - t)
    return statistics.median(times)


def _ab(fn_a, fn_b, repeat: int) -> tuple[float, float]:
    """Median wall times of fn_a and fn_b, run in turn (this machine's speed drifts within minutes)."""
    times = ([], [])
    for _ in range(repeat):
        for i, fn in enumerate((fn_a, fn_b)):
            times[i].append(_median_time(fn, 1, time.perf_counter))
    return statistics.median(times[0]), statistics.median(times[1])


def _f_linear_only(runner, fn):
    """fn with every fp32 CPU linear of the runner on F.linear (their kernel tables emptied meanwhile)."""
    linears = _cpu_linears(runner)
    chosen = [lin.kernels for lin in linears]
    for lin in linears:
        lin.kernels = {}
    try:
        return fn()
    finally:
        for lin, kernels in zip(linears, chosen):
            lin.kernels = kernels


def _runner_without(model, leave_out: list[str], **kw):
    """A second runner whose probe may not choose the kernels in leave_out (e.g. panel)."""
    from npukit.engine import cpu_gemm
    from npukit.engine.runner import ModelRunner

    saved = cpu_gemm.KERNELS, cpu_gemm.ROW_KERNELS
    cpu_gemm.KERNELS, cpu_gemm.ROW_KERNELS = (tuple(k for k in ks if k not in leave_out) for ks in saved)
    try:
        return ModelRunner(model, **kw)
    finally:
        cpu_gemm.KERNELS, cpu_gemm.ROW_KERNELS = saved


def _cpu_linears(runner) -> list:
    from npukit.engine.cpu_gemm import CpuLinear

    found = [runner.lm_head_w] + [v for lw in runner.layers for v in vars(lw).values()]
    return [v for v in found if isinstance(v, CpuLinear)]


def _chosen(linear) -> str:
    """A CpuLinear's kernel table as 'packed 1-15, 17-23; swapped 16, 24' ('F.linear' for a plain weight)."""
    by_kernel: dict[str, list[int]] = {}
    for rows, kernel in getattr(linear, "kernels", {}).items():
        by_kernel.setdefault(kernel, []).append(rows)
    return "; ".join(f"{k} {_ranges(rows)}" for k, rows in sorted(by_kernel.items())) or "F.linear"


def _ranges(rows) -> str:
    """{2, 3, 4, 16, 24} -> '2-4, 16, 24'."""
    out, rows = [], sorted(rows)
    for r in rows:
        if out and r == out[-1][1] + 1:
            out[-1][1] = r
        else:
            out.append([r, r])
    return ", ".join(f"{a}-{b}" if a != b else str(a) for a, b in out) or "none"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--dtype", default="auto", help="float32 | bfloat16 | both | auto")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--batches", type=int, nargs="*", default=(1, 16, 64))
    ap.add_argument("--context", type=int, default=256, help="tokens already in the cache per decode sequence")
    ap.add_argument("--prefill-tokens", type=int, default=2048)
    ap.add_argument("--prefill-seqs", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--cpu-kernels", nargs="*", metavar="LEAVE_OUT", default=None,
                    help="also time decode steps against another kernel table, in turn: alone, F.linear only; with "
                         "kernel names (e.g. panel), the table the probe makes without them")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    import npukit
    from npukit.device import cpu_has_fast_bf16
    from npukit.engine.runner import ModelRunner
    from npukit.engine.sequence import Sequence

    dtypes = {"auto": ["float32"] + (["bfloat16"] if cpu_has_fast_bf16() else []),
              "both": ["float32", "bfloat16"]}.get(args.dtype, [args.dtype])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; times are median process CPU time")
    for name in dtypes:
        model, _ = npukit.load_model(args.model, device="cpu", dtype=name)
        cfg, bs = model.config, 16
        peak = matmul_flops_per_s(model.dtype, cfg.hidden_size, cfg.intermediate_size)
        g = torch.Generator().manual_seed(0)
        per_seq = (max(args.context + 1, args.prefill_tokens // args.prefill_seqs) + bs) // bs
        num_blocks = per_seq * max(max(args.batches), args.prefill_seqs)
        runner = ModelRunner(model, block_size=bs, num_kv_blocks=num_blocks)
        other = None
        if args.cpu_kernels:
            other = _runner_without(model, args.cpu_kernels, block_size=bs, num_kv_blocks=num_blocks)
        free = torch.randperm(num_blocks, generator=g).tolist()  # non-contiguous tables

        def make(n_tokens: int, i: int, cfg=cfg, g=g, free=free, per_seq=per_seq) -> Sequence:
            s = Sequence(f"s{i}", torch.randint(20, cfg.vocab_size, (n_tokens,), generator=g).tolist(), None)
            s.block_table = free[i * per_seq:(i + 1) * per_seq]
            return s

        print(f"\n{args.model} {name}: F.linear peak here {peak / 1e9:.0f} GFLOP/s")
        for tag, r in (("kernels", runner), (f"without {' '.join(args.cpu_kernels or [])}", other)):
            if args.cpu_kernels is not None and r is not None:
                lw = r.layers[0]
                print(f"  {tag} by rows: o/mlp {_chosen(lw.o_w)}; q/k/v {_chosen(lw.q_w)}; "
                      f"lm_head {_chosen(r.lm_head_w)}; packed copies {r.packed_bytes / 2**20:.0f} MiB")
        n = args.prefill_tokens // args.prefill_seqs
        batch = [(make(n, i), n) for i in range(args.prefill_seqs)]
        t = _median_time(lambda runner=runner, batch=batch: runner.execute_model(batch), args.repeat)
        f = step_flops(cfg, batch)
        print(f"  prefill {args.prefill_seqs} x {n} tokens: {t * 1e3:8.1f} ms  {n * args.prefill_seqs / t:8.0f} tok/s  "
              f"{f / t / 1e9:6.0f} GFLOP/s = {f / t / peak:4.0%} of peak")
        attention = runner._attention
        for b in args.batches:
            batch = []
            for i in range(b):
                s = make(args.context + 1, i)
                s.num_computed_tokens = args.context
                batch.append((s, 1))
            step = functools.partial(runner.execute_model, batch)
            ab = ""
            t = _median_time(step, args.repeat)
            if args.cpu_kernels is not None:  # in wall time, each table in turn
                if other is None:
                    base, label = functools.partial(_f_linear_only, runner, step), "F.linear only"
                else:
                    base, label = functools.partial(other.execute_model, batch), "without " + " ".join(args.cpu_kernels)
                t_wall, t_base = _ab(step, base, args.repeat)
                ab = f"; wall {t_wall * 1e3:6.1f} ms, {label} {t_base * 1e3:6.1f} ({t_wall / t_base:.2f}x)"
            runner._attention = lambda i, w, q, k, v, inp: q.reshape(q.shape[0], -1)  # skip attention only
            t_no = _median_time(step, args.repeat)
            runner._attention = attention
            f = step_flops(cfg, batch)
            print(f"  decode B={b:3d} ctx={args.context}: {t * 1e3:8.1f} ms  {b / t:8.0f} tok/s  "
                  f"{f / t / 1e9:6.0f} GFLOP/s = {f / t / peak:4.0%} of peak; "
                  f"attention {1 - t_no / t:4.0%} of the step{ab}")
        runner = model = None  # free them before the next dtype loads


if __name__ == "__main__":
    main()
