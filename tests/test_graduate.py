"""npukit.graduate: npukit engine settings -> `vllm serve` / `vllm bench` command lines and notes."""
import json
import shlex
from types import SimpleNamespace

import pytest

from npukit.engine.config import EngineConfig
from npukit.graduate import Graduation, count_parameters, graduate, graduate_main


def flag_value(args: list[str], flag: str):
    return args[args.index(flag) + 1] if flag in args else None


def test_engine_knobs_map_to_vllm_flags():
    cfg = EngineConfig(block_size=32, max_num_seqs=8, max_num_batched_tokens=512, max_model_len=1024,
                       enable_prefix_caching=False, enable_chunked_prefill=True, num_kv_blocks=300,
                       enforce_eager=False)
    g = graduate(cfg, "Qwen/Qwen2.5-0.5B-Instruct", dtype="bfloat16", device="npu", served_model_name="qwen")
    a = g.serve_args
    assert isinstance(g, Graduation) and g.model == "Qwen/Qwen2.5-0.5B-Instruct"
    assert flag_value(a, "--block-size") == "32" and flag_value(a, "--max-num-seqs") == "8"
    assert flag_value(a, "--max-num-batched-tokens") == "512" and flag_value(a, "--max-model-len") == "1024"
    assert flag_value(a, "--num-gpu-blocks-override") == "300" and flag_value(a, "--dtype") == "bfloat16"
    assert "--no-enable-prefix-caching" in a and "--enable-chunked-prefill" in a
    assert "--gpu-memory-utilization" not in a  # a fixed block count replaces the memory share
    assert flag_value(a, "--served-model-name") == "qwen" and flag_value(a, "--host") == "127.0.0.1"
    assert "--enforce-eager" not in a and "--tensor-parallel-size" not in a
    # the printed command is a valid shell line that gives back the same argv
    assert shlex.split(g.serve_command.replace("\\\n", " ")) == ["vllm", "serve", g.model] + a
    rows = {r.npukit: r for r in g.table}
    assert rows["block_size"].vllm_flag == "--block-size"
    assert rows["num_kv_blocks"].vllm_flag == "--num-gpu-blocks-override"
    assert rows["kv_cache_memory_fraction"].vllm_flag == "--gpu-memory-utilization"
    assert "Ascend" in rows["block_size"].note or "128" in rows["block_size"].note
    assert any("--block-size 128" in n for n in g.notes)  # the Ascend recommendation


def test_memory_fraction_becomes_gpu_memory_utilization_with_an_explanation():
    g = graduate(EngineConfig(kv_cache_memory_fraction=0.5), "m", num_parameters=7_000_000_000, dtype="bfloat16",
                 device="npu", chip="910B")
    gmu = float(flag_value(g.serve_args, "--gpu-memory-utilization"))
    weights = 14e9 / (64 * 2**30)
    assert weights + 0.5 * (1 - weights) <= gmu <= 0.95  # weights + half of the rest (+ a little)
    assert any("*after*" in n and "*whole*" in n for n in g.notes)


def test_tensor_parallel_size_from_weights_vs_device_memory():
    assert graduate(None, "m", num_parameters=7e9, dtype="bfloat16", chip="910B").tensor_parallel_size == 1
    big = graduate(None, "Qwen/Qwen3-32B", dtype="float16", chip="310P")  # 32B from the name, 43.24 GiB chips
    assert big.tensor_parallel_size == 2 and flag_value(big.serve_args, "--tensor-parallel-size") == "2"
    assert any("out of memory" in n for n in big.notes)
    huge = graduate(None, "m", num_parameters=72e9, dtype="bfloat16", device_memory_gib=64)
    assert huge.tensor_parallel_size == 4  # 134 GiB / (0.8 * 64 GiB) = 2.6 -> 4 (a power of two)
    giant = graduate(None, "m", num_parameters=700e9, dtype="bfloat16")  # 1304 GiB / 51.2 GiB = 25.5 -> 32
    assert giant.tensor_parallel_size == 32 and any("several nodes" in n for n in giant.notes)
    unknown = graduate(None, "my-model", device="cuda")
    assert unknown.tensor_parallel_size == 1 and "--gpu-memory-utilization" not in unknown.serve_args
    assert any("no direct vLLM flag" in n for n in unknown.notes)


