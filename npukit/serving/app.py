"""The FastAPI app: OpenAI's routes over the engine thread, plus vLLM's /tokenize, /detokenize, /version, /metrics.

Routes: `GET /health`, `GET /version`, `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions`
(both with `"stream": true` as server-sent events, `stream_options.include_usage`), `POST /tokenize`,
`POST /detokenize`, `GET /metrics` (Prometheus, vLLM's names) and `GET /stats` (npukit's engine counters).

A request's life: `Guard` (host, API key, body size, JSON content type) -> handler reads the body ->
`Preprocessor` (worker thread: parse, template, tokenise, SamplingParams) -> `Job` on the engine thread ->
deltas back on the event loop -> JSON or SSE. The event loop never waits on the engine or on CPU-heavy work.
"""
# NOTE: no `from __future__ import annotations` here: FastAPI reads the handlers' annotations
# (`request: Request`) at runtime.
import asyncio
import logging
import time
import traceback
import uuid
from dataclasses import dataclass
from typing import AsyncIterator

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from . import protocol as p
from .async_engine import AsyncEngine, Job
from .guard import DEFAULT_ALLOWED_HOSTS, DEFAULT_MAX_BODY_BYTES, Guard
from .preprocess import Prepared, Preprocessor
from .protocol import OpenAIError

logger = logging.getLogger("npukit.serving")
router = APIRouter()


@dataclass
class Serving:
    """What the handlers share (app.state.serving)."""

    llm: object
    engine: AsyncEngine
    pre: Preprocessor
    names: list[str]
    max_model_len: int | None


def _serving(request: Request) -> Serving:
    return request.app.state.serving


def error_response(e: OpenAIError) -> JSONResponse:
    return JSONResponse(e.to_dict(), status_code=e.status_code)


# --------------------------------------------------------------------------------------------------
# Errors: every status in OpenAI's shape
# --------------------------------------------------------------------------------------------------


async def _openai_error(request: Request, e: OpenAIError):
    return error_response(e)


async def _http_error(request: Request, e: StarletteHTTPException):
    detail = e.detail if isinstance(e.detail, str) else str(e.detail)
    if e.status_code == 404:
        detail = f"{request.method} {request.url.path} not found (see /docs for the routes)."
    resp = error_response(OpenAIError(detail, e.status_code))
    for k, v in (e.headers or {}).items():
        resp.headers[k] = v
    return resp


async def _validation_error(request: Request, e: RequestValidationError):
    return error_response(OpenAIError(f"invalid request: {e.errors()}"[:1000], 422))


async def _client_gone(request: Request, e: ClientDisconnect):
    return Response(status_code=499)  # NOTE: nobody reads it; no traceback in the log for a client that left


async def _internal_error(request: Request, e: Exception):
    logger.error("unhandled error on %s:\n%s", request.url.path, traceback.format_exc())
    return error_response(OpenAIError(f"internal server error: {type(e).__name__}", 500))


# --------------------------------------------------------------------------------------------------
# Routes
# --------------------------------------------------------------------------------------------------


@router.get("/health")
async def health(request: Request):
    if _serving(request).engine.is_closed:
        return error_response(OpenAIError("the engine is stopped", 503))
    return Response(status_code=200)


@router.get("/version")
async def version():
    from npukit import __version__

    return {"version": __version__}


@router.get("/stats")
async def stats(request: Request):
    # NOTE: the snapshot the engine thread published; taking the engine's lock here would stall the loop
    # for a whole step.
    return _serving(request).engine.stats


@router.get("/metrics")
async def metrics(request: Request):
    s = _serving(request)
    return PlainTextResponse(s.engine.metrics.render(s.engine.stats, s.names[0]),
                             media_type="text/plain; version=0.0.4")


@router.get("/v1/models")
async def models(request: Request):
    s, created = _serving(request), int(time.time())
    return {"object": "list", "data": [
        {"id": n, "object": "model", "created": created, "owned_by": "npukit", "root": s.names[0],
         "parent": None, "max_model_len": s.max_model_len} for n in s.names]}


@router.post("/tokenize")
async def tokenize(request: Request):
    s = _serving(request)
    return await s.pre.run(_tokenize, s, await request.body())


def _tokenize(s: Serving, raw: bytes) -> dict:
    """vLLM's /tokenize: {"prompt": str} or {"messages": [...]} -> {"tokens", "count", "max_model_len"}."""
    body = p.parse_json(raw)
    p.check_common(body, s.names)
    if body.get("messages") is not None:
        ids = s.pre.chat(raw)[1].prompts[0]
    else:
        prompt = p.check_type(body, "prompt", (str,), "a string")
        special = p.check_type(body, "add_special_tokens", (bool,), "true or false")
        ids = s.pre.encode(prompt or "", add_special_tokens=special is not False)
    return {"count": len(ids), "max_model_len": s.max_model_len, "tokens": ids}


