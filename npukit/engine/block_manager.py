"""BlockManager: the pool of KV blocks — ref counts, a free queue, prefix caching, copy-on-write.

A sequence's K/V lives in fixed-size blocks listed in `seq.block_table`; position p is in block
`block_table[p // block_size]` at offset `p % block_size`. Blocks are shared (ref_count > 1) by the n
samples of a request (`fork`) and by requests with a common prefix (prefix caching).

Prefix caching (vLLM's automatic prefix caching): once a block is *full and computed* it gets a hash
chained over everything before it, `hash((parent_hash, tuple(block_token_ids)))`, and is registered
in `cached_block_ids`. A new sequence whose leading full blocks hash the same reuses those blocks and
skips computing them. A freed hashed block stays in the free queue with its contents and can still be
hit until the pool needs it (least recently freed first), then it is evicted.

NOTE: invariants (tests/test_block_manager.py checks them under random operations):
- every block id is either in `free_block_ids` (ref_count == 0) or used (ref_count >= 1), never both:
  num_free_blocks + num_used_blocks == num_blocks.
- ref_count of a block == the number of sequence block tables that contain it.
- a block in `cached_block_ids` has `hash` set and holds exactly `token_ids`; it is full and computed,
  so nobody writes into it again (the hits stop before the sequence's last token, see `_cached_prefix`).
- a block is written only by a sequence that owns it alone (ref_count == 1): `append_slots` copies
  a shared block first (copy-on-write) and returns the (src, dst) copy for the runner.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from .sequence import Sequence


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None                   # set while registered in the prefix cache
    token_ids: tuple[int, ...] | None = None  # the block's tokens while registered


def hash_block(parent_hash: int | None, token_ids) -> int:
    """Chain hash of one full block: depends on the block's tokens and every token before it."""
    return hash((parent_hash, tuple(token_ids)))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks and block_size must be positive, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # LRU free queue: the front is taken (and evicted, if hashed) first.
        self.free_block_ids: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.cached_block_ids: dict[int, int] = {}  # block hash -> block id
        self.prefix_query_tokens = 0
        self.prefix_hit_tokens = 0

    # ---- counts -------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free_block_ids)

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_hit_tokens / self.prefix_query_tokens if self.prefix_query_tokens else 0.0

    # ---- internals ----------------------------------------------------------------------------
    def _take_free(self) -> int:
        """A fresh block for writing: the least recently freed one, evicted from the cache if hashed."""
        block_id, _ = self.free_block_ids.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None:
            if self.cached_block_ids.get(block.hash) == block_id:
                del self.cached_block_ids[block.hash]
            block.hash = block.token_ids = None
        block.ref_count = 1
        return block_id

    def _ref(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free_block_ids[block_id]
        block.ref_count += 1

    def _unref(self, block_id: int) -> None:
        block = self.blocks[block_id]
        assert block.ref_count > 0, f"double free of block {block_id}"
        block.ref_count -= 1
        if block.ref_count == 0:
            self.free_block_ids[block_id] = None
            if block.hash is None:  # nothing worth keeping: reuse it first
                self.free_block_ids.move_to_end(block_id, last=False)

    def _block_hashes(self, seq: Sequence, num_full_blocks: int) -> list[int]:
        """seq.block_hashes extended to cover its first `num_full_blocks` full blocks."""
        hashes, bs = seq.block_hashes, self.block_size
        for i in range(len(hashes), num_full_blocks):
            hashes.append(hash_block(hashes[i - 1] if i else None, seq.token_ids[i * bs:(i + 1) * bs]))
        return hashes

    def _cached_prefix(self, seq: Sequence) -> list[int]:
        """Block ids of seq's leading blocks found in the prefix cache.
        NOTE: at most (len - 1) tokens hit, so the last token is always computed (it gives the logits)
        and its block is a private one."""
        if not self.enable_prefix_caching:
            return []
        bs = self.block_size
        hits: list[int] = []
        for i, h in enumerate(self._block_hashes(seq, (len(seq.token_ids) - 1) // bs)):
            block_id = self.cached_block_ids.get(h)
            if block_id is None or self.blocks[block_id].token_ids != tuple(seq.token_ids[i * bs:(i + 1) * bs]):
                break
            hits.append(block_id)
        return hits

    # ---- allocation for a sequence entering RUNNING -------------------------------------------
    def num_blocks_to_allocate(self, seq: Sequence) -> int:
        """How many blocks `allocate(seq)` takes out of the free queue (fresh ones + cached hits
        that nobody uses right now)."""
        hits = self._cached_prefix(seq)
        fresh = seq.num_blocks_needed(self.block_size) - len(hits)
        return fresh + sum(1 for b in hits if self.blocks[b].ref_count == 0)

    def can_allocate(self, seq: Sequence) -> bool:
        return self.num_blocks_to_allocate(seq) <= self.num_free_blocks

    def allocate(self, seq: Sequence) -> None:
        """Give seq blocks for all its tokens, reusing cached prefix blocks; sets
        seq.num_computed_tokens (and num_cached_tokens) to the number of tokens found cached."""
        assert not seq.block_table, f"sequence {seq.seq_id} already has blocks"
        hits = self._cached_prefix(seq)
        for block_id in hits:  # take the hits first so a fresh allocation cannot evict them
            self._ref(block_id)
        table = hits + [self._take_free() for _ in range(seq.num_blocks_needed(self.block_size) - len(hits))]
        seq.block_table = table
        seq.num_computed_tokens = seq.num_cached_tokens = len(hits) * self.block_size
        if self.enable_prefix_caching:
            self.prefix_query_tokens += len(seq.token_ids)
            self.prefix_hit_tokens += seq.num_cached_tokens

    # ---- growth of a RUNNING sequence ---------------------------------------------------------
    def _write_range(self, seq: Sequence, num_new_tokens: int) -> tuple[int, int]:
        """Indices [first, last] in the block table of the blocks the next tokens are written to."""
        start = seq.num_computed_tokens
        return start // self.block_size, (start + num_new_tokens - 1) // self.block_size

    def num_blocks_to_append(self, seq: Sequence, num_new_tokens: int) -> int:
        first, last = self._write_range(seq, num_new_tokens)
        table = seq.block_table
        shared = sum(1 for i in range(first, min(last + 1, len(table))) if self.blocks[table[i]].ref_count > 1)
        return max(0, last + 1 - len(table)) + shared

    def can_append_slots(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.num_blocks_to_append(seq, num_new_tokens) <= self.num_free_blocks

    def append_slots(self, seq: Sequence, num_new_tokens: int) -> list[tuple[int, int]]:
        """Make room for computing `num_new_tokens` more tokens of seq. Returns the (src, dst) block
        copies the runner must do first (copy-on-write of blocks shared with another sequence)."""
        first, last = self._write_range(seq, num_new_tokens)
        table, copies = seq.block_table, []
        for i in range(first, min(last + 1, len(table))):
            if self.blocks[table[i]].ref_count > 1:  # shared: write into a private copy
                new_id = self._take_free()
                copies.append((table[i], new_id))
                self._unref(table[i])
                table[i] = new_id
        while len(table) <= last:
            table.append(self._take_free())
        return copies

    def cache_full_blocks(self, seq: Sequence, num_computed_before: int) -> None:
        """Register the blocks that became full and computed since `num_computed_before`."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        first, end = num_computed_before // bs, seq.num_computed_tokens // bs
        if end <= first:
            return
        hashes = self._block_hashes(seq, end)
        for i in range(first, end):
            block = self.blocks[seq.block_table[i]]
            if block.hash is None and hashes[i] not in self.cached_block_ids:
                block.hash, block.token_ids = hashes[i], tuple(seq.token_ids[i * bs:(i + 1) * bs])
                self.cached_block_ids[block.hash] = block.block_id

    # ---- sharing and release ------------------------------------------------------------------
    def fork(self, parent: Sequence, child: Sequence) -> None:
        """child shares all of parent's blocks (its K/V too: num_computed_tokens is copied)."""
        assert not child.block_table
        for block_id in parent.block_table:
            self._ref(block_id)
        child.block_table = list(parent.block_table)
        child.block_hashes = list(parent.block_hashes)
        child.num_computed_tokens = parent.num_computed_tokens

    def free(self, seq: Sequence) -> None:
        """Release seq's blocks; hashed ones stay reusable until evicted."""
        # NOTE: released tail-first so that a sequence's last blocks are evicted before its prefix.
        for block_id in reversed(seq.block_table):
            self._unref(block_id)
        seq.block_table = []

    def reset_prefix_cache(self) -> None:
        """Forget every cached block hash (blocks in use keep their contents)."""
        for block in self.blocks:
            block.hash = block.token_ids = None
        self.cached_block_ids.clear()
