"""How much of a decode step tensor parallelism spends in its collectives, measured on a running LLM."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass


@dataclass
class StepProfile:
    tensor_parallel_size: int
    batch_size: int
    step_seconds: float              # mean decode step, wall time on rank 0
    comm_seconds: list[float]        # per rank, per step: inside all-reduce / gather (waiting for peers included)
    num_all_reduces: int             # per rank, per step

    @property
    def comm_share(self) -> list[float]:
        return [c / self.step_seconds for c in self.comm_seconds]

    def __str__(self) -> str:
        shares = ", ".join(f"rank {r}: {s:.0%}" for r, s in enumerate(self.comm_share))
        return (f"TP {self.tensor_parallel_size}, batch {self.batch_size}: decode step {self.step_seconds * 1e3:.1f} ms, "
                f"{self.num_all_reduces} all-reduces per step; share of the step in collectives: {shares or '-'}")


def step_profile(llm, batch_size: int, *, prompt_len: int = 8, steps: int = 5, seed: int = 0) -> StepProfile:
    """Prefill ``batch_size`` random prompts of ``prompt_len`` tokens, then time ``steps`` decode steps
    of the whole batch; the requests are aborted afterwards."""
    import torch

    from ..engine.sampling_params import SamplingParams

    g = torch.Generator().manual_seed(seed)
    params = SamplingParams(temperature=0, max_tokens=steps + 2, ignore_eos=True)
    ids = [llm.add_request(torch.randint(3, llm.vocab_size, (prompt_len,), generator=g).tolist(), params)
           for _ in range(batch_size)]
    runner = llm.runner
    tp = getattr(runner, "tensor_parallel_size", 1)
    try:
        while any(s.num_output_tokens == 0 for r in ids for s in llm.requests[r].seqs):
            llm.step()  # prefill (possibly in chunks)
        if tp > 1:
            runner.reset_comm_stats()
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            llm.step()
            times.append(time.perf_counter() - t0)
        stats = runner.comm_stats() if tp > 1 else []
    finally:
        for r in ids:
            llm.abort(r)
    return StepProfile(tp, batch_size, statistics.fmean(times), [s["comm_seconds"] / steps for s in stats],
                       stats[0]["all_reduces"] // steps if stats else 0)
