"""Running the server: socket binding, uvicorn with limits, `ServerThread` (notebooks, tests), `npukit serve`.

    npukit serve --model smollm2-135m-instruct --port 8000
    curl -s http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
         -d '{"prompt": "The capital of France is", "max_tokens": 16, "temperature": 0}'

The parts: `protocol` (OpenAI JSON in and out, `OpenAIError`), `preprocess` (templating and tokenising off
the event loop), `async_engine` (the engine thread), `guard` (host, key, body size, content type), `app`
(the FastAPI routes), `prometheus` (/metrics) and this module.

Module-level imports are stdlib only, so `npukit --help` stays instant; FastAPI / uvicorn / httpx
load when an app is built.
"""
import argparse
import ipaddress
import signal
import socket
import threading
import time
from dataclasses import dataclass

DEFAULT_LIMIT_CONCURRENCY = 1024      # open connections + running handlers before uvicorn answers 503
DEFAULT_TIMEOUT_KEEP_ALIVE = 5        # s an idle keep-alive connection stays open (uvicorn's default)
DEFAULT_TIMEOUT_REQUEST_READ = 15.0   # s a client has to send a whole request (headers and body)


@dataclass
class Limits:
    """What a client may hold: connections, time to send a request, idle keep-alive time."""

    limit_concurrency: int | None = DEFAULT_LIMIT_CONCURRENCY
    timeout_keep_alive: int = DEFAULT_TIMEOUT_KEEP_ALIVE
    timeout_request_read: float = DEFAULT_TIMEOUT_REQUEST_READ


def _protocol_class(timeout_request_read: float):
    """uvicorn's h11 protocol plus a request read timeout: a connection that has not sent a whole request
    `timeout_request_read` seconds after it opened (or after its last response) is closed (slow-loris)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class TimedH11Protocol(H11Protocol):
        _read_timer = None

        def _arm(self) -> None:
            if self._read_timer is not None:
                self._read_timer.cancel()
            self._read_timer = self.loop.call_later(timeout_request_read, self._read_timeout)

        def _read_timeout(self) -> None:
            # NOTE: only while the client still owes us its request; a response in progress is never cut
            if self.conn.their_state in (h11.IDLE, h11.SEND_BODY) and self.conn.our_state == h11.IDLE \
                    and not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc) -> None:
            if self._read_timer is not None:
                self._read_timer.cancel()
            super().connection_lost(exc)

    return TimedH11Protocol


def uvicorn_config(app, log_level: str = "info", limits: Limits | None = None, graceful_timeout: float = 5.0):
    import uvicorn

    limits = limits or Limits()
    return uvicorn.Config(app, log_level=log_level, lifespan="on", timeout_graceful_shutdown=graceful_timeout,
                          http=_protocol_class(limits.timeout_request_read), loop="asyncio",
                          limit_concurrency=limits.limit_concurrency, timeout_keep_alive=limits.timeout_keep_alive,
                          h11_max_incomplete_event_size=64 * 1024)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}. Pick another --port "
                      "(0 = any free port) or stop the process that uses it.") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class ServerThread:
    """Run an app with uvicorn in a background thread; a context manager for notebooks and tests.

        with ServerThread(create_app(llm, served_model_name="tiny")) as server:
            client = openai.OpenAI(base_url=server.base_url, api_key="none")

    `port=0` picks a free port. Entering waits until the app started and `/health` answers; leaving stops the server
    (in-flight streams are cancelled after `graceful_timeout` seconds and their requests aborted).
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
                 startup_timeout: float = 60.0, graceful_timeout: float = 5.0, limits: Limits | None = None):
        self.app, self.host, self.port, self.limits = app, host, port, limits
        self.log_level, self.startup_timeout, self.graceful_timeout = log_level, startup_timeout, graceful_timeout
        self.server = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def base_url(self) -> str:
        """The OpenAI client's base_url: `<url>/v1`."""
        return self.url + "/v1"

    def start(self) -> "ServerThread":
        import httpx
        import uvicorn

        sock = _bind(self.host, self.port)
        self.port = sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn_config(self.app, self.log_level, self.limits, self.graceful_timeout))
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]},
                                        name=f"npukit-server-{self.port}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if not self._thread.is_alive():
                raise RuntimeError(f"the server on {self.url} stopped during startup; see the log above.")
            if self.server.started:
                try:  # any answer will do (an app without /health says 404)
                    if httpx.get(self.url + "/health", timeout=2.0).status_code < 500:
                        return self
                except httpx.HTTPError:
                    pass
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"the server on {self.url} did not answer /health within {self.startup_timeout} s.")
            time.sleep(0.05)

    def stop(self, timeout: float = 30.0) -> None:
        if self.server is not None:
            self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        alive = self._thread is not None and self._thread.is_alive()
        return f"ServerThread({self.url}, {'running' if alive else 'stopped'})"


