"""How long one decode step takes with 1, 2, 4 ... 64 sequences in the batch: the premise of batching.

    points = decode_step_times(model, tokenizer, batch_sizes=(1, 2, 4, 8, 16, 32, 64))
    for p in points: print(p)                      # median and range over `repeats` timed steps
    viz.draw_step_times(points)                    # the plot of notebook 06

Decoding reads every weight once per step whatever the batch, so while the weights dominate (small
batches: *memory-bound*) extra sequences are almost free; once the matrix units are busy (large batches:
*compute-bound*) the step time grows with the batch. Where the bend is depends on the device, the
precision and the model; this measures it with npukit's own engine (paged KV cache, real decode steps).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

from npukit import device as device_mod
from npukit.metrics import summarize

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)


@dataclass
class StepTime:
    """Decode step times (seconds) measured with ``batch`` sequences decoding together."""

    batch: int
    context_len: int
    times: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return summarize(self.times).median

    @property
    def min(self) -> float:
        return min(self.times)

    @property
    def max(self) -> float:
        return max(self.times)

    @property
    def tokens_per_s(self) -> float:
        """Decode throughput at this batch: one token per sequence per step."""
        return self.batch / self.median

    def __str__(self) -> str:
        return (f"batch {self.batch:>3}: step {self.median * 1e3:.1f} ms (range {self.min * 1e3:.1f}-"
                f"{self.max * 1e3:.1f} ms, n={len(self.times)}) | {self.tokens_per_s:.1f} tok/s")


def decode_step_times(model, tokenizer, batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES, *,
                      context_len: int = 32, repeats: int = 3, warmup: int = 1,
                      block_size: int = 16) -> list[StepTime]:
    """Time ``repeats`` decode steps (after ``warmup`` untimed ones) for each batch size.

    Each batch size gets a fresh engine holding ``batch`` requests of ``context_len`` prompt tokens; they
    are prefilled first (not timed), then every step decodes one token for each of them. The device is
    synchronised before each clock read, so asynchronous NPU / GPU kernels are counted in full.
    """
    from npukit.engine import LLM, SamplingParams

    if repeats < 1 or warmup < 0 or context_len < 1 or not batch_sizes or min(batch_sizes) < 1:
        raise ValueError("need repeats >= 1, warmup >= 0, context_len >= 1 and batch sizes >= 1")
    vocab = model.get_input_embeddings().weight.shape[0]
    steps = warmup + repeats
    blocks_per_seq = -(-(context_len + steps + 1) // block_size)
    dev = model.device
    points = []
    for batch in batch_sizes:
        llm = LLM(model, tokenizer, max_num_seqs=batch, num_kv_blocks=batch * blocks_per_seq + 1,
                  block_size=block_size, max_num_batched_tokens=max(2048, batch * context_len),
                  enable_prefix_caching=False)
        params = SamplingParams(temperature=0, max_tokens=steps + 1, ignore_eos=True)
        for i in range(batch):  # distinct prompts, so no two sequences are the same
            llm.add_request([(7 + 31 * i + 13 * j) % vocab for j in range(context_len)], params)
        produced: set[str] = set()
        while len(produced) < batch:  # prefill (possibly over several steps): not timed
            produced.update(o.request_id for o in llm.step())
        point = StepTime(batch, context_len)
        for k in range(steps):
            device_mod.synchronize(dev)
            t0 = time.perf_counter()
            outs = llm.step()
            device_mod.synchronize(dev)
            if len(outs) != batch:
                raise RuntimeError(f"a decode step served {len(outs)} of {batch} sequences: not a clean measurement")
            if k >= warmup:
                point.times.append(time.perf_counter() - t0)
        points.append(point)
    return points


def bend(points: Sequence[StepTime], tolerance: float = 1.5) -> int | None:
    """The first batch whose median step takes over ``tolerance`` × the smallest batch's: where the
    compute-bound region starts (None while every batch stays within it: still memory-bound)."""
    base = points[0].median
    return next((p.batch for p in points if p.median > tolerance * base), None)


def step_gaps(result) -> dict[str, int]:
    """For each request of a run (``run_workload``'s result), the longest wait between two of its
    tokens, counted in engine steps: 1 when it got a token at every step, more when it was preempted
    (it waits in the queue, then its recompute joins a step). Counts, so the same on every machine."""
    seen: dict[str, list[int]] = {}
    for record in result.steps:
        for rid in record.request_ids:
            seen.setdefault(rid, []).append(record.step)
    return {rid: max((b - a for a, b in zip(steps, steps[1:])), default=0) for rid, steps in seen.items()}
