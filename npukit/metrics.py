"""Latency, throughput and memory metrics with vLLM's names.

- ``RequestMetrics``: one request's timestamps (the engine fills them; ``time_generation`` does it for HF
  ``generate``) and the derived TTFT / TPOT / ITL / E2E.
- ``summarize`` / ``summarize_requests``: mean, median, p90, p99, std, variance, min, max, range, and the
  throughput over a batch of requests, laid out like ``vllm bench serve``.
- ``time_generation``: time one HF ``model.generate`` call token by token (a streamer stamps each token).
- ``PeakMemory`` / ``peak_memory``: peak device memory over a block of code (process RSS on CPU).

All times are seconds from ``time.perf_counter()``; all memory sizes are bytes.
"""

from __future__ import annotations

import html
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from npukit import device as device_mod

__all__ = [
    "RequestMetrics",
    "Summary",
    "summarize",
    "RequestsSummary",
    "summarize_requests",
    "PeakMemory",
    "peak_memory",
    "GenerationTiming",
    "time_generation",
    "format_bytes",
    "format_seconds",
]


# --------------------------------------------------------------------------------------------------
# Formatting helpers
# --------------------------------------------------------------------------------------------------


def format_seconds(seconds: float | None) -> str:
    """``0.0123`` -> ``'12.30 ms'``; picks s / ms / µs so the number stays readable."""
    if seconds is None:
        return "n/a"
    a = abs(seconds)
    if a >= 1.0:
        return f"{seconds:.2f} s"
    if a >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} µs"


