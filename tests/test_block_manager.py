"""BlockManager: unit tests plus a hypothesis state machine over random allocate / append / fork /
free / prefix hits, checked against a simulated KV cache (each slot holds the token id written there)."""
from collections import Counter

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from npukit.engine.block_manager import BlockManager, hash_block
from npukit.engine.sampling_params import SamplingParams
from npukit.engine.sequence import Sequence

BS = 4


def make_seq(tokens, rid="r", index=0):
    return Sequence(rid, list(tokens), SamplingParams(), index=index)


def compute(bm, seq, n, cache):
    """What the runner + engine do for (seq, n): copy-on-write, write K/V (here: the token ids), advance."""
    for src, dst in bm.append_slots(seq, n):
        cache[dst] = list(cache[src])
    start = seq.num_computed_tokens
    for p in range(start, start + n):
        block = seq.block_table[p // BS]
        assert bm.blocks[block].ref_count == 1, "writing into a shared block"
        cache[block][p % BS] = seq.token_ids[p]
    seq.num_computed_tokens += n
    bm.cache_full_blocks(seq, start)


def test_hash_chain_depends_on_every_earlier_token():
    a = hash_block(None, [1, 2, 3, 4])
    assert hash_block(a, [5, 6, 7, 8]) != hash_block(hash_block(None, [0, 2, 3, 4]), [5, 6, 7, 8])
    assert hash_block(a, [5, 6, 7, 8]) == hash_block(hash_block(None, (1, 2, 3, 4)), (5, 6, 7, 8))


def test_prefix_hit_reuses_full_blocks_but_never_the_last_token():
    bm = BlockManager(num_blocks=8, block_size=BS)
    cache = [[None] * BS for _ in range(8)]
    a = make_seq(range(10))
    bm.allocate(a)
    assert a.num_computed_tokens == 0 and len(a.block_table) == 3
    compute(bm, a, 10, cache)
    b = make_seq(list(range(8)) + [42, 43])  # shares 2 full blocks
    assert bm.num_blocks_to_allocate(b) == 1
    bm.allocate(b)
    assert b.block_table[:2] == a.block_table[:2] and b.num_computed_tokens == 8 == b.num_cached_tokens
    assert [bm.blocks[i].ref_count for i in a.block_table] == [2, 2, 1]
    c = make_seq(range(8))  # exactly 2 full blocks: the last token must still be computed
    bm.allocate(c)
    assert c.num_computed_tokens == 4 and c.block_table[0] == a.block_table[0] and c.block_table[1] != a.block_table[1]
    assert bm.prefix_hit_tokens == 12 and bm.prefix_query_tokens == 28
    assert bm.prefix_cache_hit_rate == pytest.approx(12 / 28)


def test_freed_cached_blocks_are_hit_until_evicted_least_recently_used_first():
    bm = BlockManager(num_blocks=4, block_size=BS)
    cache = [[None] * BS for _ in range(4)]
    a = make_seq(range(9))  # 3 blocks, 2 full
    bm.allocate(a)
    compute(bm, a, 9, cache)
    a_table = list(a.block_table)
    bm.free(a)
    assert bm.num_free_blocks == 4 and len(bm.cached_block_ids) == 2
    # the unhashed tail block is reused first; the hashed ones survive
    x = make_seq([99])
    bm.allocate(x)
    assert x.block_table == [a_table[2]] and len(bm.cached_block_ids) == 2
    b = make_seq(list(range(8)) + [7])
    bm.allocate(b)
    assert b.num_computed_tokens == 8
    bm.free(b)
    bm.free(x)
    # now allocate 4 fresh blocks: everything is evicted
    big = make_seq(range(100, 116))
    bm.allocate(big)
    assert bm.cached_block_ids == {} and bm.num_free_blocks == 0


def test_fork_shares_blocks_and_copy_on_write_on_divergence():
    bm = BlockManager(num_blocks=8, block_size=BS)
    cache = [[None] * BS for _ in range(8)]
    parent = make_seq(range(6))
    bm.allocate(parent)
    compute(bm, parent, 6, cache)
    child = make_seq(range(6), index=1)
    bm.fork(parent, child)
    assert child.block_table == parent.block_table and bm.blocks[parent.block_table[1]].ref_count == 2
    parent.token_ids.append(100)
    child.token_ids.append(200)
    assert bm.num_blocks_to_append(parent, 1) == 1  # shared partial block must be copied
    copies = bm.append_slots(parent, 1)
    assert copies == [(child.block_table[1], parent.block_table[1])]
    assert bm.append_slots(child, 1) == []  # now it owns its block alone
    for src, dst in copies:
        cache[dst] = list(cache[src])
    assert cache[parent.block_table[1]][:2] == [4, 5]
    bm.free(parent)
    bm.free(child)
    assert bm.num_free_blocks == 8


def test_double_free_is_caught():
    bm = BlockManager(num_blocks=2, block_size=BS)
    s = make_seq([1, 2])
    bm.allocate(s)
    table = list(s.block_table)
    bm.free(s)
    s.block_table = table
    with pytest.raises(AssertionError, match="double free"):
        bm.free(s)


def test_bad_sizes_are_rejected():
    with pytest.raises(ValueError, match="num_blocks and block_size must be positive"):
        BlockManager(num_blocks=0, block_size=16)


# Prompts drawn from a few shared prefixes so that prefix hits are frequent.
PREFIXES = [list(range(10, 19)), list(range(10, 14)) + [77] * 5, [5] * 12]


class BlockManagerMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.num_blocks = 12
        self.bm = BlockManager(self.num_blocks, BS, enable_prefix_caching=True)
        self.cache = [[None] * BS for _ in range(self.num_blocks)]
        self.seqs: list[Sequence] = []  # sequences holding blocks
        self.parked: list[Sequence] = []  # freed (preempted) sequences that may come back
        self.next_id = 0

    def _new_tokens(self, data):
        return [data.draw(st.integers(0, 3)) for _ in range(data.draw(st.integers(1, 3)))]

    @rule(data=st.data(), prefix=st.integers(0, len(PREFIXES) - 1), cut=st.integers(1, 12))
    def add_sequence(self, data, prefix, cut):
        tokens = PREFIXES[prefix][:cut] + self._new_tokens(data)
        seq = make_seq(tokens, rid=f"r{self.next_id}")
        self.next_id += 1
        if self.bm.can_allocate(seq):
            free_before = self.bm.num_free_blocks
            need = self.bm.num_blocks_to_allocate(seq)
            self.bm.allocate(seq)
            assert self.bm.num_free_blocks == free_before - need
            self.seqs.append(seq)

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def compute_some(self, data):
        seq = data.draw(st.sampled_from(self.seqs))
        if seq.num_uncomputed_tokens == 0:
            seq.token_ids.append(data.draw(st.integers(0, 3)))  # "sample" a token
        n = data.draw(st.integers(1, seq.num_uncomputed_tokens))
        if self.bm.can_append_slots(seq, n):
            compute(self.bm, seq, n, self.cache)

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def fork(self, data):
        parent = data.draw(st.sampled_from(self.seqs))
        child = make_seq(parent.token_ids[: parent.num_computed_tokens] or parent.token_ids, rid=parent.request_id,
                         index=1)
        if parent.num_computed_tokens != len(child.token_ids):
            return
        self.bm.fork(parent, child)
        self.seqs.append(child)

    @precondition(lambda self: self.seqs)
    @rule(data=st.data(), preempt=st.booleans())
    def free(self, data, preempt):
        seq = data.draw(st.sampled_from(self.seqs))
        self.seqs.remove(seq)
        self.bm.free(seq)
        seq.num_computed_tokens = 0
        if preempt:
            self.parked.append(seq)

    @precondition(lambda self: self.parked)
    @rule(data=st.data())
    def resume(self, data):
        seq = data.draw(st.sampled_from(self.parked))
        if self.bm.can_allocate(seq):
            self.parked.remove(seq)
            self.bm.allocate(seq)
            self.seqs.append(seq)

    @invariant()
    def blocks_are_accounted_for(self):
        bm = self.bm
        refs = Counter(b for s in self.seqs for b in s.block_table)
        for block in bm.blocks:
            assert block.ref_count == refs.get(block.block_id, 0), "ref count != block tables holding it"
            assert (block.ref_count == 0) == (block.block_id in bm.free_block_ids), "free queue out of sync"
        assert bm.num_free_blocks + bm.num_used_blocks == bm.num_blocks
        assert bm.num_used_blocks == len(refs)
        for s in self.parked:
            assert s.block_table == [] and s.num_computed_tokens == 0

    @invariant()
    def cached_blocks_hold_their_tokens(self):
        for h, block_id in self.bm.cached_block_ids.items():
            block = self.bm.blocks[block_id]
            assert block.hash == h and list(block.token_ids) == self.cache[block_id]

    @invariant()
    def every_sequence_reads_its_own_tokens(self):
        # what attention would read back for each computed position is that sequence's token
        for s in self.seqs:
            assert len(s.block_table) * BS >= s.num_computed_tokens
            got = [self.cache[s.block_table[p // BS]][p % BS] for p in range(s.num_computed_tokens)]
            assert got == s.token_ids[: s.num_computed_tokens]


BlockManagerMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TestBlockManagerMachine = BlockManagerMachine.TestCase
