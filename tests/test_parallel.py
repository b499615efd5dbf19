"""Tensor parallelism: the sharding table, TP N against TP 1 (same logits within 1e-4, same greedy tokens),
per-rank memory against npukit.plan, and clean worker shutdown (del, exception, Ctrl-C)."""
from __future__ import annotations

import gc

import psutil
import pytest
import torch

from npukit.engine.runner import ModelRunner
from npukit.engine.sampling_params import SamplingParams
from npukit.engine.sequence import Sequence
from npukit.parallel import sharding as sh
from npukit.parallel.executor import TensorParallelRunner, WorkerError
from npukit.plan import plan


# ------------------------------------------------------------------ the table
def test_valid_sizes_and_errors_name_the_field():
    assert sh.valid_tp_sizes(9, 3, 1536, up_to=9) == [1, 3]          # SmolLM2
    with pytest.raises(sh.TensorParallelError, match=r"num_attention_heads \(9\) is not divisible by 2.*1, 3"):
        sh.check_tp(9, 3, 1536, 2)
    with pytest.raises(sh.TensorParallelError, match="num_key_value_heads"):
        sh.check_tp(12, 4, 64, 6)
    with pytest.raises(sh.TensorParallelError, match="intermediate_size"):
        sh.check_tp(8, 8, 100, 8)


def test_kv_heads_split_or_replicated_like_vllm():
    assert [sh.kv_head_start(8, 4, r) for r in range(4)] == [0, 2, 4, 6]
    assert [sh.kv_head_start(2, 4, r) for r in range(4)] == [0, 0, 1, 1]  # query heads r use kv head r // 2
    assert sh.kv_heads_per_rank(2, 4) == 1


@pytest.mark.parametrize("split, dim", [(sh.COLUMN, 0), (sh.ROW, 1), (sh.VOCAB, 0)])
def test_shards_put_back_together_give_the_weight(split, dim):
    w = torch.randn(10 if split == sh.VOCAB else 8, 6)
    parts = [sh.shard_tensor(w, split, tp=2 if split != sh.VOCAB else 3, rank=r, head_dim=2, num_kv_heads=4)
             for r in range(2 if split != sh.VOCAB else 3)]
    whole = torch.cat(parts, dim=dim)
    assert torch.equal(whole[:w.shape[0]] if split == sh.VOCAB else whole, w)
    if split == sh.VOCAB:
        assert [p.shape[0] for p in parts] == [4, 4, 4] and torch.equal(parts[-1][2:], torch.zeros(2, 6))


# ------------------------------------------------------------------ TP N vs TP 1 on the runner
def _batch(lengths, vocab):
    g = torch.Generator().manual_seed(0)
    seqs = []
    for i, n in enumerate(lengths):
        s = Sequence(str(i), torch.randint(3, vocab, (n,), generator=g).tolist(), SamplingParams())
        s.block_table = list(range(i * 8, i * 8 + 8))
        seqs.append(s)
    return seqs


def _prefill_then_decode(runner, seqs):
    out = [runner.execute_model([(s, len(s.token_ids)) for s in seqs])]
    for s in seqs:
        s.num_computed_tokens = len(s.token_ids)
        s.token_ids.append(int(out[0][int(s.request_id)].argmax()))
    out.append(runner.execute_model([(s, 1) for s in seqs]))
    return out


@pytest.mark.parametrize("tp", [2, 4])  # 4 > its 2 KV heads: replicated KV heads
def test_tiny_tp_logits_match_tp1_and_memory_matches_the_plan(tiny, tp):
    model, _ = tiny
    ref = _prefill_then_decode(ModelRunner(model, 16, 64), _batch([5, 17, 40], 512))
    tpr = TensorParallelRunner(model, "tiny-llama", 16, 64, tp)
    try:
        got = _prefill_then_decode(tpr, _batch([5, 17, 40], 512))
        for a, b in zip(ref, got):
            assert a.shape == b.shape and (a - b).abs().max().item() < 1e-4
        p = plan("tiny-llama", device="cpu", dtype="float32", block_size=16).plan_for(tp)
        per_rank = [(tpr.runner.weight_bytes, tpr.kv_cache.num_bytes)] + tpr.worker_bytes
        assert per_rank == [(p.weight_bytes_per_device, 64 * 16 * p.kv_bytes_per_token_per_device)] * tp
        stats = tpr.comm_stats()
        # 1 (embedding) + 2 per layer, for each of the 2 steps, on every rank
        assert [r["all_reduces"] for r in stats] == [2 * (1 + 2 * 2)] * tp
    finally:
        pids = tpr.pids
        del tpr
        gc.collect()
    assert not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]


def test_heads_that_do_not_divide_fail_before_any_process_starts(smol):
    model, _ = smol
    before = psutil.Process().children()
    with pytest.raises(sh.TensorParallelError, match="num_attention_heads"):
        TensorParallelRunner(model, "smollm2-135m-instruct", 16, 8, 2)
    assert psutil.Process().children() == before


def _no_children_left(pids):
    return not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]


