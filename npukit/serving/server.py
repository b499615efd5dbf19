"""An OpenAI-compatible HTTP server over npukit's engine (what `vllm serve` does, in one readable file).

    npukit serve --model smollm2-135m-instruct --port 8000
    curl -s http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
         -d '{"prompt": "The capital of France is", "max_tokens": 16, "temperature": 0}'

Routes: `GET /health`, `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions` (both
with `"stream": true` as server-sent events, `stream_options.include_usage`), and `GET /stats` (the
engine's block / queue counters; npukit only).

How concurrent requests share one engine (the same shape as vLLM's AsyncLLM, minus the processes):

    HTTP handler (asyncio) --command queue--> engine thread: add_request / abort, then llm.step()
    HTTP handler <--asyncio.Queue (call_soon_threadsafe)-- engine thread: per-step text deltas

NOTE: only the engine thread touches the `LLM` while the server runs. Do not call `llm.generate()`
on the same `LLM` from elsewhere at the same time (two threads stepping one engine corrupt it).

Module-level imports are stdlib only, so `npukit --help` stays instant; FastAPI / uvicorn / httpx
load when an app is built.
"""
# NOTE: no `from __future__ import annotations` here: FastAPI reads the handlers' annotations
# (`request: Request`) at runtime, and Request is imported inside create_app.
import argparse
import asyncio
import dataclasses
import ipaddress
import json
import logging
import math
import queue
import secrets
import socket
import threading
import time
import traceback
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

logger = logging.getLogger("npukit.serving")

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's (and vLLM's) default for /v1/completions


# --------------------------------------------------------------------------------------------------
# Errors in OpenAI's shape
# --------------------------------------------------------------------------------------------------


class OpenAIError(Exception):
    """An error the client sees as `{"error": {"message", "type", "param", "code"}}` with `status_code`."""

    TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
             500: "InternalServerError", 503: "ServiceUnavailableError"}

    def __init__(self, message: str, status_code: int = 400, param: str | None = None):
        super().__init__(message)
        self.message, self.status_code, self.param = message, status_code, param

    def to_dict(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status_code, "Error"),
                          "param": self.param, "code": self.status_code}}


# --------------------------------------------------------------------------------------------------
# The engine thread
# --------------------------------------------------------------------------------------------------


@dataclass
class CompletionDelta:
    """What one sample (choice) of a request produced in one engine step."""

    index: int                    # the sample's index within its request (0 .. n-1)
    text: str                     # text added since the previous delta
    token_ids: list[int]          # token ids added since the previous delta
    logprobs: list[dict[int, float]] | None  # their logprobs (when asked for)
    finish_reason: str | None     # "stop" | "length" | "abort" | None while running
    stop_reason: int | str | None = None
    final_text: str | None = None  # the engine's whole text, on the finishing delta only


@dataclass
class StepUpdate:
    request_id: str
    num_prompt_tokens: int
    deltas: list[CompletionDelta]
    finished: bool


@dataclass
class _Accepted:
    request_id: str


