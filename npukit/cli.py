"""The `npukit` command line: doctor | download | chat | quickstart | serve | bench | plan | graduate.

    npukit doctor [--json]                      check torch / torch_npu / CANN / device / env vars
    npukit download Qwen/Qwen2.5-0.5B-Instruct  fetch a model (HF, mirror, openMind, ModelScope)
    npukit chat --prompt "Hello"                talk to a model (interactive without --prompt)
    npukit quickstart                           doctor + load SmolLM2 + one timed answer
    npukit serve                                OpenAI-compatible server on the engine (like `vllm serve`)
    npukit bench serve | throughput             benchmarks (like `vllm bench serve | throughput`)
    npukit plan Qwen/Qwen3-32B --device 300I-Duo will it fit? memory per device for every tensor-parallel size
    npukit graduate                             the equivalent vLLM commands for your settings

Adding a subcommand (`bench`, `serve`, ...): write `_cmd_xxx(args) -> int` and register it in
`build_parser()` with `set_defaults(func=_cmd_xxx)`.
NOTE: import torch / transformers / npukit modules that import them *inside* the `_cmd_xxx` functions,
so `npukit --help` stays instant.
"""
from __future__ import annotations

import argparse
import sys

from npukit.args import add_model_args, error, positive_int
from npukit.i18n import prompt, t

# NOTE: kept in sync with npukit.chat.PRESETS by a test; not imported here because npukit.chat imports torch.
PRESETS = ("greedy", "balanced", "creative")
QUICKSTART_QUESTION = "capital"  # npukit.i18n.prompt("capital"): the question in the user's language


# ---------------------------------------------------------------------------------------------
# doctor
# ---------------------------------------------------------------------------------------------


def _cmd_doctor(args: argparse.Namespace) -> int:
    from npukit.doctor import doctor

    report = doctor()
    print(report.to_json() if args.json else report)
    return 0 if report.ok else 1


# ---------------------------------------------------------------------------------------------
# download
# ---------------------------------------------------------------------------------------------


def _cmd_download(args: argparse.Namespace) -> int:
    from npukit import hub

    try:
        path = hub.download(
            args.repo_id, source=args.source, revision=args.revision, endpoint=args.endpoint,
            local_dir=args.local_dir, cache_dir=args.cache_dir, allow_patterns=args.include,
            ignore_patterns=args.exclude, token=args.token, offline=True if args.offline else None,
            progress=not args.quiet,
        )
    except (hub.HubError, ValueError) as e:
        return error(str(e))
    print(path)
    return 0


# ---------------------------------------------------------------------------------------------
# chat / quickstart: shared model loading
# ---------------------------------------------------------------------------------------------


def _load(args: argparse.Namespace):
    """(model, tokenizer), or a user-facing error message (str) when loading failed for a known reason."""
    import npukit
    from npukit.device import DeviceError
    from npukit.hub import HubError
    from npukit.loading import ModelLoadError
    from npukit.samples import EmbeddedModelError

    try:
        return npukit.load_model(args.model, device=args.device, dtype=args.dtype)
    except (ModelLoadError, DeviceError, EmbeddedModelError, HubError, ValueError) as e:
        return t("cli.could_not_load", model=args.model, error=e)


def _print_load_report(model, file=None) -> None:
    report = getattr(model, "load_report", None)
    if report is not None:
        print(report, file=file or sys.stderr)


def _cmd_chat(args: argparse.Namespace) -> int:
    from npukit.chat import Chat

    loaded = _load(args)
    if isinstance(loaded, str):
        return error(loaded)
    model, tokenizer = loaded
    # NOTE: the load report goes to stderr so `npukit chat --prompt ... > answer.txt` keeps only the answer.
    _print_load_report(model)
    try:
        chat = Chat(model, tokenizer, system=args.system, preset=args.preset, max_new_tokens=args.max_new_tokens)
    except ValueError as e:  # e.g. a tokenizer without a chat template
        return error(str(e))

    if args.prompt is not None:
        _stream_reply(chat, args.prompt)
        return 0

    print(t("cli.chat_intro"), file=sys.stderr)
    while True:
        try:
            text = input(t("cli.you")).strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            chat.reset()
            print(t("cli.cleared"), file=sys.stderr)
            continue
        print(t("cli.assistant"), end="", flush=True)
        try:
            _stream_reply(chat, text)
        except KeyboardInterrupt:  # the stream's finally stops generate; the turn is not kept
            print("\n" + t("cli.stopped"), file=sys.stderr)