@pytest.mark.parametrize("exc", [KeyboardInterrupt, RuntimeError])
def test_interrupted_step_stops_the_workers(tiny, monkeypatch, exc):
    model, _ = tiny
    tpr = TensorParallelRunner(model, "tiny-llama", 16, 16, 2)
    pids = tpr.pids

    def boom(*a, **k):
        raise exc("stop")

    monkeypatch.setattr(tpr.runner, "execute_entries", boom)  # rank 0 fails after the workers got the step
    with pytest.raises(exc):
        tpr.execute_model([(s, len(s.token_ids)) for s in _batch([4], 512)])
    assert _no_children_left(pids)
    with pytest.raises(RuntimeError, match="create a new LLM"):
        tpr.execute_model([(s, len(s.token_ids)) for s in _batch([4], 512)])


def test_a_worker_error_reaches_rank_0(tiny, tmp_path):
    model, _ = tiny
    with pytest.raises(WorkerError, match="rank 1"):
        TensorParallelRunner(model, str(tmp_path / "no-such-model"), 16, 16, 2, timeout_s=60)
    assert not torch.distributed.is_initialized()


# ------------------------------------------------------------------ through the LLM
def _prompts(n=16, vocab=40000):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, vocab, (int(torch.randint(4, 24, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def _same_greedy(llm1, llmn, prompts, max_tokens=12):
    sp = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, logprobs=1)
    a, b = llm1.generate(prompts, sp, use_tqdm=False), llmn.generate(prompts, sp, use_tqdm=False)
    assert [x.outputs[0].token_ids for x in a] == [y.outputs[0].token_ids for y in b]
    diff = max(abs(p[t] - q[t]) for x, y in zip(a, b)
               for p, q, t in zip(x.outputs[0].logprobs, y.outputs[0].logprobs, x.outputs[0].token_ids))
    assert diff < 1e-4
    for r1, rn in zip(_prefill_then_decode(llm1.runner, _batch([7, 30], 1000)),
                      _prefill_then_decode(llmn.runner, _batch([7, 30], 1000))):
        assert (r1 - rn).abs().max().item() < 1e-4


def _assert_gone(pids):
    gc.collect()
    assert _no_children_left(pids)


def test_qwen2_tp2_greedy_tokens_and_logits_equal_tp1_on_16_prompts():
    from npukit.engine import LLM

    tp1 = LLM("qwen2-1024x8", device="cpu", dtype="float32", num_kv_blocks=128)
    tp2 = LLM("qwen2-1024x8", device="cpu", dtype="float32", num_kv_blocks=128, tensor_parallel_size=2)
    assert "tensor_parallel_size=2" in repr(tp2)
    _same_greedy(tp1, tp2, _prompts())
    pids = tp2.runner.pids
    del tp2
    _assert_gone(pids)


def test_smollm2_tp3_greedy_equals_tp1_and_tp2_is_refused(smol):
    from npukit.engine import LLM

    model, tok = smol
    with pytest.raises(sh.TensorParallelError, match=r"\(9\) is not divisible by 2"):
        LLM(model, tok, num_kv_blocks=32, tensor_parallel_size=2)
    tp1 = LLM(model, tok, num_kv_blocks=128)
    tp3 = LLM(model, tok, num_kv_blocks=128, tensor_parallel_size=3)  # workers load load_report.path
    _same_greedy(tp1, tp3, _prompts(16, 49152), max_tokens=8)
    pids = tp3.runner.pids
    tp3.shutdown()
    assert _no_children_left(pids)
    del tp3


def test_tensor_parallel_size_is_a_flag_of_serve_bench_and_graduate():
    import argparse

    from npukit.bench.throughput import build_bench_throughput_parser
    from npukit.engine.config import EngineConfig
    from npukit.graduate import build_graduate_parser, graduate
    from npukit.serving.server import add_serve_args

    serve = add_serve_args(argparse.ArgumentParser())
    assert serve.parse_args(["--tensor-parallel-size", "3"]).tensor_parallel_size == 3
    assert build_bench_throughput_parser().parse_args(["--tensor-parallel-size", "2"]).tensor_parallel_size == 2
    assert build_graduate_parser().parse_args(["m", "--tensor-parallel-size", "4"]).tensor_parallel_size == 4
    g = graduate(EngineConfig(tensor_parallel_size=4), "Qwen/Qwen3-32B", dtype="float16", chip="310P")
    assert g.tensor_parallel_size == 4 and "--tensor-parallel-size 4" in g.serve_command


def test_two_tensor_parallel_engines_live_side_by_side(tiny):
    model, _ = tiny
    a = TensorParallelRunner(model, "tiny-llama", 16, 16, 2)
    b = TensorParallelRunner(model, "tiny-llama", 16, 16, 2)  # each engine has its own process group
    try:
        la = a.execute_model([(s, len(s.token_ids)) for s in _batch([6], 512)])
        lb = b.execute_model([(s, len(s.token_ids)) for s in _batch([6], 512)])
        assert (la - lb).abs().max().item() < 1e-4
    finally:
        a.shutdown()
        b.shutdown()
    assert _no_children_left(a.pids + b.pids)
