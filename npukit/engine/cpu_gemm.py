"""fp32 linears on CPU: ``x @ W.T`` (F.linear) or the same product in the other operand order, ``(W @ x.T).T``.

Both orders compute the same sums; which one the BLAS runs faster depends on the CPU, the library and the
number of rows. What we measured with SmolLM2 fp32, two threads, torch's MKL:

- a 2-core AMD EPYC (AVX2), the o/gate/up/down projections of all 30 layers and lm_head, weights streamed from
  memory as in a step: 3 rows 46 -> 23 ms and lm_head 27 -> 6 ms; 12-14 rows 43-46 -> 49-63 ms (slower);
  16, 32, 48, 64 rows 45-94 -> 36-82 ms; lm_head faster swapped at every count from 2 to 64. A decode step of
  2-64 sequences with this module's choice took 0.72-0.93x the time of F.linear only
  (``python benchmarks/bench_runner.py --dtype float32 --threads 2 --batches 1 2 4 8 16 32 64 --context 64
  --swapped-rows``).
- a 2-core Xeon (AVX512): decode steps of 8-48 sequences 0.81-0.90x with the decoder linears swapped at 5-48
  rows, and lm_head faster swapped only at 5-12 rows (slower above, and with MKL's AVX2 kernels there).

A table from one CPU is wrong on the next (and nobody measured ARM hosts' BLAS), so the runner asks this
module once per process, weight shapes and thread count: ``swapped_rows`` times both orders on the model's
own weights (a few layers, enough to stream from memory as a step does) at a few row counts of each
bucket, and returns the buckets where the swapped order won clearly. The result is a transposed view:
callers that need rows (q/k/v feed attention) keep F.linear. About two seconds for SmolLM2 (1.8-2.5 s on
the EPYC), milliseconds for a tiny test model.
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
    most = max((max(rows) for _, rows in BUCKETS), default=1)
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