def _stream_reply(chat, text: str) -> None:
    for piece in chat.stream(text):
        print(piece, end="", flush=True)
    print()


def _cmd_quickstart(args: argparse.Namespace) -> int:
    from npukit.doctor import doctor
    from npukit.metrics import format_bytes, format_seconds, time_generation

    report = doctor()
    print(report.summary())
    if not report.ok:
        print(report)
        return 1

    print("\n" + t("cli.loading", model=args.model))
    loaded = _load(args)
    if isinstance(loaded, str):
        return error(loaded)
    model, tokenizer = loaded
    _print_load_report(model, file=sys.stdout)

    print("\n" + t("cli.question", prompt=args.prompt))
    timing = time_generation(model, tokenizer, [{"role": "user", "content": args.prompt}],
                             max_new_tokens=args.max_new_tokens, do_sample=False)
    print(t("cli.answer", answer=timing.text.strip()))
    rate = timing.output_tokens_per_s
    print("\n" + t("cli.timing", ttft=format_seconds(timing.ttft), tpot=format_seconds(timing.tpot),
                    rate="?" if rate is None else f"{rate:.1f}", tokens=timing.metrics.num_output_tokens,
                    memory=format_bytes(timing.peak_memory_bytes), device=timing.device))
    print("\n" + t("cli.next"))
    return 0


