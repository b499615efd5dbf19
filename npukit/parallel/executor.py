"""Tensor parallelism over processes: rank 0 is the engine's own process, ranks 1..N-1 are workers.

    rank 0 (LLM)                                   rank r (worker_main)
    scheduler -> batch -> step_entries(batch)
              -- conn.send(("execute_entries", entries)) -->   runner.execute_entries(entries)
    runner.execute_entries(entries)                          (the same forward on its shard)
         all-reduce after o_proj / down_proj  <==========>   all-reduce
         gather of the vocab slices of the logits <=======   gather
    logits -> sampler

Workers are spawned (never forked: torch and its thread pools do not survive a fork), join a
torch.distributed group on a free 127.0.0.1 port (gloo on CPU; hccl on Ascend and nccl on CUDA are written
but untested here), load their own copy of the model, keep their shard and free the rest. Commands go over
one pipe per worker; tensors only through the collectives. Shutdown: ``shutdown()``, ``del llm`` (a
weakref finalizer), interpreter exit, or any exception / Ctrl-C inside a step (the group is then out of
step, so the workers are stopped and the engine refuses further steps). Workers ignore SIGINT (Ctrl-C
reaches the whole process group; rank 0 decides) and exit when rank 0's pipe closes.
"""
from __future__ import annotations

import os
import signal
import socket
import time
import traceback
import weakref

import torch

from .group import BACKENDS, Shard, make_group


class WorkerError(RuntimeError):
    """A tensor-parallel worker failed; the message carries its traceback."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _device_for(kind: str, rank: int) -> str:
    return "cpu" if kind == "cpu" else f"{kind}:{rank}"


def worker_main(rank: int, world_size: int, port: int, backend: str, model_path: str, dtype: str, device_kind: str,
                block_size: int, num_kv_blocks: int, threads: int, timeout_s: float, quant_recipe, conn) -> None:
    """Rank ``rank``: load, shard, then run what rank 0 sends until ("exit",) or until rank 0 goes away."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        torch.set_num_threads(threads)
        from ..engine.runner import ModelRunner
        from ..loading import load_model

        model, _ = load_model(model_path, device=_device_for(device_kind, rank), dtype=dtype)
        if quant_recipe is not None:
            from ..quant import apply_quant_recipe

            # NOTE: rank 0's recipe (smoothing factors, kernels), not a fresh quantize_model: a smoothing fit or
            # kernel probe run here could come out differently, and the ranks' shards would no longer add up.
            apply_quant_recipe(model, quant_recipe)
        conn.send(("loaded",))
        store, group = make_group(backend, port, rank, world_size, timeout_s)
        shard = Shard(rank, world_size, group, store)
        runner = ModelRunner(model, block_size, num_kv_blocks, shard=shard)
        del model  # NOTE: the runner holds copies of its shard only; the full weights go
        import gc

        gc.collect()
        conn.send(("ready", runner.weight_bytes, runner.kv_cache.num_bytes))
        while True:
            msg = conn.recv()  # EOFError when rank 0 is gone
            if msg[0] == "exit":
                break
            if msg[0] == "stats":
                conn.send(("stats", shard.comm_seconds, shard.num_all_reduces, _rss()))
                continue
            if msg[0] == "reset_stats":
                shard.comm_seconds, shard.num_all_reduces = 0.0, 0
                continue
            getattr(runner, msg[0])(*msg[1:])
    except EOFError:
        pass
    except BaseException:
        try:
            conn.send(("error", f"rank {rank}: {traceback.format_exc()}"))
        except OSError:
            pass
    # NOTE: exit at once: tearing down the process group would wait for rank 0's side of it, which lives on
    # until rank 0 drops the engine (seconds of join timeouts on every shutdown).
    os._exit(0)


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _stop(procs, conns, polite: bool) -> None:
    """Stop the workers: ask (polite), then SIGTERM, then SIGKILL; close the pipes. Idempotent."""
    if polite:
        for c in conns:
            try:
                c.send(("exit",))
            except (OSError, ValueError):
                pass
        for p in procs:
            p.join(timeout=10)
    for p in procs:
        if p.is_alive():
            p.terminate()
            p.join(timeout=5)
        if p.is_alive():
            p.kill()
            p.join(timeout=5)
    for c in conns:
        c.close()


