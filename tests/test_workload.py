"""npukit.bench.workload: seeded workloads, step-logged engine runs, HF static batches and their simulated
schedule. Uses the tiny random Llama."""
from __future__ import annotations

import pytest

from npukit.bench.workload import (
    StepRecord,
    Workload,
    WorkloadRun,
    engine_knobs,
    greedy_params,
    make_workload,
    run_static_batches,
    run_workload,
    schedule_result,
    static_schedule,
)
from npukit.engine import LLM


@pytest.fixture
def llm(tiny):
    model, tok = tiny
    return LLM(model, tok, block_size=4, num_kv_blocks=64, max_num_seqs=4)


# ------------------------------------------------------------------------------------------------
# workloads
# ------------------------------------------------------------------------------------------------


def test_make_workload_ranges_shared_prefix_and_seed(tiny):
    tok = tiny[1]
    w = make_workload(tok, num_requests=12, prompt_len=(10, 20), output_len=(3, 7), shared_prefix_len=6, seed=1)
    assert w.num_requests == 12 and all(10 <= len(p) <= 20 for p in w.prompts)
    assert all(3 <= m <= 7 for m in w.max_tokens)
    assert len({tuple(p[:6]) for p in w.prompts}) == 1  # the shared system prompt
    assert len({tuple(p[6:]) for p in w.prompts}) == 12
    special = set(tok.all_special_ids)
    assert not special & {t for p in w.prompts for t in p}
    assert w.num_output_tokens == sum(w.max_tokens) and w.num_prompt_tokens == sum(map(len, w.prompts))
    again = make_workload(tok, num_requests=12, prompt_len=(10, 20), output_len=(3, 7), shared_prefix_len=6, seed=1)
    assert again.prompts == w.prompts and again.max_tokens == w.max_tokens
    assert make_workload(100, 3, prompt_len=5, output_len=2).max_tokens == [2, 2, 2]


@pytest.mark.parametrize("kwargs, message", [
    ({"num_requests": 0}, "num_requests must be >= 1"),
    ({"prompt_len": (8, 4)}, "prompt_len must be"),
    ({"output_len": 0}, "output_len must be"),
    ({"prompt_len": (8, 9), "shared_prefix_len": 8}, "shorter than the shortest prompt"),
])
def test_make_workload_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_workload(100, **kwargs)


def test_workload_checks_its_lists():
    with pytest.raises(ValueError, match="2 prompts but 1 output lengths"):
        Workload([[1], [2]], [3])
    with pytest.raises(ValueError, match="at least one request"):
        Workload([], [])
    with pytest.raises(ValueError, match="max_tokens must be >= 1"):
        Workload([[1]], [0])


# ------------------------------------------------------------------------------------------------
# runs
# ------------------------------------------------------------------------------------------------


def test_run_workload_logs_every_token(llm):
    w = make_workload(llm.tokenizer, num_requests=6, prompt_len=(5, 12), output_len=(2, 9), seed=0)
    seen = []
    r = run_workload(llm, w, on_step=lambda rec, done: seen.append(done))
    assert [m.num_output_tokens for m in r.metrics] == w.max_tokens
    assert [len(o.outputs[0].token_ids) for o in r.outputs] == w.max_tokens
    steps = r.token_steps()
    assert [len(steps[str(i)]) for i in range(6)] == w.max_tokens
    assert all(len(s.slot_ids) <= 4 for s in r.steps) and r.peak_batch == 4
    assert len(seen) == r.num_steps and seen[-1] == 6 and seen == sorted(seen)
    assert 0 < r.slot_utilization <= 1 and r.output_throughput > 0
    assert r.config["max_num_seqs"] == 4 and r.stats.num_running == 0
    # the log's tokens are the engine's ordinary greedy tokens
    plain = llm.generate(w.prompts, [greedy_params(m) for m in w.max_tokens], use_tqdm=False)
    assert [o.outputs[0].token_ids for o in plain] == [o.outputs[0].token_ids for o in r.outputs]


def test_run_workload_with_a_tiny_kv_cache_preempts_and_still_matches(tiny):
    model, tok = tiny
    w = make_workload(tok, num_requests=4, prompt_len=(10, 14), output_len=(10, 16), seed=2)
    roomy = run_workload(LLM(model, tok, block_size=4, num_kv_blocks=64), w)
    tight = run_workload(LLM(model, tok, block_size=4, num_kv_blocks=10), w)
    assert roomy.num_preemptions == 0 and tight.num_preemptions > 0
    assert tight.preempted and sum(tight.preempted.values()) <= tight.num_preemptions
    assert max(s.kv_cache_usage for s in tight.steps) == 1.0
    # recomputation after a preemption gives the same greedy tokens
    assert [o.outputs[0].token_ids for o in tight.outputs] == [o.outputs[0].token_ids for o in roomy.outputs]