@router.post("/detokenize")
async def detokenize(request: Request):
    s = _serving(request)
    return await s.pre.run(_detokenize, s, await request.body())


def _detokenize(s: Serving, raw: bytes) -> dict:
    body = p.parse_json(raw)
    p.check_common(body, s.names)
    ids = body.get("tokens")
    vocab = getattr(s.llm, "vocab_size", None)
    if not isinstance(ids, list) or not all(p.is_int(t) and t >= 0 and (vocab is None or t < vocab) for t in ids):
        raise OpenAIError(f"'tokens' must be a list of token ids in [0, {vocab}).", param="tokens")
    return {"prompt": s.pre.tokenizer.decode(ids)}


@router.post("/v1/completions")
async def completions(request: Request):
    arrival = time.perf_counter()
    s = _serving(request)
    body, prepared = await s.pre.run(s.pre.completion, await request.body())
    return await _respond(request, s, body, prepared, arrival)


@router.post("/v1/chat/completions")
async def chat_completions(request: Request):
    arrival = time.perf_counter()
    s = _serving(request)
    body, prepared = await s.pre.run(s.pre.chat, await request.body())
    return await _respond(request, s, body, prepared, arrival)


async def _respond(request: Request, s: Serving, body: dict, prepared: Prepared, arrival: float):
    chat = prepared.chat
    job = Job(s.engine, ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex, prepared.prompts, prepared.params,
              arrival)
    try:
        await job.start()
    except BaseException:
        job.abort()
        raise
    model = body.get("model") or s.names[0]
    if body.get("stream"):
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return StreamingResponse(_stream(s, job, model, include_usage, chat), media_type="text/event-stream")
    result = await _cancel_on_disconnect(request, _collect(job))
    if result is None:  # the client went away; its requests were aborted
        return Response(status_code=499)
    choices, num_prompt = result
    return _full_response(s, job, model, choices, num_prompt, chat)


async def _collect(job: Job):
    choices: dict[tuple[int, int], p.Choice] = {}
    num_prompt = {}
    try:
        async for i, update in job.updates():
            num_prompt[i] = update.num_prompt_tokens
            for d in update.deltas:
                c = choices.setdefault((i, d.index), p.Choice())
                c.text += d.text
                c.token_ids += d.token_ids
                c.logprobs += d.logprobs or []
                if d.finish_reason is not None:
                    c.finish_reason, c.stop_reason = d.finish_reason, d.stop_reason
                    c.text = d.final_text  # NOTE: the engine's final text wins (stop strings trimmed)
    finally:
        job.abort()  # no-op when everything finished
    return choices, sum(num_prompt.values())


def _full_response(s: Serving, job: Job, model: str, choices, num_prompt: int, chat: bool) -> dict:
    n, tok, want = job.params.n, s.pre.tokenizer, job.params.logprobs is not None
    out = []
    for (i, k), c in sorted(choices.items()):
        index = i * n + k
        if chat:
            lp = p.chat_logprobs(tok, c.token_ids, c.logprobs, job.params.logprobs) if want else None
            out.append({"index": index, "message": {"role": "assistant", "content": c.text},
                        "logprobs": lp, "finish_reason": c.finish_reason, "stop_reason": c.stop_reason})
        else:
            lp = p.completion_logprobs(tok, c.token_ids, c.logprobs, 0) if want else None
            out.append({"index": index, "text": c.text, "logprobs": lp, "finish_reason": c.finish_reason,
                        "stop_reason": c.stop_reason})
    num_completion = sum(len(c.token_ids) for c in choices.values())
    return {"id": job.id, "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": out,
            "usage": p.usage(num_prompt, num_completion)}


def _stream_choice(s: Serving, job: Job, d, index: int, offset: int, chat: bool) -> dict | None:
    """One delta as a streamed choice (None: nothing to send yet, e.g. half a UTF-8 character)."""
    lp = None
    if job.params.logprobs is not None and d.token_ids:
        if chat:
            lp = p.chat_logprobs(s.pre.tokenizer, d.token_ids, d.logprobs or [], job.params.logprobs)
        else:
            lp = p.completion_logprobs(s.pre.tokenizer, d.token_ids, d.logprobs or [], offset)
    if not d.text and d.finish_reason is None and lp is None:
        return None
    if chat:
        delta = {"content": d.text} if (d.text or d.finish_reason is None) else {}
        choice = {"index": index, "delta": delta, "logprobs": lp, "finish_reason": d.finish_reason}
    else:
        choice = {"index": index, "text": d.text, "logprobs": lp, "finish_reason": d.finish_reason}
    if d.finish_reason is not None:
        choice["stop_reason"] = d.stop_reason
    return choice


