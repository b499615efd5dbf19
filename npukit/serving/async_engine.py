"""The engine thread: one `LLM` stepped in a background thread, fed by a command queue.

How concurrent requests share one engine (the same shape as vLLM's AsyncLLM, minus the processes):

    HTTP handler (asyncio) --command queue--> engine thread: add_request / abort, then llm.step()
    HTTP handler <--asyncio.Queue (call_soon_threadsafe)-- engine thread: per-step text deltas
    /stats, /metrics <-- the snapshot the engine thread publishes after its steps (never the engine's lock)

NOTE: only the engine thread touches the `LLM` while the server runs. Do not call `llm.generate()`
on the same `LLM` from elsewhere at the same time (two threads stepping one engine corrupt it).

NOTE: on CPU, step the engine in the thread that loaded the model when you can (`AsyncEngine.run`, what
`npukit serve` does from its main thread; vLLM's engine core also steps in its process's main thread). Each
thread that runs torch ops gets its own OpenMP thread team, and GNU OpenMP (torch's) stops spinning between
parallel regions once its teams hold more threads than there are cores: every one of the ~1,000 small ops of a
decode step then wakes its workers from sleep. Measured on 2 cores, SmolLM2 fp32: a batch-1 step took 51 ms in
a second thread vs 33 ms in the loading thread (a 576x1536 matmul at one row: 111 vs 71 us). `start()`'s
background thread (notebooks, tests: `ServerThread`) pays that.
"""
import asyncio
import dataclasses
import logging
import queue
import threading
import time
import traceback
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from .prometheus import ServingMetrics
from .protocol import OpenAIError

logger = logging.getLogger("npukit.serving")

STATS_INTERVAL_S = 0.05  # how often the engine thread republishes its stats while it is busy


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
class Sink:
    """Where a request's updates go: an asyncio queue living on the HTTP handler's event loop."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue

    def put(self, item: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass


def _deliver(items: list) -> None:
    for q, item in items:
        q.put_nowait(item)


class _Outbox:
    """A step's updates, handed to each event loop in one call (one wake-up per step, not one per request)."""

    def __init__(self):
        self.items: dict[asyncio.AbstractEventLoop, list] = {}

    def put(self, sink: Sink, item: Any) -> None:
        self.items.setdefault(sink.loop, []).append((sink.queue, item))

    def flush(self) -> None:
        for loop, items in self.items.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # that event loop is closed: nobody is listening any more
                pass
        self.items = {}


@dataclass
class _Tracked:
    sink: Sink
    sent: dict[int, tuple[int, int]] = field(default_factory=dict)  # index -> (tokens sent, chars sent)


class AsyncEngine:
    """Runs one `LLM` in a background thread; asyncio code submits requests and awaits their deltas.

    NOTE: every `LLM` call (add_request, abort, step, has_unfinished_requests) happens on the engine
    thread. Other threads only put commands on `_commands` (under `_lock`, so none is lost at shutdown).
    """

    def __init__(self, llm, num_threads: int | None = None):
        self.llm = llm
        self.num_threads = num_threads  # torch intra-op threads of the engine thread (None: torch's default)
        self.metrics = ServingMetrics()
        self.num_step_errors = 0
        self.stats: dict[str, Any] = self._read_stats()  # NOTE: replaced whole, never mutated: safe to read anywhere
        self._stats_time = 0.0
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._done = threading.Event()  # set when the stepping loop has ended (in whichever thread ran it)
        self._closed = False
        self._thread: threading.Thread | None = None
        self._tracked: dict[str, _Tracked] = {}  # engine thread only

    # ---- called from any thread ------------------------------------------------------------------
    def start(self) -> None:
        """Step the engine in a background thread (unless it runs already, here or in `run`)."""
        with self._lock:
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(target=self._run, name="npukit-engine", daemon=True)
                self._thread.start()

    def run(self, on_ready: Callable[[], None] | None = None) -> None:
        """Step the engine in the calling thread until `shutdown()` (see the NOTE at the top: on CPU, call it
        from the thread that loaded the model). `on_ready` is called once the engine belongs to this thread,
        e.g. to start the HTTP server, whose app would otherwise start a background engine thread."""
        with self._lock:
            if self._thread is not None or self._closed:
                raise RuntimeError("the engine is already running (or was shut down); run() must come first")
            self._thread = threading.current_thread()
        if on_ready is not None:
            on_ready()
        self._run()

    @property
    def is_running(self) -> bool:
        return self._thread is not None and not self._done.is_set()

    @property
    def is_closed(self) -> bool:
        """True once shut down (or the engine thread died): new requests get 503."""
        return self._closed

    def submit(self, request_id: str, prompt_token_ids: list[int], sampling_params, sink: Sink,
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
        if self._thread is not None and self._thread is not threading.current_thread():
            self._done.wait(timeout)
        with self._lock:
            self._closed = True
            self._drain_commands_on_close()

    # ---- the engine thread -----------------------------------------------------------------------
    def _run(self) -> None:
        if self.num_threads:
            import torch

            torch.set_num_threads(self.num_threads)
        try:
            while not self._stop.is_set():
                self._wake.clear()
                self._process_commands()
                if not self.llm.has_unfinished_requests():
                    self._publish_stats(force=True)
                    self._wake.wait(0.5)
                    continue
                self._step()
                self._publish_stats()
        finally:
            with self._lock:
                self._closed = True
                self._fail_all(OpenAIError("the server is shutting down", 503))
                self._drain_commands_on_close()
            self._done.set()

    def _step(self) -> None:
        outbox = _Outbox()
        try:
            for out in self.llm.step():
                self._route(out, outbox)
        except Exception as e:
            # NOTE: the last resort. Validation (protocol.py, SamplingParams, LLM._prepare) keeps every
            # client-caused error out of the step; if one still raises, fail the requests in flight (their
            # blocks are freed) and keep serving.
            self.num_step_errors += 1
            logger.error("engine step failed:\n%s", traceback.format_exc())
            outbox.flush()  # what was routed before the failure goes first
            self._fail_all(OpenAIError(f"engine step failed: {type(e).__name__}: {e}", 500))
        finally:
            outbox.flush()

    def _read_stats(self) -> dict[str, Any]:
        s = self.llm.stats()
        s = dataclasses.asdict(s) if dataclasses.is_dataclass(s) else dict(s)
        s["num_step_errors"] = self.num_step_errors
        return s

    def _publish_stats(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._stats_time >= STATS_INTERVAL_S:
            self.stats, self._stats_time = self._read_stats(), now

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

    def _route(self, out, outbox: _Outbox) -> None:
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
            outbox.put(tracked.sink, StepUpdate(out.request_id, len(out.prompt_token_ids), deltas, out.finished))
        if out.finished and getattr(out, "metrics", None) is not None:
            self.metrics.record(out.metrics, out.outputs[0].finish_reason if out.outputs else None)

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


class Job:
    """One HTTP request: its engine requests (one per prompt) and the queue their updates arrive on."""

    def __init__(self, engine: AsyncEngine, base_id: str, prompts: list[list[int]], params, arrival: float):
        self.engine = engine
        self.prompts, self.params, self.arrival = prompts, params, arrival
        self.id = base_id
        self.request_ids = [f"{base_id}-{i}" for i in range(len(prompts))]
        self.unfinished = set(self.request_ids)
        self.sink = Sink(asyncio.get_running_loop(), asyncio.Queue())
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
