"""fp32 linears on CPU: ``x @ W.T`` (F.linear) or the same product in the other operand order, ``(W @ x.T).T``.

Both orders compute the same sums; which one the BLAS runs faster depends on the CPU, the library and the
number of rows. SmolLM2's o/gate/up/down projections of all 30 layers and its lm_head, two threads, torch's
MKL, milliseconds per step (weights streamed from memory, as in a decode step):

| rows | Xeon (AVX512) decoder linears | EPYC (AVX2) decoder linears | EPYC lm_head      |
|------|-------------------------------|-----------------------------|-------------------|
| 2-5  | about even                    | 42-50 -> 24-35              | 18-29 -> 7-11     |
| 8-14 | swapped up to 1.6x faster     | swapped 1.0-1.4x slower     | 20-24 -> 14-22    |
| 16, 32, 48, 64 | swapped faster      | 45-94 -> 36-82              | 21-41 -> 15-28    |

(The Xeon row is last session's bench_runner A/B; the EPYC rows are from this module's kind of timing.)
Part of the gap is threads: MKL ran some few-row products on one thread, the swapped order on both.

A table from one CPU is wrong on the next (and nobody measured ARM hosts' BLAS), so the runner asks this
module once per process, weight shapes and thread count: ``swapped_rows`` times both orders on the model's
own weights (a few layers, enough to stream from memory as a step does) at a few row counts of each
bucket, and returns the buckets where the swapped order won clearly. The result is a transposed view:
callers that need rows (q/k/v feed attention) keep F.linear. About a second for SmolLM2.
"""
from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

# (the row counts a bucket decides, the ones timed for it). One row count's timing swings from run to run, a
# bucket's sum does not. From 16 rows on, multiples of 8 get their own bucket: there MKL's swapped order won
# clearly and was even or lost at most other counts. Steps of more rows than the buckets hold keep F.linear.
BUCKETS = (
    (range(2, 4), (2, 3)),
    (range(4, 8), (4, 6)),
    (range(8, 16), (8, 12)),
    (range(16, 65, 8), (16, 32, 48)),
    (tuple(m for m in range(17, 65) if m % 8), (20, 33, 50)),
)
MARGIN = 0.92     # a bucket swaps only where the swapped order took at most this fraction of F.linear's time
PROBE_BYTES = 48 << 20  # about this many bytes of weights per timing: more than a CPU's caches hold
REPEAT = 3
_cache: dict[tuple, frozenset[int]] = {}


def swapped_rows(weights: list[torch.Tensor], threads: int) -> frozenset[int]:
    """Row counts at which ``(W @ x.T).T`` beat ``F.linear(x, W)`` by MARGIN over these fp32 CPU weights
    ([out, in] each; the first ones that make up PROBE_BYTES are timed, a weight bigger than that on its
    first rows), with ``threads`` torch threads (the caller's count: the answer depends on it). Remembered
    per process, weight shapes and thread count."""
    timed, size = [], 0
    for w in weights:
        rows = max(1, min(w.shape[0], (PROBE_BYTES - size) // (w.shape[1] * w.element_size())))
        timed.append(w[:rows])
        size += timed[-1].nbytes
        if size >= PROBE_BYTES:
            break
    key = (tuple(tuple(w.shape) for w in timed), threads)
    if key not in _cache:
        _cache[key] = _measure(timed, threads)
    return _cache[key]


def _measure(weights: list[torch.Tensor], threads: int) -> frozenset[int]:
    g = torch.Generator().manual_seed(0)
    most = max(max(rows) for _, rows in BUCKETS)
    inputs = {k: torch.randn(most, k, generator=g) for k in {w.shape[1] for w in weights}}
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            won = set()
            for bucket, probe_rows in BUCKETS:
                total = {False: 0.0, True: 0.0}
                for m in probe_rows:
                    xs = [inputs[w.shape[1]][:m] for w in weights]
                    times = {False: [], True: []}
                    for i in range(REPEAT + 1):  # the first round warms up
                        for swapped in (False, True):
                            t = _run(weights, xs, swapped)
                            if i:
                                times[swapped].append(t)
                    for swapped in (False, True):
                        total[swapped] += statistics.median(times[swapped])
                if total[True] <= MARGIN * total[False]:
                    won.update(bucket)
            return frozenset(won)
    finally:
        torch.set_num_threads(before)


def _run(weights, xs, swapped: bool) -> float:
    t = time.perf_counter()
    for w, x in zip(weights, xs):
        if swapped:
            torch.mm(w, x.t())
        else:
            F.linear(x, w)
    return time.perf_counter() - t