def format_bytes(num_bytes: float | None) -> str:
    """``1536`` -> ``'1.50 KiB'`` (binary units, like ``npu-smi`` and ``nvidia-smi``)."""
    if num_bytes is None:
        return "n/a"
    value = float(num_bytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024.0 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024.0
    raise AssertionError("unreachable")


def _format_value(value: float | None, unit: str) -> str:
    if value is None:
        return "n/a"
    if unit == "s":
        return format_seconds(value)
    if unit == "B":
        return format_bytes(value)
    return f"{value:.4g} {unit}".rstrip()


# --------------------------------------------------------------------------------------------------
# One request
# --------------------------------------------------------------------------------------------------


@dataclass
class RequestMetrics:
    """Timestamps of one request, as vLLM keeps them (``perf_counter`` seconds).

    NOTE: ``token_times[i]`` is when output token ``i`` became available, so ``token_times[0]`` is the
    first token (``first_token_time``) and ``len(token_times) == num_output_tokens`` once finished.
    """

    arrival_time: float
    first_token_time: float | None = None
    token_times: list[float] = field(default_factory=list)
    finish_time: float | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0

    def record_token(self, now: float | None = None, num_tokens: int = 1) -> None:
        """Stamp ``num_tokens`` new output tokens at ``now`` (default: ``time.perf_counter()``)."""
        now = time.perf_counter() if now is None else now
        if self.first_token_time is None:
            self.first_token_time = now
        self.token_times.extend([now] * num_tokens)
        self.num_output_tokens += num_tokens

    def finish(self, now: float | None = None) -> None:
        self.finish_time = time.perf_counter() if now is None else now

    @property
    def ttft(self) -> float | None:
        """Time to first token: arrival -> first output token (prefill + queueing)."""
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time

    @property
    def e2e(self) -> float | None:
        """End-to-end latency: arrival -> finished."""
        if self.finish_time is None:
            return None
        return self.finish_time - self.arrival_time

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first: ``(e2e - ttft) / (num_output_tokens - 1)``.

        None with fewer than two output tokens (there is no decode step to average), as in vLLM.
        """
        e2e, ttft = self.e2e, self.ttft
        if e2e is None or ttft is None or self.num_output_tokens < 2:
            return None
        return (e2e - ttft) / (self.num_output_tokens - 1)

    @property
    def itl(self) -> list[float]:
        """Inter-token latencies: the gaps between consecutive output tokens (``len = n - 1``)."""
        return [b - a for a, b in zip(self.token_times, self.token_times[1:])]

    @property
    def output_tokens_per_s(self) -> float | None:
        """This request's output tokens divided by its end-to-end latency."""
        e2e = self.e2e
        if e2e is None or e2e <= 0:
            return None
        return self.num_output_tokens / e2e

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(ttft=self.ttft, tpot=self.tpot, e2e=self.e2e, output_tokens_per_s=self.output_tokens_per_s)
        return d

    def __str__(self) -> str:
        tps = self.output_tokens_per_s
        return (
            f"{self.num_prompt_tokens} prompt + {self.num_output_tokens} output tokens | "
            f"TTFT {format_seconds(self.ttft)} | TPOT {format_seconds(self.tpot)} | "
            f"E2E {format_seconds(self.e2e)} | " + (f"{tps:.2f} tok/s" if tps is not None else "n/a tok/s")
        )


# --------------------------------------------------------------------------------------------------
# Distributions
# --------------------------------------------------------------------------------------------------

_STAT_NAMES = ("count", "mean", "median", "p90", "p99", "std", "variance", "min", "max", "range")


@dataclass(frozen=True)
class Summary:
    """Distribution of one metric. ``unit`` is ``"s"``, ``"B"``, ``"tok/s"`` ... (used only for display).

    NOTE: ``std`` and ``variance`` are the population ones (ddof=0, like ``statistics.pvariance``);
    percentiles are numpy's default linear interpolation, as ``vllm bench`` computes them.
    """

    count: int
    mean: float
    median: float
    p90: float
    p99: float
    std: float
    variance: float
    min: float
    max: float
    range: float
    name: str = ""
    unit: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        f = lambda v: _format_value(v, self.unit)  # noqa: E731
        label = f"{self.name}: " if self.name else ""
        return (
            f"{label}mean {f(self.mean)} | median {f(self.median)} | p90 {f(self.p90)} | p99 {f(self.p99)} | "
            f"std {f(self.std)} | min {f(self.min)} | max {f(self.max)} | range {f(self.range)} (n={self.count})"
        )

    def _repr_html_(self) -> str:
        header = "".join(f"<th>{n}</th>" for n in _STAT_NAMES)
        cells = "".join(
            f"<td>{self.count if n == 'count' else html.escape(_format_value(getattr(self, n), self.unit))}</td>"
            for n in _STAT_NAMES
        )
        name = f"<td><b>{html.escape(self.name)}</b></td>" if self.name else ""
        return f"<table><tr>{'<th></th>' if name else ''}{header}</tr><tr>{name}{cells}</tr></table>"


def summarize(values: Iterable[float], *, name: str = "", unit: str = "") -> Summary:
    """Count, mean, median, p90, p99, std, variance, min, max and range of ``values``."""
    arr = np.asarray(list(values), dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(
            f"summarize() needs a non-empty 1-D list of numbers{f' for {name!r}' if name else ''}, got "
            f"{arr.size} values. Run at least one request (or one repeat) before summarising."
        )
    return Summary(
        count=int(arr.size),
        mean=float(arr.mean()),
        median=float(np.median(arr)),
        p90=float(np.percentile(arr, 90)),
        p99=float(np.percentile(arr, 99)),
        std=float(arr.std()),
        variance=float(arr.var()),
        min=float(arr.min()),
        max=float(arr.max()),
        range=float(arr.max() - arr.min()),
        name=name,
        unit=unit,
    )


def _summary_table_html(rows: Sequence[Summary | None], scale: float = 1.0, unit_label: str = "") -> str:
    stats = ("mean", "median", "p90", "p99", "std", "min", "max")
    head = "<tr><th>metric</th>" + "".join(f"<th>{s}{unit_label}</th>" for s in stats) + "<th>n</th></tr>"
    body = ""
    for s in rows:
        if s is None:
            continue
        vals = "".join(f"<td>{getattr(s, k) * scale:.2f}</td>" for k in stats)
        body += f"<tr><td><b>{html.escape(s.name)}</b></td>{vals}<td>{s.count}</td></tr>"
    return f"<table>{head}{body}</table>"


class RequestsSummary(dict):
    """What ``summarize_requests`` returns: a plain dict that prints like ``vllm bench serve``.

    Keys: ``num_requests``, ``duration``, ``total_input_tokens``, ``total_output_tokens``,
    ``request_throughput`` (req/s), ``output_throughput`` (tok/s), ``total_token_throughput`` (tok/s) and
    ``ttft`` / ``tpot`` / ``itl`` / ``e2e`` (``Summary`` in seconds; ``tpot`` / ``itl`` are None when no request
    produced two tokens).
    """

    def to_dict(self) -> dict[str, Any]:
        return {k: (v.to_dict() if isinstance(v, Summary) else v) for k, v in self.items()}

    def __str__(self) -> str:
        lines = [
            "{:=^50}".format(" Benchmark Result "),
            f"{'Successful requests:':<40}{self['num_requests']:<10}",
            f"{'Benchmark duration (s):':<40}{self['duration']:<10.2f}",
            f"{'Total input tokens:':<40}{self['total_input_tokens']:<10}",
            f"{'Total generated tokens:':<40}{self['total_output_tokens']:<10}",
            f"{'Request throughput (req/s):':<40}{self['request_throughput']:<10.2f}",
            f"{'Output token throughput (tok/s):':<40}{self['output_throughput']:<10.2f}",
            f"{'Total token throughput (tok/s):':<40}{self['total_token_throughput']:<10.2f}",
        ]
        titles = {
            "ttft": ("Time to First Token", "TTFT"),
            "tpot": ("Time per Output Token (excl. 1st token)", "TPOT"),
            "itl": ("Inter-token Latency", "ITL"),
            "e2e": ("End-to-end Latency", "E2E"),
        }
        for key, (title, short) in titles.items():
            s = self[key]
            if s is None:
                continue
            lines.append("{:-^50}".format(title))
            for stat in ("mean", "median", "p99"):
                label = f"{stat.capitalize() if stat != 'p99' else 'P99'} {short} (ms):"
                lines.append(f"{label:<40}{getattr(s, stat) * 1e3:<10.2f}")
        lines.append("=" * 50)
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        top = (
            f"<p>{self['num_requests']} requests in {self['duration']:.2f} s: "
            f"<b>{self['request_throughput']:.2f} req/s</b>, <b>{self['output_throughput']:.2f} output tok/s</b>, "
            f"{self['total_token_throughput']:.2f} total tok/s "
            f"({self['total_input_tokens']} input + {self['total_output_tokens']} output tokens)</p>"
        )
        rows = [self[k] for k in ("ttft", "tpot", "itl", "e2e")]
        return top + _summary_table_html(rows, scale=1e3, unit_label=" (ms)")


def summarize_requests(requests: Sequence[RequestMetrics]) -> RequestsSummary:
    """Latency distributions and throughput of finished requests (throughput over the wall span:
    first arrival to last finish)."""
    if len(requests) == 0:
        raise ValueError("summarize_requests() got no requests; pass the RequestMetrics of finished requests.")
    for i, r in enumerate(requests):
        if r.finish_time is None or r.first_token_time is None:
            raise ValueError(
                f"request {i} is not finished (first_token_time={r.first_token_time}, "
                f"finish_time={r.finish_time}); summarise only requests that produced tokens and finished."
            )
    duration = max(r.finish_time for r in requests) - min(r.arrival_time for r in requests)
    if duration <= 0:
        raise ValueError(f"the requests span {duration} s; finish_time must come after arrival_time.")
    n_in = sum(r.num_prompt_tokens for r in requests)
    n_out = sum(r.num_output_tokens for r in requests)
    tpots = [r.tpot for r in requests if r.tpot is not None]
    itls = [x for r in requests for x in r.itl]
    return RequestsSummary(
        num_requests=len(requests),
        duration=duration,
        total_input_tokens=n_in,
        total_output_tokens=n_out,
        request_throughput=len(requests) / duration,
        output_throughput=n_out / duration,
        total_token_throughput=(n_in + n_out) / duration,
        ttft=summarize([r.ttft for r in requests], name="TTFT", unit="s"),
        tpot=summarize(tpots, name="TPOT", unit="s") if tpots else None,
        itl=summarize(itls, name="ITL", unit="s") if itls else None,
        e2e=summarize([r.e2e for r in requests], name="E2E", unit="s"),
    )


# --------------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------------


def peak_memory(device: torch.device | str = "auto") -> int:
    """Peak bytes since the last reset: ``max_memory_allocated`` on NPU / CUDA, peak RSS on CPU."""
    return device_mod.memory_stats(device).peak


class PeakMemory:
    """Peak memory over a ``with`` block: ``with PeakMemory(model.device) as mem: ...; mem.peak_bytes``.

    On NPU / CUDA it resets the allocator's peak counter on entry and reads ``max_memory_allocated`` on
    exit. On CPU there is no resettable counter: ``peak_bytes`` is the process's peak RSS so far (an
    upper bound for the block). ``stats`` keeps the full ``npukit.device.MemoryStats`` read at exit.
    """

    def __init__(self, device: torch.device | str = "auto"):
        self.device = device_mod.resolve(device)
        self.peak_bytes: int | None = None
        self.stats: device_mod.MemoryStats | None = None

    def __enter__(self) -> "PeakMemory":
        device_mod.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc) -> None:
        device_mod.synchronize(self.device)
        self.stats = device_mod.memory_stats(self.device)
        self.peak_bytes = self.stats.peak


# --------------------------------------------------------------------------------------------------
# Timing HF generate
# --------------------------------------------------------------------------------------------------


def _token_timer_class():
    from transformers.generation.streamers import BaseStreamer

    class TokenTimer(BaseStreamer):
        """Stamps ``perf_counter()`` for every token ``generate`` pushes.

        NOTE: ``generate`` first pushes the whole prompt (skipped here), then each new token, already
        copied to the CPU with ``.cpu()`` -- that copy waits for the device, so the stamp is when the
        token really exists on NPU / CUDA too.
        """

        def __init__(self) -> None:
            self.token_times: list[float] = []
            self._seen_prompt = False

        def put(self, value: torch.Tensor) -> None:
            now = time.perf_counter()
            if not self._seen_prompt:
                self._seen_prompt = True
                return
            if value.dim() > 1 and value.shape[0] > 1:
                raise ValueError("time_generation times one sequence at a time (batch size 1).")
            self.token_times.extend([now] * int(value.numel()))

        def end(self) -> None:
            pass

    return TokenTimer


@dataclass
class GenerationTiming:
    """What ``time_generation`` returns: the text, its token ids, timings and peak memory."""

    text: str
    token_ids: list[int]
    metrics: RequestMetrics
    peak_memory_bytes: int | None = None
    device: str = "cpu"

    ttft = property(lambda self: self.metrics.ttft)
    tpot = property(lambda self: self.metrics.tpot)
    e2e = property(lambda self: self.metrics.e2e)
    itl = property(lambda self: self.metrics.itl)
    output_tokens_per_s = property(lambda self: self.metrics.output_tokens_per_s)

    def __str__(self) -> str:
        return f"{self.metrics} | peak {format_bytes(self.peak_memory_bytes)} on {self.device}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "token_ids": list(self.token_ids),
            "metrics": self.metrics.to_dict(),
            "peak_memory_bytes": self.peak_memory_bytes,
            "device": self.device,
        }


