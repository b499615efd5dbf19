"""A rank's view of the tensor-parallel group: its rank, the collectives the runner needs, and how long
they took (the all-reduce share of a step)."""
from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

BACKENDS = {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}  # hccl / nccl: written, untested (no such devices here)


def make_group(backend: str, port: int, rank: int, world_size: int, timeout_s: float) -> tuple[Any, Any]:
    """(store, process group) of one tensor-parallel engine: rank 0 hosts a TCPStore on 127.0.0.1:port.

    NOTE: a process group object, not torch.distributed's global default group, so that one process can
    hold several tensor-parallel LLMs at once (a notebook comparing TP 2 and TP 3)."""
    timeout = timedelta(seconds=timeout_s)
    store = dist.TCPStore("127.0.0.1", port, world_size, rank == 0, timeout=timeout)
    if backend == "gloo":
        return store, dist.ProcessGroupGloo(store, rank, world_size, timeout)
    if backend == "nccl":  # UNTESTED: no CUDA devices here
        return store, dist.ProcessGroupNCCL(store, rank, world_size)
    if backend == "hccl":  # UNTESTED: no Ascend NPU here; torch_npu registers ProcessGroupHCCL
        from torch_npu._C._distributed_c10d import ProcessGroupHCCL

        return store, ProcessGroupHCCL(store, rank, world_size)
    raise ValueError(f"unknown backend {backend!r}: use gloo (cpu), hccl (npu) or nccl (cuda)")


@dataclass
class Shard:
    """Passed to ModelRunner(shard=...): which slice this process holds, and the group's collectives."""

    rank: int
    world_size: int
    group: Any = None           # the process group (make_group)
    store: Any = None           # kept alive with the group
    comm_seconds: float = 0.0   # wall time inside collectives since the last reset (includes waiting for peers)
    num_all_reduces: int = 0

    def all_reduce(self, t: torch.Tensor) -> None:
        t0 = time.perf_counter()
        self.group.allreduce([t]).wait()  # NOTE: on NPU / GPU wait() only orders the stream: a launch time
        self.comm_seconds += time.perf_counter() - t0
        self.num_all_reduces += 1

    def gather_last_dim(self, t: torch.Tensor) -> torch.Tensor | None:
        """Rank 0: the ranks' tensors concatenated along the last dim; other ranks: None."""
        t0 = time.perf_counter()
        t = t.contiguous()
        opts = dist.GatherOptions()
        opts.rootRank = 0
        parts = [torch.empty_like(t) for _ in range(self.world_size)] if self.rank == 0 else None
        self.group.gather([parts] if parts is not None else [], [t], opts).wait()
        self.comm_seconds += time.perf_counter() - t0
        return torch.cat(parts, dim=-1) if parts is not None else None
