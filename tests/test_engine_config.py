"""Engine settings are defined once (EngineConfig's fields) and every consumer reads them: the `npukit serve`,
`bench throughput` and `graduate` flags, graduate's vLLM mapping, the engine dashboard, the run records."""
import argparse

import pytest

from npukit.engine.config import EngineConfig, cli_flag, engine_args, engine_fields

CLI_FIELDS = [f for f in engine_fields() if f.metadata.get("cli", True)]


def parsers():
    from npukit.bench.throughput import build_bench_throughput_parser
    from npukit.cli import build_parser
    from npukit.graduate import build_graduate_parser
    from npukit.serving.server import build_serve_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    bench = next(a for a in sub.choices["bench"]._actions if isinstance(a, argparse._SubParsersAction))
    return {"npukit serve": build_serve_parser(), "npukit bench throughput": build_bench_throughput_parser(),
            "npukit graduate": build_graduate_parser(), "npukit (cli) serve": sub.choices["serve"],
            "npukit (cli) bench throughput": bench.choices["throughput"],
            "npukit (cli) graduate": sub.choices["graduate"]}


@pytest.mark.parametrize("command", list(parsers()))
def test_every_field_is_a_flag_of_every_engine_command(command):
    parser = parsers()[command]
    flags = {s for a in parser._actions for s in a.option_strings}
    missing = [cli_flag(f) for f in CLI_FIELDS if cli_flag(f) not in flags]
    assert not missing, f"{command} lacks {missing}"
    # and each parses into the field (booleans both ways)
    for f in CLI_FIELDS:
        if f.type in (bool, "bool"):
            ns = parser.parse_known_args([cli_flag(f).replace("--", "--no-", 1)])[0]
            assert engine_args(ns)[f.name] is False
        elif str(f.type).startswith("list"):  # a list field: comma-separated (compile_sizes)
            ns = parser.parse_known_args([cli_flag(f), "1,2,4"])[0]
            assert engine_args(ns)[f.name] == [1, 2, 4]
        elif f.metadata.get("choices"):
            for choice in f.metadata["choices"]:
                ns = parser.parse_known_args([cli_flag(f), choice])[0]
                assert engine_args(ns)[f.name] == choice
        else:
            ns = parser.parse_known_args([cli_flag(f), "3"])[0]
            assert engine_args(ns)[f.name] == 3


def test_graduate_maps_every_field_with_a_vllm_flag():
    from npukit.graduate import graduate

    g = graduate(EngineConfig(num_kv_blocks=100, max_model_len=512), "Qwen/Qwen2.5-7B-Instruct", dtype="bfloat16")
    rows = {r.npukit: r for r in g.table}
    for f in engine_fields():
        flag = f.metadata.get("vllm")
        if flag is None:
            continue
        assert f.name in rows, f"graduate does not map {f.name}"
        assert rows[f.name].vllm_flag.removeprefix("--no-").removeprefix("--") == flag.removeprefix("--")


def test_the_dashboard_and_the_run_records_read_the_fields():
    from npukit.bench.workload import KNOBS
    from npukit.dashboards.engine import NOT_SHOWN, TUNED

    names = [f.name for f in CLI_FIELDS]
    assert list(KNOBS) == names
    assert set(TUNED) | set(NOT_SHOWN) <= set(names)


def test_vllm_peer_flags_are_the_fields_vllm_flags():
    from npukit.bench.vllm_peer import ENGINE_FLAGS, PEER_ENGINE_FIELDS

    fields = {f.name: f for f in engine_fields()}
    for name in PEER_ENGINE_FIELDS:
        assert ENGINE_FLAGS[name] == fields[name].metadata["vllm"]
