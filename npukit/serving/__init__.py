"""Serving: an OpenAI-compatible HTTP server over npukit's engine (what `vllm serve` does).

    from npukit.serving import ServerThread, create_app   # in a notebook: a server in a background thread
    npukit serve --model smollm2-135m-instruct --port 8000  # from the shell
"""
from .server import (AsyncEngine, OpenAIError, ServerThread, add_serve_args, build_serve_parser, create_app,
                     run_serve, serve_main)

__all__ = ["AsyncEngine", "OpenAIError", "ServerThread", "add_serve_args", "build_serve_parser", "create_app",
           "run_serve", "serve_main"]