def test_ascend_310p_notes_and_flags():
    fp16 = graduate(EngineConfig(enforce_eager=False), "Qwen/Qwen3-0.6B", dtype="float16", device="npu")
    assert any("310P" in n and "--enforce-eager" in n for n in fp16.notes)
    assert "--enforce-eager" not in fp16.serve_args  # the chip is unknown: a note, not a flag
    duo = graduate(None, "Qwen/Qwen3-0.6B", dtype="bfloat16", chip="Ascend310P3")
    assert "--enforce-eager" in duo.serve_args and flag_value(duo.serve_args, "--dtype") == "float16"
    assert any("no bfloat16" in n for n in duo.notes)
    throughput = duo.bench_commands["offline: vllm bench throughput"]
    assert "--enforce-eager" in throughput and "--dtype float16" in throughput and "--host" not in throughput
    cuda = graduate(None, "Qwen/Qwen3-0.6B", dtype="float16", device="cuda")
    assert not any("310P" in n for n in cuda.notes) and not any("128" in n for n in cuda.notes)


def test_bench_commands_and_served_name_tokenizer_note():
    g = graduate(None, "smollm2-135m-instruct", served_model_name="smol", input_len=64, output_len=32)
    serve = g.bench_commands["online: vllm bench serve (against the server above)"]
    assert "--model smol" in serve and "--tokenizer HuggingFaceTB/SmolLM2-135M-Instruct" in serve
    assert "--random-input-len 64" in serve and "--random-output-len 32" in serve
    assert any("--tokenizer" in n for n in g.notes)
    assert g.model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    npukit_cmd = [v for k, v in g.bench_commands.items() if "npukit" in k][0]
    assert npukit_cmd.startswith("npukit bench serve")


def test_from_an_llm_object(tiny):
    model, tok = tiny
    fake_llm = SimpleNamespace(config=EngineConfig(max_num_seqs=4), model=model, tokenizer=tok)
    g = graduate(fake_llm, "my/tiny", device="cuda", device_memory_gib=16)
    assert flag_value(g.serve_args, "--max-num-seqs") == "4" and flag_value(g.serve_args, "--dtype") == "float32"
    assert "--gpu-memory-utilization" in g.serve_args  # weight bytes came from the load report
    assert count_parameters("tiny-llama")[0] == sum(p.numel() for p in model.state_dict().values())


def test_output_forms():
    g = graduate(None, "Qwen/Qwen2.5-7B-Instruct", dtype="bfloat16")
    text = str(g)
    assert text.startswith("# Serve with vLLM") and "vllm serve Qwen/Qwen2.5-7B-Instruct" in text
    assert "vllm bench throughput" in text and "--gpu-memory-utilization" in text
    html = g._repr_html_()
    assert "<table>" in html and "--max-num-batched-tokens" in html
    assert json.loads(json.dumps(g.to_dict()))["serve_command"] == g.serve_command


@pytest.mark.parametrize("kwargs, words", [
    ({"model": None}, "needs model="),
    ({"model": "m", "device": "cpu"}, "device must be"),
    ({"model": "m", "dtype": "int4"}, "dtype must be"),
    ({"model": "m", "chip": "H100"}, "unknown Ascend chip"),
])
def test_bad_input(kwargs, words):
    with pytest.raises(ValueError, match=words):
        graduate(None, **kwargs)


def test_cli(capsys):
    assert graduate_main(["Qwen/Qwen3-32B", "--dtype", "float16", "--chip", "310P", "--max-num-seqs", "16",
                          "--no-enable-prefix-caching"]) == 0
    out = capsys.readouterr().out
    assert "--enforce-eager" in out and "--max-num-seqs 16" in out and "--no-enable-prefix-caching" in out
    # graph mode on unless asked (vLLM's default), while EngineConfig itself defaults to eager
    assert graduate_main(["Qwen/Qwen3-0.6B", "--device", "cuda"]) == 0
    out = capsys.readouterr().out
    assert "--enforce-eager" not in out.split("Notes")[0] and "cudagraph_capture_sizes" in out
    assert graduate_main(["Qwen/Qwen3-0.6B", "--device", "cuda", "--enforce-eager"]) == 0
    assert "  --enforce-eager" in capsys.readouterr().out
    assert graduate_main(["m", "--json", "--num-parameters", "1e9"]) == 0
    assert json.loads(capsys.readouterr().out)["tensor_parallel_size"] == 1
    assert graduate_main(["m", "--block-size", "0"]) == 2
    assert "block_size must be a positive int" in capsys.readouterr().err