class TensorParallelRunner:
    """Rank 0's runner: the same interface as ModelRunner (execute_model, copy_blocks, kv_cache), run on
    all ranks at once. ``model_path``: what the workers load (a folder or an embedded name)."""

    def __init__(self, model, model_path: str, block_size: int, num_kv_blocks: int, tensor_parallel_size: int,
                 *, threads: int | None = None, timeout_s: float = 120.0):
        import multiprocessing as mp

        from ..engine.kv_cache import kv_shape
        from ..engine.runner import ModelRunner
        from .sharding import check_tp

        tp = tensor_parallel_size
        num_layers, num_kv_heads, _ = kv_shape(model.config)
        check_tp(model.config.num_attention_heads, num_kv_heads, model.config.intermediate_size, tp)
        table = model.get_input_embeddings().weight  # NOTE: not lm_head's, which may be int8 (quantize_lm_head)
        device = table.device
        backend = BACKENDS.get(device.type)
        if backend is None:
            raise ValueError(f"tensor parallelism runs on cpu (gloo), npu (hccl) or cuda (nccl), not {device.type}")
        dtype = str(table.dtype).removeprefix("torch.")
        threads = threads or max(1, torch.get_num_threads() // tp)
        ctx = mp.get_context("spawn")
        port = free_port()
        self.tensor_parallel_size = tp
        self.procs, self.conns = [], []
        self._finalizer = weakref.finalize(self, _stop, self.procs, self.conns, True)
        try:
            for rank in range(1, tp):
                parent, child = ctx.Pipe()
                p = ctx.Process(target=worker_main, name=f"npukit-tp-rank{rank}", daemon=True,
                                args=(rank, tp, port, backend, model_path, dtype, device.type, block_size,
                                      num_kv_blocks, threads, timeout_s, getattr(model, "quant_recipe", None),
                                      child))
                p.start()
                child.close()
                self.procs.append(p)
                self.conns.append(parent)
            self._expect("loaded", timeout_s)
            store, group = make_group(backend, port, 0, tp, timeout_s)
            self.shard = Shard(0, tp, group, store)
            self.runner = ModelRunner(model, block_size, num_kv_blocks, shard=self.shard)
            self.worker_bytes = [(m[1], m[2]) for m in self._expect("ready", timeout_s)]
        except BaseException:
            self.shutdown(polite=False)
            raise
        self.kv_cache = self.runner.kv_cache
        self.num_kv_blocks = num_kv_blocks
        self.block_size = block_size
        self.closed = False

    # ------------------------------------------------------------------ the engine's interface
    def execute_model(self, batch, all_logits: bool = False) -> torch.Tensor:
        entries = self.runner.step_entries(batch)  # NOTE: checked before anything is sent
        return self._everywhere("execute_entries", entries, all_logits)

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        self._everywhere("copy_blocks", pairs)

    @property
    def prepare_seconds(self) -> float:
        return self.runner.prepare_seconds

    # ------------------------------------------------------------------ measurements
    def comm_stats(self) -> list[dict]:
        """Per rank: seconds in collectives, number of all-reduces, resident memory (rank 0: None)."""
        for c in self.conns:
            c.send(("stats",))
        rows = [dict(rank=0, comm_seconds=self.shard.comm_seconds, all_reduces=self.shard.num_all_reduces, rss=None)]
        for rank, (_, secs, n, rss) in enumerate(self._expect("stats", 30), start=1):
            rows.append(dict(rank=rank, comm_seconds=secs, all_reduces=n, rss=rss))
        return rows

    def reset_comm_stats(self) -> None:
        self._send(("reset_stats",))
        self.shard.comm_seconds, self.shard.num_all_reduces = 0.0, 0

    # ------------------------------------------------------------------ plumbing
    def _everywhere(self, method: str, *args):
        if self.closed:
            raise RuntimeError("the tensor-parallel workers were shut down (an interrupted or failed step leaves "
                               "the ranks out of step): create a new LLM")
        try:
            self._send((method, *args))
            return getattr(self.runner, method)(*args)
        except BaseException as e:
            errors = self._worker_errors()
            self.shutdown(polite=False)
            if errors and not isinstance(e, KeyboardInterrupt):
                raise WorkerError("\n".join(errors)) from e
            raise

    def _send(self, msg) -> None:
        for c in self.conns:
            c.send(msg)

    def _expect(self, kind: str, timeout_s: float) -> list[tuple]:
        """One message of this kind from every worker, or WorkerError (a worker failed, died or timed out)."""
        out = []
        deadline = time.monotonic() + timeout_s
        for rank, (p, c) in enumerate(zip(self.procs, self.conns), start=1):
            while not c.poll(0.1):
                if not p.is_alive():
                    raise WorkerError(f"tensor-parallel rank {rank} exited (code {p.exitcode}) before {kind!r}")
                if time.monotonic() > deadline:
                    raise WorkerError(f"tensor-parallel rank {rank} sent no {kind!r} within {timeout_s:.0f} s")
            try:
                msg = c.recv()
            except EOFError:
                p.join(timeout=5)
                raise WorkerError(
                    f"tensor-parallel rank {rank} exited (code {p.exitcode}) before {kind!r}. In a script, create "
                    "the LLM under `if __name__ == '__main__':` (workers are spawned and re-import the script)"
                ) from None
            if msg[0] == "error":
                raise WorkerError(msg[1])
            if msg[0] != kind:
                raise WorkerError(f"rank {rank} answered {msg[0]!r}, expected {kind!r}")
            out.append(msg)
        return out

    def _worker_errors(self) -> list[str]:
        errors = []
        for c in self.conns:
            try:
                while c.poll(0.5):
                    msg = c.recv()
                    if msg[0] == "error":
                        errors.append(msg[1])
            except (EOFError, OSError):
                pass
        return errors

    def shutdown(self, polite: bool = True) -> None:
        """Stop the workers (rank 0's group goes with this object). Safe to call twice."""
        self.closed = True
        self._finalizer.detach()
        _stop(self.procs, self.conns, polite)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]