async def _stream(s: Serving, job: Job, model: str, include_usage: bool, chat: bool) -> AsyncIterator[str]:
    base = {"id": job.id, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()), "model": model}
    n = job.params.n
    usage_field = {"usage": None} if include_usage else {}
    num_prompt: dict[int, int] = {}
    num_completion = 0
    text_offsets: dict[int, int] = {}
    try:
        async for i, update in job.updates():
            num_prompt[i] = update.num_prompt_tokens
            for d in update.deltas:
                index = i * n + d.index
                num_completion += len(d.token_ids)
                if chat and index not in text_offsets:  # the choice's first delta
                    # NOTE: a choice's role chunk goes out with its first token, as vLLM's does: clients (vLLM's
                    # `vllm bench serve` among them) stamp TTFT at the first chunk, so sending it before the
                    # prefill ran would report a TTFT that no token met.
                    yield p.sse({**base, "choices": [{"index": index, "delta": {"role": "assistant", "content": ""},
                                                      "logprobs": None, "finish_reason": None}], **usage_field})
                choice = _stream_choice(s, job, d, index, text_offsets.get(index, 0), chat)
                text_offsets[index] = text_offsets.get(index, 0) + len(d.text)
                if choice is not None:
                    yield p.sse({**base, "choices": [choice], **usage_field})
        if include_usage:
            yield p.sse({**base, "choices": [], "usage": p.usage(sum(num_prompt.values()), num_completion)})
    except OpenAIError as e:  # after the headers went out, an error can only be an event in the stream
        yield p.sse(e.to_dict())
    finally:
        # NOTE: the client disconnected when this runs with requests unfinished (Starlette cancels the
        # generator, or closes it): aborting frees their KV blocks. A no-op once all finished.
        job.abort()
    yield "data: [DONE]\n\n"


async def _cancel_on_disconnect(request: Request, coro):
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
# The app
# --------------------------------------------------------------------------------------------------


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


def _max_model_len(llm) -> int | None:
    n = getattr(getattr(llm, "config", None), "max_model_len", None)
    if n is None:
        n = getattr(getattr(getattr(llm, "model", None), "config", None), "max_position_embeddings", None)
    return n


def create_app(llm, served_model_name: str | list[str] | None = None, api_key: str | None = None, *,
               allowed_origins: list[str] | None = None, allowed_hosts: list[str] | None = DEFAULT_ALLOWED_HOSTS,
               max_request_body_bytes: int = DEFAULT_MAX_BODY_BYTES, trust_request_chat_template: bool = False,
               engine_threads: int | None = None) -> FastAPI:
    """A FastAPI app serving `llm` (an `npukit.engine.LLM`) with OpenAI's API.

    `served_model_name`: the name(s) clients use as `model` (default: the model's name or path); requests
    naming another model get 404. `api_key`: when set, every route but /health and /version needs
    `Authorization: Bearer <api_key>` (401 otherwise). `allowed_origins`: CORS origins (default none: browsers
    may not call the server from other sites). `allowed_hosts`: accepted `Host` headers (default: the
    loopback names; ["*"]: any). The engine thread starts with the app (or on the first request) and stops,
    aborting what is in flight, when the app shuts down.
    """
    from contextlib import asynccontextmanager

    names = _served_names(llm, served_model_name)
    limit = _max_model_len(llm)
    serving = Serving(llm, AsyncEngine(llm, num_threads=engine_threads),
                      Preprocessor(llm.tokenizer, limit, names, trust_request_chat_template), names, limit)

    @asynccontextmanager
    async def lifespan(app):
        serving.engine.start()
        yield
        await asyncio.to_thread(serving.engine.shutdown)
        serving.pre.close()

    app = FastAPI(title="npukit serve", description="OpenAI-compatible API over npukit's engine", lifespan=lifespan)
    app.state.serving = serving
    app.state.engine, app.state.llm, app.state.served_model_names = serving.engine, llm, names
    app.include_router(router)
    for exc, handler in ((OpenAIError, _openai_error), (StarletteHTTPException, _http_error),
                         (RequestValidationError, _validation_error), (ClientDisconnect, _client_gone),
                         (Exception, _internal_error)):
        app.add_exception_handler(exc, handler)
    app.add_middleware(Guard, api_key=api_key, allowed_hosts=allowed_hosts, max_body_bytes=max_request_body_bytes)
    if allowed_origins:
        from starlette.middleware.cors import CORSMiddleware

        # NOTE: added last = outermost: it answers preflight OPTIONS itself, before Guard asks for a key
        app.add_middleware(CORSMiddleware, allow_origins=allowed_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    return app