def _prompt_to_ids(tokenizer, prompt_or_ids) -> torch.Tensor:
    """str -> tokenizer ids; chat messages -> chat template ids; list / tensor of ids -> [1, n] tensor."""
    if isinstance(prompt_or_ids, str):
        ids = tokenizer(prompt_or_ids, return_tensors="pt")["input_ids"]
    elif isinstance(prompt_or_ids, (list, tuple)) and prompt_or_ids and isinstance(prompt_or_ids[0], dict):
        from npukit.chat import apply_chat_template

        ids = torch.tensor([apply_chat_template(tokenizer, list(prompt_or_ids))])
    elif isinstance(prompt_or_ids, torch.Tensor):
        ids = prompt_or_ids if prompt_or_ids.dim() == 2 else prompt_or_ids.reshape(1, -1)
    elif isinstance(prompt_or_ids, (list, tuple)) and all(isinstance(t, int) for t in prompt_or_ids):
        ids = torch.tensor([list(prompt_or_ids)], dtype=torch.long)
    else:
        raise TypeError(
            "time_generation() takes a prompt string, a list of chat messages, a list of token ids or a "
            f"[1, n] tensor of ids; got {type(prompt_or_ids).__name__}."
        )
    if ids.shape[0] != 1 or ids.shape[1] == 0:
        raise ValueError(f"time_generation() times one non-empty prompt; got input_ids of shape {tuple(ids.shape)}.")
    return ids