# --------------------------------------------------------------------------------------------------
# CLI: npukit serve
# --------------------------------------------------------------------------------------------------


def add_serve_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The `npukit serve` flags, named like `vllm serve`'s. Unset engine flags keep EngineConfig's defaults."""
    from npukit.engine.config import add_engine_args

    p.add_argument("model_tag", nargs="?", metavar="MODEL",
                   help="the model, like `vllm serve MODEL` (same as --model)")
    p.add_argument("--model", default=None,
                   help="embedded name (smollm2-135m-instruct, tiny-llama), model folder or hub id "
                        "(default: smollm2-135m-instruct)")
    p.add_argument("--served-model-name", nargs="+", default=None,
                   help="name(s) clients pass as `model` (default: the model argument)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0 = every interface)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0 = any free port)")
    p.add_argument("--device", default="auto", help="auto (npu > cuda > mps > cpu), npu, npu:1, cuda, cpu")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16 (310P / 910A: float16)")
    p.add_argument("--gpu-memory-utilization", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn log level (default: info)")
    _add_safety_args(p)
    return add_engine_args(p)


def _add_safety_args(p: argparse.ArgumentParser) -> None:
    from npukit.args import positive_int

    from .guard import DEFAULT_MAX_BODY_BYTES

    g = p.add_argument_group("security and limits")
    g.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer <key>' on every route but /health and /version")
    g.add_argument("--allowed-origins", nargs="+", default=None, metavar="ORIGIN",
                   help="CORS: web origins that may call the server from a browser (default: none)")
    g.add_argument("--allowed-hosts", nargs="+", default=None, metavar="HOST",
                   help="Host headers to answer (default: localhost, 127.0.0.1, ::1 when --host is a loopback "
                        "address, else any); guards against DNS rebinding")
    g.add_argument("--trust-request-chat-template", action="store_true",
                   help="let requests bring their own chat_template (vLLM's flag; off: such requests get 403)")
    g.add_argument("--max-request-body-bytes", type=positive_int, default=DEFAULT_MAX_BODY_BYTES,
                   help=f"largest request body (default: {DEFAULT_MAX_BODY_BYTES}; larger: 413)")
    g.add_argument("--limit-concurrency", type=positive_int, default=DEFAULT_LIMIT_CONCURRENCY,
                   help=f"open connections before new ones get 503 (default: {DEFAULT_LIMIT_CONCURRENCY})")
    g.add_argument("--timeout-keep-alive", type=positive_int, default=DEFAULT_TIMEOUT_KEEP_ALIVE,
                   help=f"seconds an idle keep-alive connection stays open (default: {DEFAULT_TIMEOUT_KEEP_ALIVE})")
    g.add_argument("--timeout-request-read", type=float, default=DEFAULT_TIMEOUT_REQUEST_READ,
                   help="seconds a client has to send a whole request, headers and body "
                        f"(default: {DEFAULT_TIMEOUT_REQUEST_READ:g})")
    g.add_argument("--engine-threads", type=positive_int, default=None,
                   help="torch threads of the engine thread (default: torch's; leave a core for the event loop)")


def build_serve_parser() -> argparse.ArgumentParser:
    return add_serve_args(argparse.ArgumentParser(
        prog="npukit serve", description="Serve a model with an OpenAI-compatible API (like `vllm serve`)."))


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _create_app_from_args(llm, args, names):
    from .app import create_app

    hosts = args.allowed_hosts or (None if _is_loopback(args.host) else ["*"])
    extra = {} if hosts is None else {"allowed_hosts": hosts}
    return create_app(llm, served_model_name=names, api_key=args.api_key, allowed_origins=args.allowed_origins,
                      max_request_body_bytes=args.max_request_body_bytes, engine_threads=args.engine_threads,
                      trust_request_chat_template=args.trust_request_chat_template, **extra)


def run_serve(args: argparse.Namespace) -> int:
    """`npukit serve` with parsed args; blocks until Ctrl-C. Returns the exit code."""
    import sys

    from npukit.args import error
    from npukit.i18n import t

    if args.gpu_memory_utilization is not None:
        return error(t("cli.serve_gpu_memory_utilization"))
    if args.model_tag and args.model and args.model_tag != args.model:
        return error(t("cli.serve_two_models", tag=args.model_tag, model=args.model))
    if args.timeout_request_read <= 0:
        return error(t("cli.serve_bad_timeout", value=args.timeout_request_read))
    model = args.model_tag or args.model or "smollm2-135m-instruct"
    try:
        sock = _bind(args.host, args.port)
    except OSError as e:
        return error(str(e))

    from npukit.engine import LLM
    from npukit.engine.config import engine_args

    print(t("cli.serve_loading", model=model), file=sys.stderr)
    try:
        llm = LLM(model, device=args.device, dtype=args.dtype, **engine_args(args))
    except Exception as e:  # noqa: BLE001 - load errors (missing model, bad device, bad knobs) end here
        sock.close()
        return error(t("cli.serve_engine_failed", model=model, error=f"{type(e).__name__}: {e}"))
    names = args.served_model_name or [model]
    app = _create_app_from_args(llm, args, names)
    _print_banner(args, names, sock.getsockname()[1])
    import uvicorn

    limits = Limits(args.limit_concurrency, args.timeout_keep_alive, args.timeout_request_read)
    server = uvicorn.Server(uvicorn_config(app, args.log_level, limits))
    engine = app.state.engine

    def serve_http() -> None:
        try:
            server.run(sockets=[sock])
        finally:  # the app shut down (its lifespan stopped the engine) or never started: end engine.run()
            engine.shutdown()

    # NOTE: the engine steps in this thread, the one that loaded the model, and uvicorn serves from a second
    # one: on CPU a decode step is ~1.5x slower in a thread that did not load the model (see the NOTE in
    # async_engine.py). Ctrl-C / SIGTERM reach uvicorn's graceful shutdown (a second Ctrl-C forces it);
    # requests in flight keep being stepped until the app's shutdown stops the engine.
    handlers = {sig: signal.signal(sig, server.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
    web = threading.Thread(target=serve_http, name="npukit-http", daemon=True)
    try:
        engine.run(on_ready=web.start)
        web.join()
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    print("npukit serve: stopped", file=sys.stderr)
    return 0


def _print_banner(args, names: list[str], port: int) -> None:
    import sys

    url = f"http://{args.host}:{port}"
    print(f"npukit serve: {names[0]} on {url}/v1  (Ctrl-C stops)\n"
          f"  curl -s {url}/v1/models\n"
          f"  curl -s {url}/v1/completions -H 'Content-Type: application/json' "
          f"-d '{{\"model\": \"{names[0]}\", \"prompt\": \"Hello\", \"max_tokens\": 32}}'", file=sys.stderr)
    if not _is_loopback(args.host) and args.api_key is None:
        print(f"npukit serve: WARNING: listening on {args.host} without --api-key: anyone who can reach this "
              "machine can use the model.", file=sys.stderr)


def serve_main(argv: list[str] | None = None) -> int:
    """`npukit serve ...` as a function: parse `argv` and serve until Ctrl-C."""
    return run_serve(build_serve_parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(serve_main())
