"""argparse building blocks that every `npukit` subcommand shares (stdlib only, so `npukit --help` stays instant).

The subcommand modules (`npukit.bench.serve`, `npukit.bench.throughput`, `npukit.serving.server`,
`npukit.graduate`) import from here, and `npukit.cli` imports them: no module imports `npukit.cli` back.
"""
from __future__ import annotations

import argparse
import sys

from npukit.i18n import t
from npukit.samples import DEFAULT_MODEL


def error(message: str, code: int = 2) -> int:
    """Print a user-facing error (no traceback) and return the exit code. Every subcommand uses it.

    The prefix follows npukit's language (NPUKIT_LANG=zh: "npukit: 错误: ..."); when npukit.doctor knows the
    error (a torch / CANN mismatch, out of memory, ...) its explanation follows on the next line.
    """
    from npukit.doctor import explain_error  # NOTE: stdlib + packaging only: `npukit --help` stays instant

    print(t("cli.error", message=message), file=sys.stderr)
    if explanation := explain_error(message):
        print(explanation, file=sys.stderr)
    return code


def positive_int(text: str) -> int:
    """argparse type for counts: an int >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_model_args(p: argparse.ArgumentParser) -> None:
    """--model / --device / --dtype, as every subcommand that loads a model takes them."""
    p.add_argument("--model", default=DEFAULT_MODEL, help="embedded name (smollm2-135m-instruct, tiny-llama, "
                                                         "qwen2-1024x8), model folder or hub id "
                                                         f"(default: {DEFAULT_MODEL})")
    p.add_argument("--device", default="auto",
                   help="auto (npu > cuda > mps > cpu), npu, npu:1, cuda, cpu (default: auto)")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16 (default: auto)")
