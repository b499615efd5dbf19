"""Scheduler logic with a fake runner (a simulated KV cache that stores token ids, and a deterministic
"model" whose next token is a function of the whole sequence). The real runner is exercised in
tests/test_llm.py."""
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from npukit.engine.block_manager import BlockManager
from npukit.engine.config import EngineConfig
from npukit.engine.sampling_params import SamplingParams
from npukit.engine.scheduler import Scheduler
from npukit.engine.sequence import Sequence, SequenceStatus

VOCAB = 50


def next_token(tokens, index):
    return (hash(tuple(tokens)) + 7 * index) % VOCAB


class FakeEngine:
    """The engine loop of npukit.engine.llm, with a fake model; checks the scheduler's promises."""

    def __init__(self, num_blocks, block_size=4, **cfg):
        self.cfg = EngineConfig(block_size=block_size, num_kv_blocks=num_blocks, **cfg)
        self.bm = BlockManager(num_blocks, block_size, self.cfg.enable_prefix_caching)
        self.sched = Scheduler(self.cfg, self.bm)
        self.cache = [[None] * block_size for _ in range(num_blocks)]
        self.requests: dict[str, list[Sequence]] = {}
        self.steps = []

    def add(self, rid, prompt, max_tokens, n=1):
        seq = Sequence(rid, list(prompt), SamplingParams(n=n, max_tokens=max_tokens, temperature=0))
        self.requests[rid] = [seq]
        self.sched.add(seq)

    def step(self):
        bs, cfg = self.cfg.block_size, self.cfg
        out = self.sched.schedule()
        self.steps.append(out)
        assert out.num_batched_tokens <= cfg.max_num_batched_tokens
        assert len(self.sched.running) <= cfg.max_num_seqs
        assert len({s.seq_id for s, _ in out.scheduled}) == len(out.scheduled)
        for src, dst in out.blocks_to_copy:
            self.cache[dst] = list(self.cache[src])
        for seq, n in out.scheduled:
            assert seq.status is SequenceStatus.RUNNING and n >= 1
            start = seq.num_computed_tokens
            assert start + n <= len(seq.token_ids)
            # what attention reads: every earlier position holds this sequence's token
            got = [self.cache[seq.block_table[p // bs]][p % bs] for p in range(start)]
            assert got == seq.token_ids[:start]
            for p in range(start, start + n):
                block = seq.block_table[p // bs]
                assert self.bm.blocks[block].ref_count == 1, "writing into a shared block"
                self.cache[block][p % bs] = seq.token_ids[p]
        self.sched.update(out)
        for seq, _ in out.scheduled:
            if seq.num_computed_tokens < len(seq.token_ids):
                continue  # a prefill chunk: nothing to sample yet
            samples = [seq]
            p = seq.sampling_params
            if p.n > 1 and seq.index == 0 and seq.num_output_tokens == 0:
                for i in range(1, p.n):
                    child = Sequence(seq.request_id, list(seq.token_ids), p, index=i)
                    self.sched.fork(seq, child)
                    self.requests[seq.request_id].append(child)
                    samples.append(child)
            for s in samples:
                s.token_ids.append(next_token(s.token_ids, s.index))
                if s.num_output_tokens >= p.max_tokens:
                    self.sched.finish([s], "length")

    def run(self, arrivals=(), max_steps=5000):
        arrivals = sorted(arrivals, key=lambda a: a[0])
        k = 0
        for step in range(max_steps):
            while k < len(arrivals) and arrivals[k][0] <= step:
                self.add(*arrivals[k][1:])
                k += 1
            if k == len(arrivals) and not self.sched.has_unfinished():
                return
            self.step()
        raise AssertionError(f"not finished after {max_steps} steps (starvation or livelock)")

    def outputs(self):
        return {rid: sorted((s.index, s.output_token_ids) for s in seqs) for rid, seqs in self.requests.items()}


def test_running_first_then_waiting_in_arrival_order():
    e = FakeEngine(num_blocks=32, max_num_batched_tokens=64)
    e.add("a", range(5), 4)
    e.add("b", range(10, 13), 4)
    e.step()
    assert [(s.request_id, n) for s, n in e.steps[-1].scheduled] == [("a", 5), ("b", 3)]
    e.add("c", range(20, 26), 4)
    e.step()
    assert [(s.request_id, n) for s, n in e.steps[-1].scheduled] == [("a", 1), ("b", 1), ("c", 6)]


def test_chunked_prefill_splits_a_long_prompt_under_the_budget():
    e = FakeEngine(num_blocks=32, max_num_batched_tokens=4)
    e.add("a", range(10), 2)
    e.add("b", range(30, 32), 2)
    for _ in range(3):
        e.step()
    assert ([[(s.request_id, n) for s, n in o.scheduled] for o in e.steps]
            == [[("a", 4)], [("a", 4)], [("a", 2), ("b", 2)]])
    e.run()
    assert all(s.is_finished for seqs in e.requests.values() for s in seqs)


def test_without_chunked_prefill_a_prompt_waits_for_a_step_it_fits_in_whole():
    e = FakeEngine(num_blocks=32, max_num_batched_tokens=8, enable_chunked_prefill=False)
    e.add("a", range(6), 3)
    e.add("b", range(10, 17), 3)  # 7 tokens: does not fit next to a's 6
    e.step()
    assert [(s.request_id, n) for s, n in e.steps[-1].scheduled] == [("a", 6)]
    e.step()
    assert [(s.request_id, n) for s, n in e.steps[-1].scheduled] == [("a", 1), ("b", 7)]


def test_preempts_the_newest_by_recompute_and_resumes_it_first():
    e = FakeEngine(num_blocks=4, block_size=2, max_num_batched_tokens=64)
    e.add("old", [1, 2, 3, 0], 4)
    e.add("new", [4, 5, 6, 0], 4)
    e.add("later", [7], 1)
    e.step()  # both prompts: 2 blocks each, all 4 blocks used; "later" waits
    assert e.bm.num_free_blocks == 0
    e.step()  # "old" needs a 3rd block at position 4: "new" (the newest) is preempted
    out = e.steps[-1]
    assert [s.request_id for s in out.preempted] == ["new"] and e.sched.num_preemptions == 1
    assert [s.request_id for s in e.sched.waiting] == ["new", "later"]
    new = e.requests["new"][0]
    assert new.block_table == [] and new.num_computed_tokens == 0 and new.num_preemptions == 1
    e.run()
    ref = FakeEngine(num_blocks=64, max_num_batched_tokens=64)
    ref.run([(0, "old", [1, 2, 3, 0], 4), (0, "new", [4, 5, 6, 0], 4), (0, "later", [7], 1)])
    assert e.outputs() == ref.outputs()


def test_max_num_seqs_counts_the_n_samples_of_a_request():
    e = FakeEngine(num_blocks=64, max_num_seqs=3, max_num_batched_tokens=64)
    e.add("a", range(4), 3, n=2)
    e.add("b", range(10, 14), 3, n=2)  # 2 + 2 > 3: waits
    e.add("c", [1], 3)
    e.step()
    assert [s.request_id for s, _ in e.steps[-1].scheduled] == ["a"]
    e.step()
    assert len(e.sched.running) == 2 and [s.request_id for s in e.sched.waiting] == ["b", "c"]
    e.run()
    assert {rid: len(v) for rid, v in e.outputs().items()} == {"a": 2, "b": 2, "c": 1}


def test_finish_frees_blocks_and_leaves_the_others_running():
    e = FakeEngine(num_blocks=16, max_num_batched_tokens=64)
    e.add("a", range(5), 10)
    e.add("b", range(10, 15), 10)
    e.step()
    a, b = e.requests["a"][0], e.requests["b"][0]
    e.sched.finish([a], "abort")
    assert a.finish_reason == "abort" and a.block_table == [] and e.sched.running == [b]
    assert e.bm.num_used_blocks == len(b.block_table)
    e.run()
    assert e.bm.num_free_blocks == 16 and b.num_output_tokens == 10


@st.composite
def workloads(draw):
    block_size = draw(st.sampled_from([1, 2, 4]))
    chunked = draw(st.booleans())
    max_num_seqs = draw(st.integers(1, 6))
    budget = draw(st.integers(max(1, max_num_seqs // 2), 24))
    num_requests = draw(st.integers(1, 8))
    if not chunked:  # a preempted sequence is recomputed in one step: it must fit the budget whole
        budget = max(budget, 7)  # (the LLM keeps max_model_len <= max_num_batched_tokens)
    reqs = []
    for i in range(num_requests):
        max_tokens = draw(st.integers(1, 6))
        max_prompt = 12 if chunked else budget - max_tokens
        prompt = draw(st.lists(st.integers(0, 3), min_size=1, max_size=max_prompt))
        reqs.append((draw(st.integers(0, 6)), f"r{i}", prompt, max_tokens, draw(st.integers(1, min(2, max_num_seqs)))))
    longest = max(len(p) + m for _, _, p, m, _ in reqs)
    min_blocks = -(-longest // block_size) + 1  # one sequence alone always fits (the LLM caps lengths)
    num_blocks = draw(st.integers(min_blocks, min_blocks * 2))
    return dict(num_blocks=num_blocks, block_size=block_size, max_num_seqs=max_num_seqs,
                max_num_batched_tokens=budget, enable_chunked_prefill=chunked,
                enable_prefix_caching=draw(st.booleans())), reqs


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads())
def test_property_budgets_hold_everyone_finishes_outputs_do_not_depend_on_scheduling(workload):
    cfg, reqs = workload
    e = FakeEngine(**cfg)
    e.run(reqs)  # asserts token budget, max_num_seqs and KV contents every step
    assert all(s.is_finished for seqs in e.requests.values() for s in seqs)
    assert e.bm.num_free_blocks == cfg["num_blocks"]  # nothing leaked
    ref = FakeEngine(num_blocks=256, block_size=4, max_num_batched_tokens=512, enable_prefix_caching=False)
    ref.run(reqs)
    assert e.outputs() == ref.outputs()


def test_tight_pool_really_preempts():
    reqs = [(0, f"r{i}", [i % 4] * 5, 8, 1) for i in range(6)]
    e = FakeEngine(num_blocks=5, block_size=4, max_num_batched_tokens=32)
    e.run(reqs)
    assert e.sched.num_preemptions > 0
    ref = FakeEngine(num_blocks=256, max_num_batched_tokens=512)
    ref.run(reqs)
    assert e.outputs() == ref.outputs()


def test_config_rejects_bad_knobs():
    with pytest.raises(ValueError, match="max_num_seqs must be a positive int"):
        EngineConfig(max_num_seqs=0)
