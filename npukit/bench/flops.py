"""FLOP counting for the benchmarks: the useful model FLOPs of a workload or of one engine step (linears per
token, causal attention over the cached context, lm_head once per sampled token), and the F.linear FLOP/s
this process reaches, to compare against.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    import torch

    from npukit.bench.workload import Workload



def _flop_terms(config) -> tuple[float, float, float]:
    """(linear FLOPs per token, attention FLOPs per (query, key) pair, lm_head FLOPs per sampled token)."""
    c = config
    hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    per_layer = c.hidden_size * hd * (2 * c.num_attention_heads + 2 * c.num_key_value_heads)
    per_layer += 3 * c.hidden_size * c.intermediate_size  # gated MLP: gate, up, down
    return (2 * per_layer * c.num_hidden_layers, 4 * c.num_attention_heads * hd * c.num_hidden_layers,
            2 * c.hidden_size * c.vocab_size)


def useful_flops(config, workload: Workload) -> float:
    """Model FLOPs the workload needs: linears per computed token, causal attention, lm_head once per output
    token. No padding, no recomputation: what any system must do at least."""
    linear, attn, lm_head = _flop_terms(config)
    total = 0.0
    for p, o in zip(workload.prompts, workload.max_tokens):
        n = len(p) + o - 1  # tokens that go through the model (the last sampled one never does)
        total += linear * n + attn * n * (n + 1) / 2 + lm_head * o
    return total


def step_flops(config, batch) -> float:
    """Useful FLOPs of one ``execute_model(batch)`` call, batch = [(seq, num_new_tokens)]: linears per token,
    causal attention over the cached context, lm_head once per entry."""
    linear, attn, lm_head = _flop_terms(config)
    total = 0.0
    for seq, n in batch:
        start = seq.num_computed_tokens
        total += linear * n + attn * sum(range(start + 1, start + n + 1)) + lm_head
    return total


def matmul_flops_per_s(dtype: torch.dtype, k: int, n: int, ms: Sequence[int] = (64, 256, 1024),
                       reps: int = 5) -> float:
    """Best ``F.linear`` FLOP/s over a few row counts: this process, this dtype, this thread count (CPU)."""
    import torch

    best = 0.0
    with torch.inference_mode():
        w = torch.randn(n, k, dtype=dtype)
        for m in ms:
            a = torch.randn(m, k, dtype=dtype)
            torch.nn.functional.linear(a, w)
            iters = max(1, min(200, int(2e9 / (2 * m * k * n))))  # ~2 GFLOP a rep, tiny shapes capped
            for _ in range(reps):
                t = time.perf_counter()
                for _ in range(iters):
                    torch.nn.functional.linear(a, w)
                best = max(best, 2 * m * k * n * iters / (time.perf_counter() - t))
    return best