def time_generation(
    model,
    tokenizer,
    prompt_or_ids,
    *,
    max_new_tokens: int = 64,
    **generate_kwargs,
) -> GenerationTiming:
    """Run ``model.generate`` once and stamp every output token.

    ``prompt_or_ids`` is a raw prompt string (no chat template is applied), a list of chat messages
    (the chat template is applied), or token ids. ``generate_kwargs`` go to ``generate`` unchanged
    (``do_sample``, ``min_new_tokens``, ``generation_config`` ...); greedy unless you say otherwise.
    """
    device = model.device
    input_ids = _prompt_to_ids(tokenizer, prompt_or_ids).to(device)
    generate_kwargs.setdefault("attention_mask", torch.ones_like(input_ids))
    if "generation_config" not in generate_kwargs:
        generate_kwargs.setdefault("do_sample", False)
    if getattr(model.generation_config, "pad_token_id", None) is None:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        generate_kwargs.setdefault("pad_token_id", pad)
    timer = _token_timer_class()()

    with PeakMemory(device) as mem:
        device_mod.synchronize(device)
        metrics = RequestMetrics(arrival_time=time.perf_counter(), num_prompt_tokens=int(input_ids.shape[1]))
        with torch.inference_mode():
            out = model.generate(input_ids, max_new_tokens=max_new_tokens, streamer=timer, **generate_kwargs)
        device_mod.synchronize(device)
        metrics.finish_time = time.perf_counter()

    output_ids = out[0, input_ids.shape[1] :].tolist()
    # NOTE: one stamp per generated token (the eos token included, when generation stops on it).
    if len(timer.token_times) != len(output_ids):
        raise RuntimeError(
            f"the streamer saw {len(timer.token_times)} tokens but generate returned {len(output_ids)}; "
            "time_generation supports plain greedy / sampling generate (no beam search)."
        )
    metrics.token_times = timer.token_times
    metrics.first_token_time = timer.token_times[0] if timer.token_times else None
    metrics.num_output_tokens = len(output_ids)
    return GenerationTiming(
        text=tokenizer.decode(output_ids, skip_special_tokens=True),
        token_ids=output_ids,
        metrics=metrics,
        peak_memory_bytes=mem.peak_bytes,
        device=str(device),
    )


