"""npukit.cli: parser, doctor exit codes, download errors, chat on the tiny model, quickstart."""
from __future__ import annotations

import importlib
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from npukit.cli import PRESETS, build_parser, main
from npukit.doctor import FAIL, PASS, Check

doctor_mod = importlib.import_module("npukit.doctor")
ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model", "tiny-llama", "--device", "cpu", "--dtype", "float32"]


def test_help_lists_the_subcommands(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for command in ("doctor", "download", "chat", "quickstart"):
        assert command in out


def test_no_command_prints_help(capsys):
    assert main([]) == 0
    assert "usage: npukit" in capsys.readouterr().out


def test_subcommand_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["download", "--help"])
    assert exit_.value.code == 0
    assert "--include PATTERN" in capsys.readouterr().out


def test_help_does_not_import_torch_or_transformers():
    code = (
        "import sys, npukit; before = set(sys.modules)\n"
        "from npukit.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in set(sys.modules) - before if m.split('.')[0] in ('torch', 'transformers')))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_bad_arguments_exit_2(capsys):
    for argv in (["download", "a/b", "--source", "nowhere"], ["chat", "--max-new-tokens", "0"],
                 ["chat", "--preset", "wild"], ["frobnicate"]):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2, argv
    assert "invalid choice: 'wild'" in capsys.readouterr().err


def test_presets_match_npukit_chat():
    from npukit.chat import PRESETS as CHAT_PRESETS

    assert set(PRESETS) == set(CHAT_PRESETS)


# ---------------------------------------------------------------------------------------------
# doctor
# ---------------------------------------------------------------------------------------------


def test_doctor_json_exit_code_matches_report(capsys):
    code = main(["doctor", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert code == (0 if data["ok"] else 1)
    assert {c["name"] for c in data["checks"]} >= {"python", "torch", "pairing", "device", "cache"}


def test_doctor_exits_1_on_a_fail(monkeypatch, capsys):
    monkeypatch.setattr(doctor_mod, "CHECKS", [
        lambda env: Check("fine", PASS, "ok"),
        lambda env: Check("broken", FAIL, "torch_npu does not import", "install the matching torch"),
    ])
    assert main(["doctor", "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] is False and data["counts"] == {"PASS": 1, "WARN": 0, "FAIL": 1}

    assert main(["doctor"]) == 1
    out = capsys.readouterr().out
    assert "FAIL  broken" in out and "-> install the matching torch" in out


def test_doctor_exits_0_without_fail(monkeypatch, capsys):
    monkeypatch.setattr(doctor_mod, "CHECKS", [lambda env: Check("fine", PASS, "ok")])
    assert main(["doctor", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True


# ---------------------------------------------------------------------------------------------
# download
# ---------------------------------------------------------------------------------------------


def test_download_hub_error_prints_message_and_exits_2(monkeypatch, capsys):
    import npukit.hub

    def refuse(repo_id, **kwargs):
        raise npukit.hub.HubConnectionError(f"cannot reach huggingface.co for {repo_id}: try HF_ENDPOINT")

    monkeypatch.setattr(npukit.hub, "download", refuse)
    assert main(["download", "Qwen/Qwen2.5-0.5B-Instruct"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "cannot reach huggingface.co for Qwen/Qwen2.5-0.5B-Instruct: try HF_ENDPOINT" in captured.err
    assert "Traceback" not in captured.err


def test_download_passes_options_and_prints_the_path(monkeypatch, capsys, tmp_path):
    import npukit.hub

    calls = []

    def fake(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return tmp_path

    monkeypatch.setattr(npukit.hub, "download", fake)
    argv = ["download", "org/model", "--source", "modelscope", "--revision", "v1", "--endpoint", "http://127.0.0.1:9",
            "--local-dir", "models/m", "--include", "*.json", "*.safetensors", "--exclude", "*.bin", "--offline",
            "--quiet"]
    assert main(argv) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path)
    (repo_id, kw), = calls
    assert repo_id == "org/model"
    assert kw == dict(source="modelscope", revision="v1", endpoint="http://127.0.0.1:9", local_dir="models/m",
                      cache_dir=None, allow_patterns=["*.json", "*.safetensors"], ignore_patterns=["*.bin"],
                      token=None, offline=True, progress=False)
    main(["download", "org/model"])
    assert calls[-1][1]["offline"] is None and calls[-1][1]["source"] == "hf"  # None: HF_HUB_OFFLINE decides


def test_download_local_folder_for_real(tmp_path, capsys):
    from npukit.samples import sample_path

    folder = sample_path("tiny-llama")
    assert main(["download", str(folder), "--source", "local"]) == 0
    assert Path(capsys.readouterr().out.strip()).resolve() == folder.resolve()

    assert main(["download", str(tmp_path), "--source", "local"]) == 2  # no config.json there
    err = capsys.readouterr().err
    assert "config.json" in err and "Traceback" not in err


# ---------------------------------------------------------------------------------------------
# chat
# ---------------------------------------------------------------------------------------------


def test_chat_prompt_on_tiny_model(tiny, capsys):
    from npukit.chat import Chat

    assert main(["chat", *TINY, "--prompt", "Hello there", "--max-new-tokens", "12"]) == 0
    captured = capsys.readouterr()
    expected = Chat(*tiny, preset="greedy").send("Hello there", max_new_tokens=12)  # greedy: same text
    assert expected and captured.out == expected + "\n"
    assert "embedded:tiny-llama" in captured.err  # the load report goes to stderr


def test_chat_interactive_reset_and_exit(tiny, monkeypatch, capsys):
    import npukit.loading

    monkeypatch.setattr(npukit.loading, "load_model", lambda *a, **k: tiny)
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi\n\n/reset\nHello\n/exit\nnever read\n"))
    assert main(["chat", *TINY, "--max-new-tokens", "4", "--system", "Be brief."]) == 0
    captured = capsys.readouterr()
    assert captured.out.count("assistant> ") == 2
    assert "(conversation cleared)" in captured.err


def test_chat_ends_on_eof(tiny, monkeypatch, capsys):
    import npukit.loading

    monkeypatch.setattr(npukit.loading, "load_model", lambda *a, **k: tiny)
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert main(["chat", *TINY]) == 0


@pytest.mark.parametrize("argv, message", [
    (["--model", "no-such-model", "--device", "cpu", "--dtype", "float32"], "unknown model 'no-such-model'"),
    (["--model", "tiny-llama", "--device", "tpu"], "unknown device 'tpu'"),
    (["--model", "tiny-llama", "--device", "cpu", "--dtype", "float8"], "unknown dtype 'float8'"),
])
def test_chat_load_errors_exit_2_without_traceback(argv, message, capsys):
    assert main(["chat", *argv, "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


# ---------------------------------------------------------------------------------------------
# quickstart
# ---------------------------------------------------------------------------------------------


def test_quickstart_stops_when_doctor_fails(monkeypatch, capsys):
    import npukit.loading

    monkeypatch.setattr(doctor_mod, "CHECKS", [lambda env: Check("broken", FAIL, "no torch", "pip install torch")])
    monkeypatch.setattr(npukit.loading, "load_model", lambda *a, **k: pytest.fail("must not load a model"))
    assert main(["quickstart", *TINY]) == 1
    out = capsys.readouterr().out
    assert out.startswith("npukit doctor: 0 PASS, 0 WARN, 1 FAIL") and "pip install torch" in out


def test_quickstart_on_tiny_model(monkeypatch, capsys):
    monkeypatch.setattr(doctor_mod, "CHECKS", [lambda env: Check("fine", PASS, "ok")])
    assert main(["quickstart", *TINY, "--max-new-tokens", "5"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("npukit doctor: 1 PASS")
    assert "embedded:tiny-llama" in out and "Q: What is the capital of France?" in out
    assert "TTFT " in out and " tok/s" in out and "output tokens" in out


@pytest.mark.slow
def test_quickstart_smollm2_answers(smol, monkeypatch, capsys):
    import npukit.loading

    loads = []
    # reuse the session's copy of SmolLM2 (loading it is tested with tiny-llama above)
    monkeypatch.setattr(npukit.loading, "load_model", lambda *a, **k: loads.append((a, k)) or smol)
    assert main(["quickstart", "--device", "cpu", "--dtype", "float32", "--max-new-tokens", "10"]) == 0
    assert loads == [(("smollm2-135m-instruct",), {"device": "cpu", "dtype": "float32"})]
    out = capsys.readouterr().out
    answer = next(line for line in out.splitlines() if line.startswith("A: "))
    assert "Paris" in answer
    assert "TTFT" in out and "TPOT" in out


def test_parser_registers_a_func_per_subcommand():
    parser = build_parser()
    for argv in (["doctor"], ["download", "a/b"], ["chat"], ["quickstart"]):
        assert callable(parser.parse_args(argv).func), argv


def test_bench_throughput_parses_like_vllm_bench_throughput(capsys):
    from npukit.bench.throughput import run_bench_throughput

    args = build_parser().parse_args(["bench", "throughput", "--model", "tiny-llama", "--dtype", "bfloat16",
                                      "--num-prompts", "8", "--prompt-len", "16", "64", "--output-len", "4", "8",
                                      "--quick", "--threads", "1", "--skip", "continuous", "vllm",
                                      "--vllm-python", "/opt/vllm/bin/python", "--output-json", "out.json"])
    assert args.func is run_bench_throughput
    assert (args.model, args.dtype, args.num_prompts, args.prompt_len, args.output_len, args.quick, args.threads,
            args.skip, args.vllm_python, args.output_json) == (
        "tiny-llama", "bfloat16", 8, [16, 64], [4, 8], True, 1, ["continuous", "vllm"], "/opt/vllm/bin/python",
        "out.json")
    defaults = build_parser().parse_args(["bench", "throughput"])
    assert (defaults.model, defaults.dtype, defaults.seed, defaults.skip) == ("smollm2-135m-instruct", "float32", 0, ())
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "--help"])
    assert exit_.value.code == 0
    assert "throughput" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "throughput", "--skip", "nothing"])
    assert exit_.value.code == 2 and "invalid choice: 'nothing'" in capsys.readouterr().err
