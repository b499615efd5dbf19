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
        return (f"TP {self.tensor_parallel_size}, batch {self.batch_size}: "
                f"decode step {self.step_seconds * 1e3:.1f} ms, "
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


class ActivationPeak:
    """Peak bytes of the tensors that torch ops create while it is active (a TorchDispatchMode), leaving out
    the storages of ``existing`` tensors (weights, KV cache): the activations' high-water mark, on any device.

        with ActivationPeak(existing=[*model.parameters(), *llm.runner.kv_cache.k_caches, ...]) as peak:
            llm.generate(...)
        peak.peak_bytes
    """

    def __init__(self, existing=()):
        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                tracker._saw(out)
                return out

        self._mode = _Mode()
        self._external = {t.untyped_storage().data_ptr() for t in existing}
        self._live: dict[int, list[int]] = {}  # storage address -> [bytes, tensors alive that use it]
        self.current_bytes = self.peak_bytes = 0

    def _saw(self, out) -> None:
        import weakref

        import torch
        from torch.utils._pytree import tree_leaves

        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key in self._external:
                continue  # NOTE: in-place ops on the KV cache return views of it: not new memory
            if key in self._live:
                self._live[key][1] += 1
            else:
                self._live[key] = [storage.nbytes(), 1]
                self.current_bytes += storage.nbytes()
                self.peak_bytes = max(self.peak_bytes, self.current_bytes)
            weakref.finalize(t, self._release, key)

    def _release(self, key: int) -> None:
        entry = self._live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del self._live[key]
            self.current_bytes -= entry[0]

    def __enter__(self) -> "ActivationPeak":
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)