def generate_one_token_seconds(model, tokenizer, prompt_or_ids, *, synchronize: bool = True) -> float:
    """TTFT the way many tutorials time it: the wall time of one ``generate(max_new_tokens=1)`` call.

    With ``synchronize=False`` the clock is read without waiting for the device (on an NPU / GPU that can
    stop the clock before the queued kernels ran; on a CPU it changes nothing).
    """
    device = model.device
    input_ids = _prompt_to_ids(tokenizer, prompt_or_ids).to(device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if synchronize:
        device_mod.synchronize(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=1, do_sample=False,
                       pad_token_id=pad)
    if synchronize:
        device_mod.synchronize(device)
    return time.perf_counter() - t0


def compare_ttft(model, tokenizer, prompt_or_ids, *, repeats: int = 3, max_new_tokens: int = 8) -> dict[str, Summary]:
    """Three ways to time the first token of the same prompt, each summarised over its runs:

    - ``"first call (cold)"``: one ``generate(max_new_tokens=1)`` before any warm-up. On Ascend this includes
      compiling each operator for its shapes the first time it runs; on any device, allocator growth.
    - ``"generate(max_new_tokens=1)"``: the same call, warm, ``repeats`` times.
    - ``"streamed first token"``: ``time_generation``'s stamp of the first streamed token, ``repeats`` times.
    """
    if repeats < 1:
        raise ValueError(f"compare_ttft() needs repeats >= 1, got {repeats}")
    cold = generate_one_token_seconds(model, tokenizer, prompt_or_ids)
    warm = [generate_one_token_seconds(model, tokenizer, prompt_or_ids) for _ in range(repeats)]
    streamed = [time_generation(model, tokenizer, prompt_or_ids, max_new_tokens=max_new_tokens).metrics.ttft
                for _ in range(repeats)]
    return {name: summarize(values, name=name, unit="s") for name, values in
            (("first call (cold)", [cold]), ("generate(max_new_tokens=1)", warm), ("streamed first token", streamed))}


def median_range(summary: Summary, scale: float = 1e3, unit: str = "ms") -> str:
    """``"12.3 ms (range 11.8-14.0 ms, n=3)"``: how notebooks print a measured value."""
    if summary.count == 1:
        return f"{summary.median * scale:.1f} {unit} (one run)"
    return (f"{summary.median * scale:.1f} {unit} (range {summary.min * scale:.1f}-{summary.max * scale:.1f} {unit}, "
            f"n={summary.count})")