@dataclass
class _Sink:
    """Where a request's updates go: an asyncio queue living on the HTTP handler's event loop."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue

    def put(self, item: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass


@dataclass
class _Tracked:
    sink: _Sink
    sent: dict[int, tuple[int, int]] = field(default_factory=dict)  # index -> (tokens sent, chars sent)


class AsyncEngine:
    """Runs one `LLM` in a background thread; asyncio code submits requests and awaits their deltas.

    NOTE: every `LLM` call (add_request, abort, step, has_unfinished_requests) happens on the engine
    thread. Other threads only put commands on `_commands` (under `_lock`, so none is lost at shutdown).
    """

    def __init__(self, llm):
        self.llm = llm
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._tracked: dict[str, _Tracked] = {}  # engine thread only
        self.num_step_errors = 0

    # ---- called from any thread ------------------------------------------------------------------
    def start(self) -> None:
        with self._lock:
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(target=self._run, name="npukit-engine", daemon=True)
                self._thread.start()

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def is_closed(self) -> bool:
        """True once shut down (or the engine thread died): new requests get 503."""
        return self._closed

    def submit(self, request_id: str, prompt_token_ids: list[int], sampling_params, sink: _Sink,
               arrival_time: float) -> None:
        """Queue a request; its sink then gets `_Accepted`, `StepUpdate`s, or one `OpenAIError`."""
        self.start()
        with self._lock:
            if self._closed:
                sink.put(OpenAIError("the server is shutting down", 503))
                return
            self._commands.put(("add", request_id, prompt_token_ids, sampling_params, sink, arrival_time))
        self._wake.set()

    def abort(self, request_id: str) -> None:
        with self._lock:
            if not self._closed:
                self._commands.put(("abort", request_id))
        self._wake.set()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the engine thread after its current step; in-flight requests are aborted (503)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._lock:
            self._closed = True
            self._drain_commands_on_close()

    # ---- the engine thread -----------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._wake.clear()
                self._process_commands()
                if not self.llm.has_unfinished_requests():
                    self._wake.wait(0.5)
                    continue
                try:
                    outputs = self.llm.step()
                except Exception as e:  # keep serving: fail the requests in flight, free their blocks
                    self.num_step_errors += 1
                    logger.error("engine step failed:\n%s", traceback.format_exc())
                    self._fail_all(OpenAIError(f"engine step failed: {type(e).__name__}: {e}", 500))
                    continue
                for out in outputs:
                    self._route(out)
        finally:
            with self._lock:
                self._closed = True
                self._fail_all(OpenAIError("the server is shutting down", 503))
                self._drain_commands_on_close()

    def _pending_commands(self):
        """The commands queued so far, without waiting for more."""
        while True:
            try:
                yield self._commands.get_nowait()
            except queue.Empty:
                return

    def _process_commands(self) -> None:
        for cmd in self._pending_commands():
            if cmd[0] == "add":
                _, rid, ids, params, sink, arrival = cmd
                try:
                    self.llm.add_request(ids, params, request_id=rid, arrival_time=arrival)
                except (ValueError, TypeError) as e:  # too long, bad params: the message is for the client
                    sink.put(OpenAIError(str(e), 400))
                    continue
                except Exception as e:
                    logger.error("add_request failed:\n%s", traceback.format_exc())
                    sink.put(OpenAIError(f"could not add the request: {type(e).__name__}: {e}", 500))
                    continue
                self._tracked[rid] = _Tracked(sink)
                sink.put(_Accepted(rid))
            else:
                rid = cmd[1]
                if self._tracked.pop(rid, None) is not None:
                    self.llm.abort(rid)

    def _route(self, out) -> None:
        tracked = self._tracked.get(out.request_id)
        if tracked is None:  # aborted meanwhile
            return
        deltas = []
        for c in out.outputs:
            n_tok, n_chr = tracked.sent.get(c.index, (0, 0))
            token_ids = list(c.token_ids[n_tok:])
            text = c.text[n_chr:] if len(c.text) > n_chr else ""
            if not token_ids and not text and c.finish_reason is None:
                continue
            logprobs = list(c.logprobs[n_tok:]) if c.logprobs is not None else None
            tracked.sent[c.index] = (len(c.token_ids), max(n_chr, len(c.text)))
            deltas.append(CompletionDelta(
                index=c.index, text=text, token_ids=token_ids, logprobs=logprobs, finish_reason=c.finish_reason,
                stop_reason=c.stop_reason, final_text=c.text if c.finish_reason is not None else None))
        if out.finished:
            del self._tracked[out.request_id]
        if deltas or out.finished:
            tracked.sink.put(StepUpdate(out.request_id, len(out.prompt_token_ids), deltas, out.finished))

    def _fail_all(self, error: OpenAIError) -> None:
        for rid, tracked in list(self._tracked.items()):
            try:
                self.llm.abort(rid)
            except Exception:  # noqa: BLE001 - best effort while failing
                logger.error("abort(%s) failed:\n%s", rid, traceback.format_exc())
            tracked.sink.put(error)
        self._tracked.clear()

    def _drain_commands_on_close(self) -> None:
        for cmd in self._pending_commands():
            if cmd[0] == "add":
                cmd[4].put(OpenAIError("the server is shutting down", 503))


class _Job:
    """One HTTP request: its engine requests (one per prompt) and the queue their updates arrive on."""

    def __init__(self, engine: AsyncEngine, base_id: str, prompts: list[list[int]], params, arrival: float):
        self.engine = engine
        self.prompts, self.params, self.arrival = prompts, params, arrival
        self.id = base_id
        self.request_ids = [f"{base_id}-{i}" for i in range(len(prompts))]
        self.unfinished = set(self.request_ids)
        self.sink = _Sink(asyncio.get_running_loop(), asyncio.Queue())
        self._early: deque = deque()  # updates that arrived while waiting for the acceptances

    async def start(self) -> None:
        """Submit every prompt and wait until the engine accepted all (or raise the first rejection)."""
        for rid, ids in zip(self.request_ids, self.prompts):
            self.engine.submit(rid, ids, self.params, self.sink, self.arrival)
        pending = set(self.request_ids)
        while pending:
            item = await self.sink.queue.get()
            if isinstance(item, BaseException):
                raise item
            if isinstance(item, _Accepted):
                pending.discard(item.request_id)
            else:
                self._early.append(item)

    async def updates(self) -> AsyncIterator[tuple[int, StepUpdate]]:
        """(prompt index, update) until every engine request finished."""
        while self.unfinished:
            item = self._early.popleft() if self._early else await self.sink.queue.get()
            if isinstance(item, BaseException):
                self.unfinished.clear()  # the engine already dropped them
                raise item
            if isinstance(item, StepUpdate):
                if item.finished:
                    self.unfinished.discard(item.request_id)
                yield self.request_ids.index(item.request_id), item

    def abort(self) -> None:
        """Abort whatever is unfinished (client gone, error): frees the blocks."""
        for rid in self.unfinished:
            self.engine.abort(rid)
        self.unfinished.clear()


# --------------------------------------------------------------------------------------------------
# Request parsing: OpenAI / vLLM JSON -> token ids + SamplingParams
# --------------------------------------------------------------------------------------------------

# OpenAI / vLLM request fields that map 1:1 onto SamplingParams (SamplingParams checks their values).
_SAMPLING_FIELDS = ("n", "temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty",
                    "frequency_penalty", "repetition_penalty", "min_tokens", "stop", "stop_token_ids",
                    "ignore_eos", "skip_special_tokens", "include_stop_str_in_output")

# Fields we refuse rather than silently ignore (value -> is it a use of the feature?).
_UNSUPPORTED = {
    "echo": lambda v: bool(v),
    "suffix": lambda v: v is not None,
    "logit_bias": lambda v: bool(v),
    "tools": lambda v: bool(v),
    "prompt_logprobs": lambda v: v is not None,
    "response_format": lambda v: v is not None and (not isinstance(v, dict) or v.get("type") != "text"),
}


def _max_model_len(llm) -> int | None:
    n = getattr(getattr(llm, "config", None), "max_model_len", None)
    if n is None:
        n = getattr(getattr(getattr(llm, "model", None), "config", None), "max_position_embeddings", None)
    return n


def _sampling_params(body: dict, *, max_tokens: int | None, logprobs: int | None):
    from npukit.engine.sampling_params import SamplingParams

    for name, used in _UNSUPPORTED.items():
        if name in body and used(body[name]):
            raise OpenAIError(f"'{name}' is not supported by npukit serve (vLLM supports more of the OpenAI API).",
                              param=name)
    best_of = body.get("best_of")
    if best_of is not None and best_of != body.get("n", 1):
        raise OpenAIError("'best_of' is not supported by npukit serve; use 'n'.", param="best_of")
    kwargs = {k: body[k] for k in _SAMPLING_FIELDS if body.get(k) is not None}
    try:
        return SamplingParams(max_tokens=max_tokens, logprobs=logprobs, **kwargs)
    except (ValueError, TypeError) as e:
        raise OpenAIError(str(e)) from None


def _check_length(llm, num_prompt_tokens: int, max_tokens: int | None, max_tokens_param: str) -> int | None:
    """The request's max_tokens (filled in when None), or a 400 when prompt + completion cannot fit."""
    limit = _max_model_len(llm)
    if limit is None:
        return max_tokens
    if num_prompt_tokens >= limit:
        raise OpenAIError(
            f"This model's maximum context length is {limit} tokens. However, your request has "
            f"{num_prompt_tokens} input tokens. Please reduce the length of the input.", param="prompt")
    if max_tokens is None:
        return limit - num_prompt_tokens
    if isinstance(max_tokens, int) and not isinstance(max_tokens, bool) and num_prompt_tokens + max_tokens > limit:
        raise OpenAIError(
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the input, {max_tokens} in the "
            f"completion). Please reduce the length of the input or of '{max_tokens_param}'.",
            param=max_tokens_param)
    return max_tokens


