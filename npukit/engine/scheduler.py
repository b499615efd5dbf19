"""Scheduler: continuous batching under a token budget, chunked prefill, preemption by recompute.

Every step builds one batch of `(sequence, num_new_tokens)` pairs (vLLM v1 style: prefill chunks and
decode tokens of different sequences mixed in one flattened forward):
1. RUNNING sequences, oldest first: each gets the tokens it still has to compute (1 when decoding, a
   chunk of its prompt when prefilling), as far as the token budget goes. If the block pool cannot
   hold them, the *newest* running sequence is preempted: its blocks are freed and it goes back to
   the front of the waiting queue to be recomputed later (its prefix blocks may still be cached).
2. WAITING sequences in arrival order, while the budget, `max_num_seqs` and the free blocks allow.
   The queue head is never skipped, so nobody starves; no admission in a step that preempted.

NOTE: invariants
- sum of num_new_tokens in a step <= max_num_batched_tokens; len(running) <= max_num_seqs (a request
  with n > 1 reserves n places when admitted, before its samples are forked).
- a RUNNING sequence has blocks for every token it is scheduled to compute; a WAITING one has none
  and num_computed_tokens == 0.
- per-step work is O(number of running sequences) plus O(blocks) for newly admitted prompts.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .block_manager import BlockManager
from .config import EngineConfig
from .sequence import Sequence, SequenceStatus


@dataclass
class SchedulerOutput:
    scheduled: list[tuple[Sequence, int]] = field(default_factory=list)  # (seq, num_new_tokens)
    blocks_to_copy: list[tuple[int, int]] = field(default_factory=list)  # copy-on-write (src, dst)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the last one is preempted first
        self.num_preemptions = 0

    # ---- queues -------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_reserved_seqs(self) -> int:
        """Places taken in the running batch: n for a request whose samples are not forked yet."""
        return sum(s.sampling_params.n if self._unforked(s) else 1 for s in self.running)

    @staticmethod
    def _unforked(seq: Sequence) -> bool:
        return seq.sampling_params.n > 1 and seq.index == 0 and seq.num_output_tokens == 0

    # ---- the step -----------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        cfg, bm = self.config, self.block_manager
        out = SchedulerOutput()
        budget = cfg.max_num_batched_tokens

        # 1) running sequences, oldest first
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = min(seq.num_uncomputed_tokens, budget)
            # NOTE: victims come from the end of `running`, which is never before index i, so a
            # sequence already scheduled in this step is never preempted.
            while not bm.can_append_slots(seq, num_new):
                victim = self.running.pop()  # the newest
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            else:
                out.blocks_to_copy += bm.append_slots(seq, num_new)
                out.scheduled.append((seq, num_new))
                budget -= num_new
                i += 1
        if out.preempted:  # blocks are short: admit nobody new this step
            return out

        # 2) waiting sequences, in order; the head is never skipped
        reserved = self.num_reserved_seqs
        while self.waiting and budget > 0:
            seq = self.waiting[0]
            places = seq.sampling_params.n if self._unforked(seq) else 1
            if reserved + places > cfg.max_num_seqs or not bm.can_allocate(seq):
                break
            if not cfg.enable_chunked_prefill and len(seq.token_ids) > budget:
                break  # the whole prompt must fit in one step (counted without prefix hits, as vLLM)
            bm.allocate(seq)
            num_new = min(seq.num_uncomputed_tokens, budget)
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            reserved += places
            out.scheduled.append((seq, num_new))
            budget -= num_new
        return out

    def _preempt(self, seq: Sequence) -> None:
        # NOTE: recompute: drop the K/V, keep the tokens; the full blocks stay hashed for a later hit.
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def update(self, out: SchedulerOutput, failed: frozenset[int] | set[int] = frozenset()) -> None:
        """Commit a step whose forward and sampling succeeded: advance num_computed_tokens and cache the
        full blocks of every scheduled sequence except those in `failed` (seq_ids; the engine finishes them).

        NOTE: the engine calls this only after the whole step succeeded; until then a step changes no
        sequence's num_computed_tokens, so a failed step leaves every sequence as it was (its new blocks
        are allocated but hold no computed tokens, and the next schedule() computes the same tokens)."""
        bm = self.block_manager
        for seq, num_new in out.scheduled:
            if seq.seq_id in failed:
                continue
            before = seq.num_computed_tokens
            seq.num_computed_tokens = before + num_new
            bm.cache_full_blocks(seq, before)

    # ---- n > 1 and finishing ------------------------------------------------------------------
    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Add child (a new sample of parent's request) to the running batch, sharing its blocks."""
        self.block_manager.fork(parent, child)
        child.status = SequenceStatus.RUNNING
        self.running.append(child)

    def finish(self, seqs: list[Sequence], reason: str) -> None:
        """Mark seqs finished with `reason` (unless already finished), free their blocks, drop them."""
        finished = set()
        for seq in seqs:
            if seq.status is SequenceStatus.FINISHED:
                continue
            if seq.status is SequenceStatus.RUNNING:
                self.block_manager.free(seq)
            seq.status = SequenceStatus.FINISHED
            seq.finish_reason = seq.finish_reason or reason
            finished.add(seq.seq_id)
        if finished:
            self.running = [s for s in self.running if s.seq_id not in finished]
            if any(s.seq_id in finished for s in self.waiting):
                self.waiting = deque(s for s in self.waiting if s.seq_id not in finished)
