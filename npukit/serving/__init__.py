"""Serving: an OpenAI-compatible HTTP server over npukit's engine (what `vllm serve` does).

    from npukit.serving import ServerThread, create_app   # in a notebook: a server in a background thread
    npukit serve --model smollm2-135m-instruct --port 8000  # from the shell

Modules, in the order a request meets them: server (sockets, uvicorn limits, CLI) -> guard (host, key, body
size, content type) -> app (routes) -> preprocess + protocol (JSON -> token ids + SamplingParams, off the
event loop) -> async_engine (the engine thread) -> app (JSON / SSE) ; prometheus renders /metrics.
"""
import importlib

_EXPORTS = {"AsyncEngine": "async_engine", "OpenAIError": "protocol", "create_app": "app", "Limits": "server",
            "ServerThread": "server", "add_serve_args": "server", "build_serve_parser": "server",
            "run_serve": "server", "serve_main": "server"}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    # NOTE: lazy, so `npukit --help` does not import FastAPI
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