def _encode(tokenizer, text: str) -> list[int]:
    # NOTE: the same call the engine uses for a string prompt, so a server answer equals llm.generate's.
    return list(tokenizer(text)["input_ids"])


def _completion_prompts(tokenizer, prompt) -> list[list[int]]:
    """`prompt` as the OpenAI API allows it: str, [str], [int] or [[int]] -> a list of token id lists."""
    def is_ids(x) -> bool:
        return isinstance(x, list) and bool(x) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

    if isinstance(prompt, str):
        prompts = [prompt]
    elif is_ids(prompt):
        return [list(prompt)]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) or is_ids(p) for p in prompt):
        prompts = prompt
    else:
        raise OpenAIError("'prompt' must be a non-empty string, a list of strings, a list of token ids, or a "
                          "list of token id lists.", param="prompt")
    out = []
    for p in prompts:
        if isinstance(p, str) and not p:
            raise OpenAIError("'prompt' must not be empty.", param="prompt")
        out.append(_encode(tokenizer, p) if isinstance(p, str) else list(p))
    return out


def _chat_messages(messages) -> list[dict[str, Any]]:
    """Check OpenAI chat messages; content given as parts ([{"type": "text", "text": ...}]) is joined."""
    if not isinstance(messages, list) or not messages:
        raise OpenAIError("'messages' must be a non-empty list of {'role': ..., 'content': ...} objects.",
                          param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise OpenAIError(f"messages[{i}] must be an object with a string 'role'.", param="messages")
        content = m.get("content")
        if isinstance(content, list):
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise OpenAIError(f"messages[{i}].content: only text parts are supported by npukit serve.",
                                      param="messages")
                texts.append(part["text"])
            content = "\n".join(texts)
        elif content is None:
            content = ""
        elif not isinstance(content, str):
            raise OpenAIError(f"messages[{i}].content must be a string or a list of text parts.", param="messages")
        out.append({**m, "content": content})
    return out


# --------------------------------------------------------------------------------------------------
# Responses
# --------------------------------------------------------------------------------------------------


def _finite(x: float) -> float:
    return x if math.isfinite(x) else -9999.0  # JSON has no -inf; vLLM sends -9999.0 too


def _sampled_logprob(lp: dict[int, float], token_id: int) -> float:
    return _finite(float(lp.get(token_id, float("-inf"))))


def _completion_logprobs(tokenizer, token_ids: list[int], logprobs: list[dict[int, float]], offset: int) -> dict:
    """The legacy completions logprobs object: tokens, token_logprobs, top_logprobs, text_offset."""
    tokens, token_lps, tops, offsets = [], [], [], []
    for tid, lp in zip(token_ids, logprobs):
        piece = tokenizer.decode([tid])
        tokens.append(piece)
        token_lps.append(_sampled_logprob(lp, tid))
        tops.append({tokenizer.decode([t]): _finite(float(v)) for t, v in lp.items()})
        offsets.append(offset)
        offset += len(piece)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def _chat_logprobs(tokenizer, token_ids: list[int], logprobs: list[dict[int, float]], top: int) -> dict:
    def entry(tid: int, value: float) -> dict:
        s = tokenizer.decode([tid])
        return {"token": s, "logprob": _finite(float(value)), "bytes": list(s.encode("utf-8"))}

    content = []
    for tid, lp in zip(token_ids, logprobs):
        ranked = sorted(lp.items(), key=lambda kv: kv[1], reverse=True)[:top]
        content.append({**entry(tid, _sampled_logprob(lp, tid)), "top_logprobs": [entry(t, v) for t, v in ranked]})
    return {"content": content}


def _usage(num_prompt: int, num_completion: int) -> dict[str, int]:
    return {"prompt_tokens": num_prompt, "completion_tokens": num_completion,
            "total_tokens": num_prompt + num_completion}


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


@dataclass
class _Choice:
    """A choice as it accumulates (non-streaming) or as far as it was sent (streaming)."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None


# --------------------------------------------------------------------------------------------------
# The app
# --------------------------------------------------------------------------------------------------


def create_app(llm, served_model_name: str | list[str] | None = None, api_key: str | None = None):
    """A FastAPI app serving `llm` (an `npukit.engine.LLM`) with OpenAI's API.

    `served_model_name`: the name(s) clients use as `model` (default: the model's name or path);
    requests naming another model get 404. `api_key`: when set, `/v1/*` needs
    `Authorization: Bearer <api_key>` (401 otherwise). The engine thread starts with the app (or on the
    first request) and stops, aborting what is in flight, when the app shuts down.
    """
    from contextlib import asynccontextmanager

    from fastapi import Depends, FastAPI, Request
    from fastapi.responses import JSONResponse, Response, StreamingResponse

    names = _served_names(llm, served_model_name)
    tokenizer = llm.tokenizer
    engine = AsyncEngine(llm)

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        await asyncio.to_thread(engine.shutdown)

    app = FastAPI(title="npukit serve", description="OpenAI-compatible API over npukit's engine", lifespan=lifespan)
    app.state.engine = engine
    app.state.llm = llm
    app.state.served_model_names = names

    def error(e: OpenAIError) -> JSONResponse:
        return JSONResponse(e.to_dict(), status_code=e.status_code)

    @app.exception_handler(OpenAIError)
    async def _openai_error(request: Request, e: OpenAIError):
        return error(e)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, e: Exception):
        logger.error("unhandled error on %s:\n%s", request.url.path, traceback.format_exc())
        return error(OpenAIError(f"internal server error: {type(e).__name__}: {e}", 500))

    async def check_api_key(request: Request) -> None:
        # NOTE: a dependency, not an HTTP middleware: Starlette's BaseHTTPMiddleware wraps streaming
        # responses and gets in the way of client-disconnect detection.
        if api_key is not None:
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                raise OpenAIError("Unauthorized: pass the server's API key as 'Authorization: Bearer <key>' "
                                  "(openai.OpenAI(api_key=...)).", 401)

    v1 = {"dependencies": [Depends(check_api_key)]}

    async def read_json(request: Request) -> dict:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise OpenAIError(f"the request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise OpenAIError("the request body must be a JSON object.")
        model = body.get("model")
        if model is not None and model not in names:
            raise OpenAIError(f"The model `{model}` does not exist. This server serves: {', '.join(names)}.",
                              404, param="model")
        if body.get("stream_options") is not None and not body.get("stream"):
            raise OpenAIError("'stream_options' can only be set when 'stream' is true.", param="stream_options")
        return body

    @app.get("/health")
    async def health():
        if engine.is_closed:
            return error(OpenAIError("the engine is stopped", 503))
        return Response(status_code=200)

    @app.get("/stats")
    async def stats():
        s = llm.stats()
        return dataclasses.asdict(s) if dataclasses.is_dataclass(s) else s

    @app.get("/v1/models", **v1)
    async def models():
        created = int(time.time())
        return {"object": "list", "data": [
            {"id": n, "object": "model", "created": created, "owned_by": "npukit", "root": names[0],
             "parent": None, "max_model_len": _max_model_len(llm)} for n in names]}

    @app.post("/v1/completions", **v1)
    async def completions(request: Request):
        arrival = time.perf_counter()
        body = await read_json(request)
        if "prompt" not in body:
            raise OpenAIError("'prompt' is required.", param="prompt")
        prompts = _completion_prompts(tokenizer, body["prompt"])
        # NOTE: max_completion_tokens is the chat API name; accepted here too, as people send it to both
        param = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        asked = body.get(param, DEFAULT_COMPLETION_MAX_TOKENS)
        # NOTE: with "max_tokens": null each prompt may use the rest of the context; one SamplingParams
        # serves all prompts, so take the smallest rest.
        filled = [_check_length(llm, len(ids), asked, param) for ids in prompts]
        max_tokens = asked if asked is not None else min((m for m in filled if m is not None), default=None)
        logprobs = body.get("logprobs")
        params = _sampling_params(body, max_tokens=max_tokens, logprobs=logprobs)
        return await _respond(request, body, prompts, params, arrival, chat=False)

    @app.post("/v1/chat/completions", **v1)
    async def chat_completions(request: Request):
        arrival = time.perf_counter()
        body = await read_json(request)
        messages = _chat_messages(body.get("messages"))
        from npukit.chat import apply_chat_template

        try:
            ids = apply_chat_template(tokenizer, messages, add_generation_prompt=body.get("add_generation_prompt", True),
                                      **(body.get("chat_template_kwargs") or {}))
        except (ValueError, TypeError) as e:
            raise OpenAIError(str(e), param="messages") from None
        except Exception as e:  # noqa: BLE001 - jinja errors from the template (e.g. a role it refuses)
            raise OpenAIError(f"the chat template failed on these messages: {type(e).__name__}: {e}",
                              param="messages") from None
        param = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        max_tokens = _check_length(llm, len(ids), body.get(param), param)
        top = body.get("top_logprobs")
        if top is not None and not body.get("logprobs"):
            raise OpenAIError("'top_logprobs' needs 'logprobs': true.", param="top_logprobs")
        logprobs = (top or 0) if body.get("logprobs") else None
        params = _sampling_params(body, max_tokens=max_tokens, logprobs=logprobs)
        return await _respond(request, body, [ids], params, arrival, chat=True)

    async def _respond(request, body, prompts, params, arrival, *, chat: bool):
        job = _Job(engine, ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex, prompts, params, arrival)
        try:
            await job.start()
        except BaseException:
            job.abort()
            raise
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(_stream(job, body, include_usage, chat), media_type="text/event-stream")
        result = await _cancel_on_disconnect(request, _collect(job))
        if result is None:  # the client went away; its requests were aborted
            return Response(status_code=499)
        choices, num_prompt = result
        return _full_response(job, body, choices, num_prompt, chat)

    async def _collect(job: _Job):
        choices: dict[tuple[int, int], _Choice] = {}
        num_prompt = {}
        try:
            async for p, update in job.updates():
                num_prompt[p] = update.num_prompt_tokens
                for d in update.deltas:
                    c = choices.setdefault((p, d.index), _Choice())
                    c.text += d.text
                    c.token_ids += d.token_ids
                    c.logprobs += d.logprobs or []
                    if d.finish_reason is not None:
                        c.finish_reason, c.stop_reason = d.finish_reason, d.stop_reason
                        c.text = d.final_text  # NOTE: the engine's final text wins (stop strings trimmed)
        finally:
            job.abort()  # no-op when everything finished
        return choices, sum(num_prompt.values())

    def _full_response(job, body, choices, num_prompt, chat):
        n = job.params.n
        out = []
        for (p, i), c in sorted(choices.items()):
            index = p * n + i
            if chat:
                lp = (_chat_logprobs(tokenizer, c.token_ids, c.logprobs, job.params.logprobs)
                      if job.params.logprobs is not None else None)
                out.append({"index": index, "message": {"role": "assistant", "content": c.text},
                            "logprobs": lp, "finish_reason": c.finish_reason, "stop_reason": c.stop_reason})
            else:
                lp = (_completion_logprobs(tokenizer, c.token_ids, c.logprobs, 0)
                      if job.params.logprobs is not None else None)
                out.append({"index": index, "text": c.text, "logprobs": lp, "finish_reason": c.finish_reason,
                            "stop_reason": c.stop_reason})
        num_completion = sum(len(c.token_ids) for c in choices.values())
        return {"id": job.id, "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()), "model": body.get("model") or names[0], "choices": out,
                "usage": _usage(num_prompt, num_completion)}

    async def _stream(job: _Job, body: dict, include_usage: bool, chat: bool) -> AsyncIterator[str]:
        base = {"id": job.id, "object": "chat.completion.chunk" if chat else
                "text_completion", "created": int(time.time()), "model": body.get("model") or names[0]}
        n = job.params.n
        usage_field = {"usage": None} if include_usage else {}
        num_prompt: dict[int, int] = {}
        num_completion = 0
        text_offsets: dict[int, int] = {}
        try:
            if chat:  # the first chunk of each choice carries the role
                for p in range(len(job.prompts)):
                    for i in range(n):
                        yield _sse({**base, "choices": [{"index": p * n + i, "delta": {"role": "assistant", "content": ""},
                                                         "logprobs": None, "finish_reason": None}], **usage_field})
            async for p, update in job.updates():
                num_prompt[p] = update.num_prompt_tokens
                for d in update.deltas:
                    index = p * n + d.index
                    num_completion += len(d.token_ids)
                    lp = None
                    if job.params.logprobs is not None and d.token_ids:
                        if chat:
                            lp = _chat_logprobs(tokenizer, d.token_ids, d.logprobs or [], job.params.logprobs)
                        else:
                            lp = _completion_logprobs(tokenizer, d.token_ids, d.logprobs or [], text_offsets.get(index, 0))
                    text_offsets[index] = text_offsets.get(index, 0) + len(d.text)
                    if not d.text and d.finish_reason is None and lp is None:
                        continue  # a token whose text is not complete yet (e.g. half a UTF-8 character)
                    if chat:
                        delta = {"content": d.text} if (d.text or d.finish_reason is None) else {}
                        choice = {"index": index, "delta": delta, "logprobs": lp, "finish_reason": d.finish_reason}
                    else:
                        choice = {"index": index, "text": d.text, "logprobs": lp, "finish_reason": d.finish_reason}
                    if d.finish_reason is not None:
                        choice["stop_reason"] = d.stop_reason
                    yield _sse({**base, "choices": [choice], **usage_field})
            if include_usage:
                yield _sse({**base, "choices": [], "usage": _usage(sum(num_prompt.values()), num_completion)})
        except OpenAIError as e:  # after the headers went out, an error can only be an event in the stream
            yield _sse(e.to_dict())
        finally:
            # NOTE: the client disconnected when this runs with requests unfinished (Starlette cancels the
            # generator, or closes it): aborting frees their KV blocks. A no-op once all finished.
            job.abort()
        yield "data: [DONE]\n\n"
    return app


def _served_names(llm, served_model_name) -> list[str]:
    if served_model_name:
        names = [served_model_name] if isinstance(served_model_name, str) else list(served_model_name)
    else:
        model = getattr(llm, "model", None)
        path = getattr(getattr(model, "config", None), "_name_or_path", None) or getattr(llm, "model_name", None)
        names = [str(path or "npukit-model")]
    if not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"served_model_name must be a non-empty string or a list of them, got {served_model_name!r}")
    return names


async def _cancel_on_disconnect(request, coro):
    """Run `coro`; if the client disconnects first, cancel it (its `finally` aborts) and return None."""
    async def wait_disconnect():
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    task = asyncio.ensure_future(coro)
    watcher = asyncio.ensure_future(wait_disconnect())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    return None


# --------------------------------------------------------------------------------------------------
# Running a server: in a thread (notebooks, tests) or in the foreground (CLI)
# --------------------------------------------------------------------------------------------------


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
                 startup_timeout: float = 60.0, graceful_timeout: float = 5.0):
        self.app, self.host, self.port = app, host, port
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
        config = uvicorn.Config(self.app, log_level=self.log_level, lifespan="on",
                                timeout_graceful_shutdown=self.graceful_timeout)
        self.server = uvicorn.Server(config)
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
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer <key>' on /v1/* requests")
    p.add_argument("--device", default="auto", help="auto (npu > cuda > mps > cpu), npu, npu:1, cuda, cpu")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16 (310P / 910A: float16)")
    p.add_argument("--gpu-memory-utilization", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn log level (default: info)")
    return add_engine_args(p)


def build_serve_parser() -> argparse.ArgumentParser:
    return add_serve_args(argparse.ArgumentParser(
        prog="npukit serve", description="Serve a model with an OpenAI-compatible API (like `vllm serve`)."))


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def run_serve(args: argparse.Namespace) -> int:
    """`npukit serve` with parsed args; blocks until Ctrl-C. Returns the exit code."""
    import sys

    from npukit.args import error

    if args.gpu_memory_utilization is not None:
        return error("--gpu-memory-utilization is vLLM's (a share of the whole device memory, weights included). "
                     "npukit's knob is --kv-cache-memory-fraction: the share of the memory left after the weights "
                     "that the KV cache may take; or set --num-kv-blocks.")
    if args.model_tag and args.model and args.model_tag != args.model:
        return error(f"two models given ({args.model_tag!r} and --model {args.model!r}); pass one.")
    model = args.model_tag or args.model or "smollm2-135m-instruct"
    try:
        sock = _bind(args.host, args.port)
    except OSError as e:
        return error(str(e))

    from npukit.engine import LLM
    from npukit.engine.config import engine_args

    print(f"npukit serve: loading {model} ...", file=sys.stderr)
    try:
        llm = LLM(model, device=args.device, dtype=args.dtype, **engine_args(args))
    except Exception as e:  # noqa: BLE001 - load errors (missing model, bad device, bad knobs) end here
        sock.close()
        return error(f"could not start the engine for {model!r}: {type(e).__name__}: {e}")
    names = args.served_model_name or [model]
    app = create_app(llm, served_model_name=names, api_key=args.api_key)

    import uvicorn

    port = sock.getsockname()[1]
    url = f"http://{args.host}:{port}"
    print(f"npukit serve: {names[0]} on {url}/v1  (Ctrl-C stops)\n"
          f"  curl -s {url}/v1/models\n"
          f"  curl -s {url}/v1/completions -H 'Content-Type: application/json' "
          f"-d '{{\"model\": \"{names[0]}\", \"prompt\": \"Hello\", \"max_tokens\": 32}}'", file=sys.stderr)
    if not _is_loopback(args.host) and args.api_key is None:
        print(f"npukit serve: WARNING: listening on {args.host} without --api-key: anyone who can reach this "
              "machine can use the model.", file=sys.stderr)
    config = uvicorn.Config(app, log_level=args.log_level, lifespan="on", timeout_graceful_shutdown=5)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn shut down gracefully, then re-raised the Ctrl-C
        pass
    print("npukit serve: stopped", file=sys.stderr)
    return 0


def serve_main(argv: list[str] | None = None) -> int:
    """`npukit serve ...` as a function: parse `argv` and serve until Ctrl-C."""
    return run_serve(build_serve_parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(serve_main())