# ---------------------------------------------------------------------------------------------
# the parser
# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """`npukit COMMAND ...`: the learning commands here, the serving / benchmark / graduate ones from their
    modules (each module owns its flags: add_xxx_args)."""
    from npukit import __version__

    parser = argparse.ArgumentParser(
        prog="npukit", description="Learn and tune LLM inference on Ascend NPUs (torch_npu), with CUDA / CPU fallback.")
    parser.add_argument("--version", action="version", version=f"npukit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_doctor_and_download(sub)
    _add_chat_and_quickstart(sub)
    _add_serve_bench_graduate(sub)
    return parser


def _add_doctor_and_download(sub) -> None:
    from npukit.hub import SOURCES  # npukit.hub imports nothing heavy at module level

    p = sub.add_parser("doctor", help="check torch / torch_npu / CANN / device / environment and explain problems",
                       description="Check the Python / torch / torch_npu / CANN stack, the device and environment "
                                   "variables. Exit code 1 when any check FAILs.")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_cmd_doctor)

    p = sub.add_parser("download", help="download a model repo and print its local folder",
                       description="Download a model repo (Hugging Face or its mirror, openMind, ModelScope) and "
                                   "print the local folder. Exit code 2 on failure, with a message that says why.")
    p.add_argument("repo_id", help="hub id like Qwen/Qwen2.5-0.5B-Instruct (or a local model folder)")
    p.add_argument("--source", choices=SOURCES, default="hf", help="where to download from (default: hf)")
    p.add_argument("--revision", help="branch, tag or commit")
    p.add_argument("--endpoint", help="hub endpoint, e.g. https://hf-mirror.com (default: $HF_ENDPOINT)")
    p.add_argument("--local-dir", help="write plain files to this folder instead of the hub cache")
    p.add_argument("--cache-dir", help="hub cache folder (default: the hub's own, e.g. $HF_HOME/hub)")
    p.add_argument("--include", nargs="+", metavar="PATTERN", help="only files matching these globs")
    p.add_argument("--exclude", nargs="+", metavar="PATTERN", help="skip files matching these globs")
    p.add_argument("--token", help="access token for gated / private repos (default: $HF_TOKEN or the saved login)")
    p.add_argument("--offline", action="store_true", help="use the local cache only (default: $HF_HUB_OFFLINE)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_download)


def _add_chat_and_quickstart(sub) -> None:
    p = sub.add_parser("chat", help="chat with a model (one-shot with --prompt, else interactive)",
                       description="Chat with a model. With --prompt: answer once and exit. Without: an interactive "
                                   "session (/reset clears the history, /exit quits). Replies stream as they are "
                                   "generated; the load report goes to stderr.")
    add_model_args(p)
    p.add_argument("--prompt", help="ask this once, print the answer and exit")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--max-new-tokens", type=positive_int, default=256, help="reply length limit (default: 256)")
    p.add_argument("--preset", choices=PRESETS, default="greedy", help="sampling preset (default: greedy)")
    p.set_defaults(func=_cmd_chat)

    p = sub.add_parser("quickstart", help="doctor summary, load SmolLM2, one timed answer (TTFT / TPOT / tok/s)",
                       description="The first five minutes: check the environment, load the embedded "
                                   "SmolLM2-135M-Instruct, ask it one question greedily and time the answer.")
    add_model_args(p)
    question = prompt(QUICKSTART_QUESTION)
    p.add_argument("--prompt", default=question, help=f"the question (default: {question!r})")
    p.add_argument("--max-new-tokens", type=positive_int, default=64, help="answer length limit (default: 64)")
    p.set_defaults(func=_cmd_quickstart)


def _add_serve_bench_graduate(sub) -> None:
    from npukit.bench.serve import add_bench_serve_args, run_bench_serve
    from npukit.bench.throughput import add_bench_throughput_args, run_bench_throughput
    from npukit.graduate import add_graduate_args, run_graduate
    from npukit.plan import add_plan_args, run_plan
    from npukit.serving.server import add_serve_args, run_serve

    p = sub.add_parser("serve", help="OpenAI-compatible server over npukit's engine (like `vllm serve`)")
    add_serve_args(p)
    p.set_defaults(func=run_serve)

    p = sub.add_parser("bench", help="benchmarks (like `vllm bench`)")
    bench = p.add_subparsers(dest="bench_command", metavar="BENCH", required=True)
    q = bench.add_parser("serve", help="benchmark an OpenAI-compatible server (like `vllm bench serve`)")
    add_bench_serve_args(q)
    q.set_defaults(func=run_bench_serve)
    q = bench.add_parser("throughput", help="offline throughput: npukit's engine vs HF static batches vs "
                                            "generate_batch (vs vLLM-CPU) (like `vllm bench throughput`)",
                         description="Offline throughput benchmark, like `vllm bench throughput`: one seeded workload "
                                     "(greedy, ignore_eos) through npukit's engine, HF generate in static batches, "
                                     "transformers' generate_batch and, with --vllm-python, vLLM-CPU; wall and CPU "
                                     "seconds, output tok/s and the ratios side by side, plus batch-1 TPOT, KV cache "
                                     "use, prefix-cached TTFT and useful FLOP/s vs the matmul peak. Runs on the CPU.")
    add_bench_throughput_args(q)
    q.set_defaults(func=run_bench_throughput)

    p = sub.add_parser("plan", help="will it fit? weights, KV cache and activations per device for every "
                                    "tensor-parallel size, before any download",
                       description="The memory bill of a model (from its config.json only) on an Ascend NPU, a GPU or "
                                   "this machine's device: weight bytes and KV bytes per token (exact), activations "
                                   "and workspace (estimates), and for every valid --tensor-parallel-size the KV "
                                   "tokens per device, how many max-model-len sequences fit, the smallest size "
                                   "that fits and the `vllm serve` command it implies.")
    add_plan_args(p)
    p.set_defaults(func=run_plan)

    p = sub.add_parser("graduate", help="print the equivalent `vllm serve` / `vllm bench` commands")
    add_graduate_args(p)
    p.set_defaults(func=run_graduate)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `npukit` command; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
