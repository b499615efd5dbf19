"""Prefill attention on CPU: npukit's C kernel against SDPA per chunk, inside the runner, in one run.

    python benchmarks/bench_prefill_attention.py                    # SmolLM2, float32 and bfloat16, 2 threads
    python benchmarks/bench_prefill_attention.py --model qwen2-1024x8 --dtype bfloat16 --repeat 7

For each prefill step shape (chunks as ``cached+new`` tokens: a fresh prompt is ``0+n``, a chunk after a cached
prefix ``c+n``) the runner computes the step twice in turn, with its C prefill kernel
(``npukit.engine.cpu_attention.paged_prefill_attention``) and with ``prefill_kernel = None`` (SDPA per chunk, over
its gathered blocks after the first: what runs on other devices). Each line shows the medians of ``--repeat``
rounds of the layers' attention calls (the step's rows, all layers) and of the whole step, with their ratios,
and how far the kernel's step logits are from SDPA's (the same model, two summation orders).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import npukit  # noqa: E402
from npukit.engine.runner import ModelRunner  # noqa: E402
from npukit.engine.sequence import Sequence  # noqa: E402

SHAPES = ["0+502", "0+300,0+128,0+64,0+400", "0+256,0+256,0+256,0+256,0+256,0+256,0+256,0+256", "1500+548",
          "0+37,5+20,100+3"]
BLOCK_SIZE = 16


def _step(runner: ModelRunner, chunks: list[tuple[int, int]], vocab: int):
    """The entries of one prefill step with every chunk's cached prefix already in the KV cache."""
    bs, next_block, batch = runner.block_size, 0, []
    g = torch.Generator().manual_seed(0)
    for i, (cached, n) in enumerate(chunks):
        seq = Sequence(f"s{i}", torch.randint(3, vocab, (cached + n,), generator=g).tolist(), None)
        count = (cached + n + bs - 1) // bs
        seq.block_table = list(range(next_block, next_block + count))
        next_block += count
        if cached:
            runner.execute_model([(seq, cached)])
            seq.num_computed_tokens = cached
        batch.append((seq, n))
    return batch


def _timed_attention(runner: ModelRunner, clock: dict):
    inner = runner._attention

    def attention(*args):
        t = time.perf_counter()
        out = inner(*args)
        clock["attention"] += time.perf_counter() - t
        return out
    return attention


def bench(model, shapes: list[str], repeat: int) -> None:
    vocab = model.config.vocab_size
    for shape in shapes:
        chunks = [tuple(int(x) for x in c.split("+")) for c in shape.split(",")]
        blocks = sum((c + n) // BLOCK_SIZE + 1 for c, n in chunks)
        runner = ModelRunner(model, block_size=BLOCK_SIZE, num_kv_blocks=blocks)
        kernel, clock = runner.prefill_kernel, {"attention": 0.0}
        if kernel is None:
            sys.exit("the C prefill kernel is unavailable here (no C compiler, or NPUKIT_CPU_ATTENTION=0)")
        runner._attention = _timed_attention(runner, clock)
        batch = _step(runner, chunks, vocab)
        times = {"kernel": ([], []), "sdpa": ([], [])}
        logits = {}
        for _ in range(repeat + 1):  # the first round warms up
            for name in times:
                runner.prefill_kernel = kernel if name == "kernel" else None
                clock["attention"] = 0.0
                t = time.perf_counter()
                logits[name] = runner.execute_model(batch)
                step = time.perf_counter() - t
                times[name][0].append(clock["attention"])
                times[name][1].append(step)
        med = {name: [statistics.median(x[1:]) * 1e3 for x in pair] for name, pair in times.items()}
        diff = (logits["kernel"] - logits["sdpa"]).abs().max().item()
        print(f"{model.dtype!s:>15} {shape[:40]:<40} attention {med['kernel'][0]:7.1f} / {med['sdpa'][0]:7.1f} ms "
              f"({med['kernel'][0] / med['sdpa'][0]:.2f}x)  step {med['kernel'][1]:7.1f} / {med['sdpa'][1]:7.1f} ms "
              f"({med['kernel'][1] / med['sdpa'][1]:.2f}x)  max |logit diff| {diff:.1e}", flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--shapes", nargs="+", default=SHAPES, help="steps as chunks 'cached+new,cached+new,...'")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"{args.model}, {args.threads} threads; kernel / SDPA (medians of {args.repeat}, ms)")
    for dtype in args.dtype:
        model, _ = npukit.load_model(args.model, device="cpu", dtype=dtype)
        bench(model, args.shapes, args.repeat)


if __name__ == "__main__":
    main()