def test_run_workload_rejects_busy_engines_and_bad_requests(llm):
    rid = llm.add_request([5, 6, 7], greedy_params(2))
    with pytest.raises(RuntimeError, match="unfinished requests"):
        run_workload(llm, Workload([[5, 6]], [2]))
    llm.abort(rid)
    too_long = Workload([[5, 6], [7] * 300], [2, 2])  # the cache holds 64 * 4 = 256 tokens
    with pytest.raises(ValueError, match="whole KV cache holds 256"):
        run_workload(llm, too_long)
    assert not llm.has_unfinished_requests()  # the first, valid request was taken back out


def test_run_static_batches_waits_for_the_longest(tiny):
    model, tok = tiny
    w = make_workload(tok, num_requests=5, prompt_len=(4, 9), output_len=(2, 6), seed=3)
    r = run_static_batches(model, tok, w, batch_size=2)
    assert [m.num_output_tokens for m in r.metrics] == w.max_tokens
    assert r.num_steps == max(w.max_tokens[:2]) + max(w.max_tokens[2:4]) + w.max_tokens[4]
    assert r.metrics[0].finish_time == r.metrics[1].finish_time  # answers come back with the batch
    assert r.metrics[1].finish_time < r.metrics[2].finish_time
    assert all(len(m.token_times) == m.num_output_tokens for m in r.metrics)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        run_static_batches(model, tok, w, batch_size=0)


def test_static_schedule_of_the_10_100_5_example():
    steps = static_schedule([10, 100, 5], batch_size=3)
    assert len(steps) == 100
    run = schedule_result(steps, [10, 100, 5], batch_size=3)
    assert run.slot_utilization == pytest.approx(115 / 300)
    assert [m.e2e for m in run.metrics] == [100.0, 100.0, 100.0]  # everyone waits for the 100-token answer
    assert [m.ttft for m in run.metrics] == [1.0, 1.0, 1.0]
    assert len(static_schedule([10, 100, 5, 7], batch_size=3)) == 107
    with pytest.raises(ValueError, match="batch_size >= 1"):
        static_schedule([], 3)


def test_continuous_batching_needs_fewer_steps_than_static(tiny):
    model, tok = tiny
    lens = [10, 100, 5, 40, 20, 60]
    w = Workload([[20 + i] * 6 for i in range(6)], lens)
    r = run_workload(LLM(model, tok, block_size=16, num_kv_blocks=64, max_num_seqs=3), w)
    assert r.num_steps == 100  # the longest request alone; the others fill the slots that free up
    assert len(static_schedule(lens, 3)) == 160


def test_engine_knobs_use_vllm_names(llm):
    # every EngineConfig field, by its name (the vLLM flag without "--" where vLLM has the same setting)
    assert engine_knobs(llm) == {"max_num_seqs": 4, "max_num_batched_tokens": 2048, "block_size": 4,
                                 "num_kv_blocks": 64, "enable_prefix_caching": True, "enable_chunked_prefill": True,
                                 "kv_cache_memory_fraction": 0.3, "max_model_len": 1024,
                                 "tensor_parallel_size": 1, "quantization": None, "enforce_eager": True,
                                 "compile_sizes": [1, 2, 4, 8, 16, 32, 64]}


def test_run_result_counts_from_its_step_log():
    from npukit.metrics import RequestMetrics

    steps = [StepRecord(0, 0.5, ["0", "1"], ["0", "1"]), StepRecord(1, 1.0, ["1"], ["0", "1"], num_preemptions=1)]
    metrics = [RequestMetrics(0.0, num_output_tokens=1), RequestMetrics(0.0, num_output_tokens=2)]
    run = WorkloadRun("r", metrics, steps, wall_time=1.5, batch_size=2)
    assert run.num_output_tokens == 3 and run.output_throughput == pytest.approx(2.0)
    assert run.num_preemptions == 1 and run.peak_batch == 2 and run.slot_utilization == pytest.approx(3 / 4)
    assert run.token_steps() == {"0": [0], "1": [0, 1]}
    assert str(run) == "r: 2 requests, 3 output tokens in 2 steps, 1.50 s -> 2.0 tok/s, 1 preemptions"
