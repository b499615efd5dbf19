"""A rank's view of the tensor-parallel group: its rank, the collectives the runner needs, and how long
they took (the all-reduce share of a step)."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

BACKENDS = {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}  # hccl / nccl: written, untested (no such devices here)


@dataclass
class Shard:
    """Passed to ModelRunner(shard=...): which slice this process holds, and the group's collectives."""

    rank: int
    world_size: int
    comm_seconds: float = 0.0   # wall time inside collectives since the last reset (includes waiting for peers)
    num_all_reduces: int = 0

    def all_reduce(self, t: torch.Tensor) -> None:
        t0 = time.perf_counter()
        dist.all_reduce(t)  # NOTE: on NPU / GPU this only queues the op; the time is then a launch time
        self.comm_seconds += time.perf_counter() - t0
        self.num_all_reduces += 1

    def gather_last_dim(self, t: torch.Tensor) -> torch.Tensor | None:
        """Rank 0: the ranks' tensors concatenated along the last dim; other ranks: None."""
        t0 = time.perf_counter()
        t = t.contiguous()
        parts = [torch.empty_like(t) for _ in range(self.world_size)] if self.rank == 0 else None
        dist.gather(t, parts, dst=0)
        self.comm_seconds += time.perf_counter() - t0
        return torch.cat(parts, dim=-1) if parts is not None else None
