"""npukit plan: the memory bill, exact where it can be (weights, KV bytes per token) and checked against the
seed's 300I Duo OOM and against what load_model / LLM really allocate."""
from __future__ import annotations

import argparse
import json

import pytest

from npukit.plan import CATALOGUE, DEVICES, GiB, PlanError, add_plan_args, load_config, plan, run_plan


def test_seed_004_qwen3_32b_fp16_ooms_on_one_300i_duo_chip_and_runs_at_tp4():
    # seed 004: `--tensor-parallel-size 1` -> "NPU out of memory ... 43.24 GiB total capacity", TP 4 serves.
    p = plan("Qwen/Qwen3-32B", device="300I-Duo", dtype="float16")
    assert p.device.memory_bytes == round(43.24 * GiB) and p.device.reported
    assert p.weight_bytes > p.device.memory_bytes  # the weights alone are bigger than the chip
    one = p.plan_for(1)
    assert not one.fits and "out of memory" in one.reason and one.kv_tokens_per_device == 0
    assert p.plan_for(4).fits
    assert p.min_tensor_parallel_size in (2, 4)
    assert "--tensor-parallel-size 2" in p.serve_command and "--enforce-eager" in p.serve_command
    assert "--dtype float16" in p.serve_command


def test_auto_dtype_is_float16_on_300i_duo_and_bf16_is_refused():
    assert plan("Qwen/Qwen3-0.6B", device="300I-Duo").dtype == "float16"
    with pytest.raises(PlanError, match="no bfloat16"):
        plan("Qwen/Qwen3-0.6B", device="310P", dtype="bfloat16")


@pytest.mark.parametrize("name, params", [
    ("Qwen/Qwen2.5-0.5B-Instruct", 494_032_768),      # the model card's exact count
    ("meta-llama/Llama-3.1-8B-Instruct", 8_030_261_248),
])
def test_parameter_count_matches_the_published_one(name, params):
    p = plan(name, device="910B3", dtype="bfloat16")
    assert p.num_parameters == params
    assert p.weight_bytes == 2 * params


def test_kv_bytes_per_token_to_the_byte_and_replication_above_kv_heads():
    p = plan("Qwen/Qwen3-32B", device="910B3", dtype="bfloat16")
    assert p.kv_bytes_per_token == 2 * 64 * 8 * 128 * 2  # K and V x layers x kv heads x head_dim x bf16
    per = {q.tensor_parallel_size: q.kv_bytes_per_token_per_device for q in p.plans}
    assert per[2] == p.kv_bytes_per_token // 2 and per[8] == p.kv_bytes_per_token // 8
    assert per[16] == per[8]  # 8 KV heads over 16 ranks: each head replicated twice, no further split


def test_valid_tp_sizes_follow_vllm_rules():
    tps = lambda name: [q.tensor_parallel_size for q in plan(name, device="910B3").plans]  # noqa: E731
    assert tps("smollm2-135m-instruct") == [1, 3]       # 9 heads, 3 KV heads, 1536 intermediate
    assert tps("Qwen/Qwen2.5-0.5B-Instruct") == [1, 2]  # 14 heads: 7 would split 2 KV heads unevenly
    assert tps("Qwen/Qwen3-8B")[:4] == [1, 2, 4, 8]


def test_per_device_numbers_are_consistent():
    p = plan("Qwen/Qwen2.5-7B-Instruct", device="910B4", max_model_len=8192, max_num_seqs=64)
    for q in p.plans:
        assert q.kv_tokens_per_device == q.kv_blocks_per_device * p.block_size
        assert q.kv_cache_bytes_per_device == q.kv_tokens_per_device * q.kv_bytes_per_token_per_device
        used = q.weight_bytes_per_device + q.activation_bytes_per_device + p.workspace_bytes_per_device
        assert used + q.kv_cache_bytes_per_device <= p.device.memory_bytes * p.gpu_memory_utilization
        assert q.max_num_seqs_at_max_model_len == q.kv_blocks_per_device // (8192 // p.block_size)
        assert q.fits == (q.max_num_seqs_at_max_model_len >= 1)
    assert p.block_size == 128  # vLLM-Ascend's default on an NPU
    ws = [q.weight_bytes_per_device for q in p.plans]
    assert ws == sorted(ws, reverse=True)


def test_w8a16_is_int8_linears_plus_per_channel_scales():
    cfg = dict(model_type="llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=128, vocab_size=100, max_position_embeddings=256, tie_word_embeddings=False)
    full = plan(cfg, device="910B3", dtype="float16")
    q = plan(cfg, device="910B3", dtype="float16", quantization="w8a16")
    linears = 2 * (64 * 64 + 2 * 32 * 64 + 64 * 64 + 3 * 64 * 128)   # q, k, v, o, gate, up, down per layer
    channels = 2 * (64 + 32 + 32 + 64 + 128 + 128 + 64)              # output channels of those
    assert full.weight_bytes - q.weight_bytes == 2 * linears - (linears + 2 * channels)
    assert any("int8" in n for n in q.notes)


@pytest.mark.parametrize("bad, match", [
    (dict(model_type="gpt2"), "model_type 'gpt2'"),
    (dict(model_type="llama", num_attention_heads=4), "'hidden_size'"),
    (dict(model_type="qwen2", hidden_size=64, num_attention_heads=4, num_hidden_layers="two"), "'num_hidden_layers'"),
])
def test_unreadable_configs_name_the_field(bad, match):
    with pytest.raises(PlanError, match=match):
        plan(bad, device="910B3")


def test_model_sources(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(CATALOGUE["Qwen/Qwen3-0.6B"]))
    assert load_config(folder)[0] == CATALOGUE["Qwen/Qwen3-0.6B"]
    assert load_config(folder / "config.json")[1].startswith("file:")
    assert load_config("qwen3-0.6b")[2] == "Qwen/Qwen3-0.6B"        # short catalogue name
    assert load_config("Qwen/Qwen2.5-7B")[2] == "Qwen/Qwen2.5-7B-Instruct"  # base = instruct shapes
    with pytest.raises(PlanError, match="cannot find a config"):
        load_config("nobody/no-such-model-xyz")
    with pytest.raises(PlanError, match="unknown device"):
        plan("Qwen/Qwen3-0.6B", device="910Z")


def test_every_catalogue_entry_plans():
    for name in CATALOGUE:
        p = plan(name, device="A3")
        assert p.plans[0].tensor_parallel_size == 1 and p.weight_bytes > 0, name
    assert all(d.source for d in DEVICES.values())


def run_cli(argv, capsys):
    p = argparse.ArgumentParser()
    add_plan_args(p)
    code = run_plan(p.parse_args(argv))
    return code, capsys.readouterr()


def test_cli_json(capsys):
    code, out = run_cli(["Qwen/Qwen3-32B", "--device", "300I-Duo", "--json"], capsys)
    assert code == 0
    d = json.loads(out.out)
    assert {"weight_bytes", "kv_bytes_per_token", "min_tensor_parallel_size", "plans"} <= d.keys()
    assert {"tensor_parallel_size", "weight_bytes_per_device", "kv_bytes_per_token_per_device",
            "kv_tokens_per_device", "max_num_seqs_at_max_model_len", "fits"} <= d["plans"][0].keys()
    assert d["plans"][0]["fits"] is False


def test_cli_errors_say_what_to_do(capsys):
    code, out = run_cli(["Qwen/Qwen3-8B", "--device", "910Z"], capsys)
    assert code == 2 and "unknown device" in out.err and "300I-Duo" in out.err


# ------------------------------------------------------------------ against our own engine
@pytest.mark.parametrize("name", ["tiny-llama", "smollm2-135m-instruct"])
def test_plan_equals_what_load_model_and_llm_allocate(name, request):
    from npukit.engine import LLM

    model, tok = request.getfixturevalue({"tiny-llama": "tiny", "smollm2-135m-instruct": "smol"}[name])
    p = plan(name, device="cpu", dtype="float32", block_size=16)
    assert p.weight_bytes == model.load_report.weight_bytes
    llm = LLM(model, tok, num_kv_blocks=7, block_size=16)
    assert llm.runner.kv_cache.num_bytes == 7 * 16 * p.kv_bytes_per_token


@pytest.mark.parametrize("name", ["tiny-llama", "smollm2-135m-instruct"])
def test_plan_within_10_percent_of_measured_peak_tensor_memory(name, request):
    import torch

    from npukit.engine import LLM, SamplingParams
    from npukit.parallel.profile import ActivationPeak

    model, tok = request.getfixturevalue({"tiny-llama": "tiny", "smollm2-135m-instruct": "smol"}[name])
    llm = LLM(model, tok, num_kv_blocks=64, max_num_seqs=8, max_num_batched_tokens=256)
    kv = llm.runner.kv_cache
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 500, (32,), generator=g).tolist() for _ in range(8)]  # one 256-token prefill step
    with ActivationPeak(existing=[*model.parameters(), *kv.k_caches, *kv.v_caches]) as peak:
        llm.generate(prompts, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True), use_tqdm=False)
    assert peak.peak_bytes > 0
    p = plan(name, device="cpu", dtype="float32", block_size=16, max_num_seqs=8, max_num_batched_tokens=256)
    planned = p.weight_bytes + 64 * 16 * p.kv_bytes_per_token + p.plan_for(1).activation_bytes_per_device
    measured = model.load_report.weight_bytes + kv.num_bytes + peak.peak_bytes
    assert abs(planned - measured) <= 0.1 * measured


def test_auto_device_without_accelerator_says_what_it_planned_for():
    from npukit.device import detect

    if detect() in ("npu", "cuda"):
        pytest.skip("an NPU / GPU is here: auto measures it")
    p = plan("Qwen/Qwen3-8B")
    assert p.device.name == "910B3" and any("no NPU or GPU here" in n for n in p.notes)
