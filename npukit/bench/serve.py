"""Serving benchmark client, like `vllm bench serve`, for any OpenAI-compatible server.

    npukit bench serve --base-url http://127.0.0.1:8000 --num-prompts 64 --max-concurrency 8 \\
        --random-input-len 256 --random-output-len 128

It sends `--num-prompts` streaming requests (random prompts of `--random-input-len` tokens, or your
own), at most `--max-concurrency` at a time, arriving as a Poisson process at `--request-rate` req/s
(inf = all at once), stamps every streamed chunk, and prints the result in the layout `vllm bench
serve` users know (TTFT / TPOT / ITL / E2EL: mean, median, p99 in ms). The same client measures
npukit's own server and a real vLLM / vLLM-Ascend server, so the numbers compare.

From Python / a notebook: `result = run_serving_benchmark(server.url, num_prompts=32)`; `print(result)`,
`result.summary` (vLLM's JSON keys), `result.to_dict()`, `result.save(path)`.

Definitions (as in vLLM): TTFT = request sent -> first streamed text; ITL = gaps between streamed
chunks; TPOT = (E2EL - TTFT) / (output tokens - 1), per request; E2EL = request sent -> stream end.
Output tokens come from the server's `usage` (we ask for `stream_options.include_usage`).
"""
from __future__ import annotations

import argparse
import asyncio
import functools
import json
import math
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

from npukit.args import error  # stdlib-only module

BACKENDS = {"openai": "/v1/completions", "vllm": "/v1/completions", "openai-chat": "/v1/chat/completions"}
METRICS = {  # key -> (section title, short name), in vLLM's order and words
    "ttft": ("Time to First Token", "TTFT"),
    "tpot": ("Time per Output Token (excl. 1st token)", "TPOT"),
    "itl": ("Inter-token Latency", "ITL"),
    "e2el": ("End-to-end Latency", "E2EL"),
}

# Word-based prompts when no tokenizer is at hand: about one token per word for most tokenizers.
_WORDS = ("the of and to in is that it was for on are with as his they be at one have this from or had by "
          "word but what some we can out other were all there when up use your how said an each she which do "
          "their time if will way about many then them write would like so these her long make thing see him "
          "two has look more day could go come did number sound no most people my over know water than call "
          "first who may down side been now find any new work part take get place made live where after back "
          "little only round man year came show every good me give our under name very through just form "
          "sentence great think say help low line differ turn cause much mean before move right boy old too "
          "same tell does set three want air well also play small end put home read hand port large spell add "
          "even land here must big high such follow act why ask men change went light kind off need house "
          "picture try us again animal point mother world near build self earth father head stand own page").split()


class BenchmarkError(RuntimeError):
    """The benchmark could not run (server unreachable, bad model name, ...); the message says why."""


# --------------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------------


@dataclass
class BenchPrompt:
    prompt: str
    prompt_len: int   # tokens by the client's tokenizer (words without one); the server's usage wins
    output_len: int   # max_tokens asked for


def load_tokenizer(name_or_path: str | None):
    """A tokenizer from an embedded model name, a local folder or the local HF cache; None if not found.

    Never downloads (a served name like `qwen3-32b` is not a hub id: vLLM's bench then fails, we fall
    back to word-based prompts)."""
    if not name_or_path:
        return None
    from transformers import AutoTokenizer

    from npukit.samples import EMBEDDED, sample_path

    try:
        if name_or_path in EMBEDDED:
            return AutoTokenizer.from_pretrained(sample_path(name_or_path))
        path = Path(name_or_path).expanduser()
        if path.is_dir():
            return AutoTokenizer.from_pretrained(path)
        return AutoTokenizer.from_pretrained(name_or_path, local_files_only=True)
    except Exception:  # noqa: BLE001 - not a tokenizer we can find offline
        return None


def random_prompts(num_prompts: int, input_len: int, output_len: int, *, tokenizer=None,
                   range_ratio: float = 0.0, seed: int = 0) -> list[BenchPrompt]:
    """Random prompts like vLLM's random dataset: `input_len` random token ids decoded to text (lengths
    uniform in `input_len * [1 - range_ratio, 1 + range_ratio]`); with no tokenizer, random words."""
    import numpy as np

    if num_prompts < 1 or input_len < 1 or output_len < 1:
        raise ValueError(f"num_prompts, input_len and output_len must be >= 1, got {num_prompts}, {input_len}, "
                         f"{output_len}.")
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(f"range_ratio must be in [0, 1), got {range_ratio}.")
    rng = np.random.default_rng(seed)
    lo, hi = max(1, math.floor(input_len * (1 - range_ratio))), math.ceil(input_len * (1 + range_ratio))
    in_lens = rng.integers(lo, hi + 1, size=num_prompts)
    out_lo, out_hi = max(1, math.floor(output_len * (1 - range_ratio))), math.ceil(output_len * (1 + range_ratio))
    out_lens = rng.integers(out_lo, out_hi + 1, size=num_prompts)
    prompts = []
    if tokenizer is None:
        for n, m in zip(in_lens, out_lens):
            words = rng.choice(len(_WORDS), size=int(n))
            prompts.append(BenchPrompt(" ".join(_WORDS[i] for i in words), int(n), int(m)))
        return prompts
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    allowed = np.array([i for i in range(len(tokenizer)) if i not in special])
    for n, m in zip(in_lens, out_lens):
        # NOTE: decode -> encode does not round-trip random ids exactly; re-encode, cut to n and decode
        # again, so the prompt is about n tokens when the server tokenizes it.
        text = tokenizer.decode(rng.choice(allowed, size=int(n)).tolist())
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][: int(n)]
        prompts.append(BenchPrompt(tokenizer.decode(ids), len(ids), int(m)))
    return prompts


def read_prompts(path: str | os.PathLike, output_len: int, tokenizer=None) -> list[BenchPrompt]:
    """Prompts from a file: JSON lines with a "prompt" field (vLLM's custom dataset), else one per line."""
    lines = [ln for ln in Path(path).read_text(encoding="utf-8").splitlines() if ln.strip()]
    if not lines:
        raise ValueError(f"{path} has no prompts.")
    texts = []
    for i, ln in enumerate(lines):
        if ln.lstrip().startswith("{"):
            try:
                texts.append(json.loads(ln)["prompt"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"{path}:{i + 1}: a JSON line needs a \"prompt\" field.") from None
        else:
            texts.append(ln)
    return prompts_from_texts(texts, output_len, tokenizer)


def prompts_from_texts(texts: Sequence[str], output_len: int, tokenizer=None) -> list[BenchPrompt]:
    def count(t: str) -> int:
        return len(tokenizer(t, add_special_tokens=False)["input_ids"]) if tokenizer is not None else len(t.split())

    return [BenchPrompt(t, count(t), output_len) for t in texts]


# --------------------------------------------------------------------------------------------------
# One streamed request
# --------------------------------------------------------------------------------------------------


@dataclass
class RequestResult:
    """One request as the client saw it. `metrics.token_times` are the arrival times of streamed chunks
    with text (usually one token each); `metrics.num_output_tokens` is the server's count (usage)."""

    prompt_len: int
    output_len: int = 0
    success: bool = False
    error: str = ""
    generated_text: str = ""
    metrics: Any = None  # npukit.metrics.RequestMetrics

    @property
    def ttft(self) -> float | None:
        return self.metrics.ttft if self.metrics is not None else None

    @property
    def tpot(self) -> float | None:
        return self.metrics.tpot if self.metrics is not None else None

    @property
    def itl(self) -> list[float]:
        return self.metrics.itl if self.metrics is not None else []

    @property
    def latency(self) -> float | None:
        return self.metrics.e2e if self.metrics is not None else None


def _payload(backend: str, model: str, p: BenchPrompt, temperature: float, ignore_eos: bool,
             extra_body: dict | None) -> dict:
    body: dict[str, Any] = {"model": model, "stream": True, "stream_options": {"include_usage": True},
                            "temperature": temperature}
    if backend == "openai-chat":
        body.update(messages=[{"role": "user", "content": p.prompt}], max_completion_tokens=p.output_len)
    else:
        body.update(prompt=p.prompt, max_tokens=p.output_len)
    if ignore_eos:
        body["ignore_eos"] = True  # vLLM's extension (npukit serve has it too); plain OpenAI rejects it
    body.update(extra_body or {})
    return body


async def _send(client, url: str, headers: dict, backend: str, body: dict, p: BenchPrompt) -> RequestResult:
    from npukit.metrics import RequestMetrics

    result = RequestResult(prompt_len=p.prompt_len)
    m = RequestMetrics(arrival_time=time.perf_counter(), num_prompt_tokens=p.prompt_len)
    usage = None
    last_chunk = None
    texts = []
    try:
        async with client.stream("POST", url, json=body, headers=headers) as resp:
            if resp.status_code != 200:
                raw = (await resp.aread()).decode("utf-8", "replace")
                try:
                    raw = json.loads(raw)["error"]["message"]
                except Exception:  # noqa: BLE001 - not OpenAI's error shape: keep the raw text
                    pass
                result.error = f"HTTP {resp.status_code}: {str(raw)[:500]}"
                return result
            async for line in resp.aiter_lines():
                line = line.strip()
                if not line.startswith("data:"):
                    continue
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    break
                now = time.perf_counter()
                chunk = json.loads(data)
                if "error" in chunk:
                    err = chunk["error"]
                    result.error = f"stream error: {err.get('message', err) if isinstance(err, dict) else err}"
                    return result
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for choice in chunk.get("choices") or []:
                    last_chunk = now
                    delta = (choice.get("delta") or {}).get("content")
                    text = choice.get("text") if backend != "openai-chat" else delta
                    if text:
                        texts.append(text)
                        m.record_token(now)
            m.finish(time.perf_counter())  # the stream ended ([DONE] or closed)
    except Exception as e:  # noqa: BLE001 - a failed request is counted, not fatal
        result.error = f"{type(e).__name__}: {e}"
        return result
    if m.first_token_time is None:
        if last_chunk is None:
            result.error = "the stream ended without any choice"
            return result
        m.first_token_time = last_chunk  # only an empty answer came (e.g. EOS first): time that
    if usage:
        m.num_output_tokens = int(usage.get("completion_tokens") or 0)
        if usage.get("prompt_tokens"):
            m.num_prompt_tokens = result.prompt_len = int(usage["prompt_tokens"])
    result.output_len = m.num_output_tokens
    result.generated_text = "".join(texts)
    result.metrics = m
    result.success = True
    return result


# --------------------------------------------------------------------------------------------------
# The result
# --------------------------------------------------------------------------------------------------


def _line(label: str, value, fmt: str = "") -> str:
    return "{:<40} {:<10}".format(label, format(value, fmt))


@dataclass
class ServingBenchmarkResult:
    """What `run_serving_benchmark` returns. `summary` uses the keys of vLLM's `--save-result` JSON
    (`completed`, `duration`, `output_throughput`, `mean_ttft_ms`, `p99_itl_ms`, ...)."""

    config: dict[str, Any]
    requests: list[RequestResult]
    summary: dict[str, Any]
    metrics: dict[str, Any] = field(default_factory=dict)  # key -> npukit.metrics.Summary (seconds)

    @property
    def errors(self) -> list[str]:
        return [r.error for r in self.requests if not r.success]

    def to_dict(self) -> dict[str, Any]:
        reqs = self.requests  # per-request lists in request order, failed ones included (as vLLM does)
        return {
            **self.config, **self.summary,
            "input_lens": [r.prompt_len for r in reqs],
            "output_lens": [r.output_len for r in reqs],
            "ttfts": [r.ttft or 0.0 for r in reqs],
            "itls": [r.itl for r in reqs],
            "generated_texts": [r.generated_text for r in reqs],
            "errors": [r.error for r in reqs],
        }

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False), encoding="utf-8")
        return path

    def __str__(self) -> str:
        s, c = self.summary, self.config
        lines = ["{:=^50}".format(" Serving Benchmark Result "),
                 _line("Successful requests:", s["completed"]),
                 _line("Failed requests:", s["failed"])]
        if c.get("max_concurrency") is not None:
            lines.append(_line("Maximum request concurrency:", c["max_concurrency"]))
        if c.get("request_rate") not in (None, "inf"):
            lines.append(_line("Request rate configured (RPS):", float(c["request_rate"]), ".2f"))
        lines += [_line("Benchmark duration (s):", s["duration"], ".2f"),
                  _line("Total input tokens:", s["total_input_tokens"]),
                  _line("Total generated tokens:", s["total_output_tokens"]),
                  _line("Request throughput (req/s):", s["request_throughput"], ".2f"),
                  _line("Output token throughput (tok/s):", s["output_throughput"], ".2f"),
                  _line("Peak output token throughput (tok/s):", s["max_output_tokens_per_s"], ".2f"),
                  _line("Peak concurrent requests:", s["max_concurrent_requests"], ".2f"),
                  _line("Total token throughput (tok/s):", s["total_token_throughput"], ".2f")]
        for key in c["percentile_metrics"]:
            title, short = METRICS[key]
            lines.append("{:-^50}".format(title))
            lines.append(_line(f"Mean {short} (ms):", s[f"mean_{key}_ms"], ".2f"))
            lines.append(_line(f"Median {short} (ms):", s[f"median_{key}_ms"], ".2f"))
            for p in c["metric_percentiles"]:
                lines.append(_line(f"P{_pname(p)} {short} (ms):", s[f"p{_pname(p)}_{key}_ms"], ".2f"))
        lines.append("=" * 50)
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        import html

        s, c = self.summary, self.config
        top = (f"<p><b>{s['completed']}</b> requests ok, <b>{s['failed']}</b> failed in {s['duration']:.2f} s "
               f"({html.escape(str(c.get('base_url')))}, model {html.escape(str(c.get('model_id')))}): "
               f"<b>{s['request_throughput']:.2f} req/s</b>, <b>{s['output_throughput']:.2f} output tok/s</b>, "
               f"{s['total_token_throughput']:.2f} total tok/s</p>")
        ps = [_pname(p) for p in c["metric_percentiles"]]
        head = ("<tr><th>ms</th><th>mean</th><th>median</th><th>std</th>"
                + "".join(f"<th>p{p}</th>" for p in ps) + "</tr>")
        rows = "".join(
            f"<tr><td><b>{METRICS[k][1]}</b></td>" + "".join(
                f"<td>{s[f'{stat}_{k}_ms']:.2f}</td>"
                for stat in ["mean", "median", "std"] + [f"p{p}" for p in ps]) + "</tr>"
            for k in c["percentile_metrics"])
        errors = ""
        if self.errors:
            errors = f"<p>First error: <code>{html.escape(self.errors[0])}</code></p>"
        return f"{top}<table>{head}{rows}</table>{errors}"


def _pname(p: float) -> str:
    return str(int(p)) if float(p).is_integer() else str(p)


def _summarize(requests: list[RequestResult], duration: float, percentiles, start: float):
    import numpy as np

    from npukit.metrics import summarize

    ok = [r for r in requests if r.success]
    total_in = sum(r.prompt_len for r in ok)
    total_out = sum(r.output_len for r in ok)
    values = {
        "ttft": [r.ttft for r in ok],
        "tpot": [r.tpot for r in ok if r.tpot is not None],
        "itl": [x for r in ok for x in r.itl],
        "e2el": [r.latency for r in ok],
    }
    summary: dict[str, Any] = {
        "completed": len(ok), "failed": len(requests) - len(ok), "duration": duration,
        "total_input_tokens": total_in, "total_output_tokens": total_out,
        "request_throughput": len(ok) / duration, "output_throughput": total_out / duration,
        "total_token_throughput": (total_in + total_out) / duration,
    }
    # Peaks per one-second bucket, as vLLM computes them: streamed chunks per second, requests in flight.
    first = min((r.metrics.arrival_time for r in ok), default=start)
    stamps = [t - first for r in ok for t in r.metrics.token_times]
    spans = [(r.metrics.arrival_time - first, r.metrics.finish_time - first) for r in ok]
    n_buckets = int(max((b for _, b in spans), default=0)) + 1
    per_second = np.bincount(np.asarray(stamps, dtype=np.int64), minlength=n_buckets) if stamps else np.zeros(1)
    summary["max_output_tokens_per_s"] = float(per_second.max())
    summary["max_concurrent_requests"] = float(max(
        (sum(1 for a, b in spans if a < sec + 1 and b >= sec) for sec in range(n_buckets)), default=0))
    summaries = {}
    for key in METRICS:
        xs = values[key]
        summaries[key] = summarize(xs, name=METRICS[key][1], unit="s") if xs else None
        ms = np.asarray(xs, dtype=np.float64) * 1e3 if xs else np.zeros(1)
        summary[f"mean_{key}_ms"] = float(ms.mean())
        summary[f"median_{key}_ms"] = float(np.median(ms))
        summary[f"std_{key}_ms"] = float(ms.std())
        for p in percentiles:
            summary[f"p{_pname(p)}_{key}_ms"] = float(np.percentile(ms, p))
    return summary, summaries


# --------------------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------------------


def _root_url(base_url: str) -> str:
    """`http://host:port`, `http://host:port/` and `http://host:port/v1` all mean the same server."""
    url = base_url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


async def _discover_model(client, root: str, headers: dict) -> str:
    try:
        resp = await client.get(root + "/v1/models", headers=headers)
    except Exception as e:  # noqa: BLE001
        raise BenchmarkError(f"cannot reach {root}: {type(e).__name__}: {e}. Is the server running "
                             "(`npukit serve` / `vllm serve`) on that address?") from None
    if resp.status_code != 200:
        raise BenchmarkError(f"GET {root}/v1/models answered HTTP {resp.status_code}: {resp.text[:300]}"
                             + (" (pass --api-key)" if resp.status_code == 401 else ""))
    data = resp.json().get("data") or []
    if not data:
        raise BenchmarkError(f"{root}/v1/models lists no model; pass --model.")
    return data[0]["id"]


def _check_benchmark_args(backend, max_concurrency, request_rate, burstiness, percentile_metrics,
                          metric_percentiles) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}.")
    if max_concurrency is not None and max_concurrency < 1:
        raise ValueError(f"max_concurrency must be >= 1 or None (no limit), got {max_concurrency}.")
    if not request_rate > 0:
        raise ValueError(f"request_rate must be > 0 (inf = all at once), got {request_rate}.")
    if not burstiness > 0:
        raise ValueError(f"burstiness must be > 0 (1 = Poisson arrivals), got {burstiness}.")
    bad = [k for k in percentile_metrics if k not in METRICS]
    if bad:
        raise ValueError(f"unknown percentile metrics {bad}; choose from {', '.join(METRICS)}.")
    if not all(0 <= p <= 100 for p in metric_percentiles):
        raise ValueError(f"metric_percentiles must be in [0, 100], got {list(metric_percentiles)}.")


async def _send_all(items, send, max_concurrency, request_rate: float, burstiness: float, seed: int,
                    progress: bool) -> tuple[list[RequestResult], float, float]:
    """Send every item (`await send(item)`) at the request rate, at most max_concurrency at once; returns
    (results in item order, start time, duration)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    semaphore = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(items), desc="requests")

    async def limited(p: BenchPrompt) -> RequestResult:
        if semaphore is None:
            r = await send(p)
        else:
            async with semaphore:
                r = await send(p)
        if bar is not None:
            bar.update(1)
        return r

    start = time.perf_counter()
    tasks = []
    for i, p in enumerate(items):
        if i and math.isfinite(request_rate):
            # NOTE: gamma(shape=burstiness, scale=1/(rate*burstiness)) gaps: burstiness 1 = Poisson arrivals.
            await asyncio.sleep(rng.gamma(burstiness, 1.0 / (request_rate * burstiness)))
        tasks.append(asyncio.create_task(limited(p)))
    results = await asyncio.gather(*tasks)
    duration = time.perf_counter() - start
    if bar is not None:
        bar.close()
    return list(results), start, duration


async def async_run_serving_benchmark(
    base_url: str = "http://127.0.0.1:8000", *, model: str | None = None, backend: str = "openai",
    endpoint: str | None = None, prompts: Sequence[str] | Sequence[BenchPrompt] | None = None,
    num_prompts: int = 100, random_input_len: int = 1024, random_output_len: int = 128,
    random_range_ratio: float = 0.0, tokenizer=None, max_concurrency: int | None = None,
    request_rate: float = float("inf"), burstiness: float = 1.0, seed: int = 0, temperature: float = 0.0,
    ignore_eos: bool = False, api_key: str | None = None, extra_body: dict | None = None,
    percentile_metrics: Sequence[str] = ("ttft", "tpot", "itl", "e2el"), metric_percentiles: Sequence[float] = (99,),
    initial_test: bool = True, progress: bool = False, timeout: float = 6 * 3600,
) -> ServingBenchmarkResult:
    """The async form of `run_serving_benchmark` (use it inside a running event loop)."""
    import httpx

    _check_benchmark_args(backend, max_concurrency, request_rate, burstiness, percentile_metrics, metric_percentiles)
    if prompts is None:
        items = random_prompts(num_prompts, random_input_len, random_output_len, tokenizer=tokenizer,
                               range_ratio=random_range_ratio, seed=seed)
    else:
        items = [p if isinstance(p, BenchPrompt) else prompts_from_texts([p], random_output_len, tokenizer)[0]
                 for p in prompts]
        if not items:
            raise ValueError("prompts is empty.")
    root = _root_url(base_url)
    url = root + (endpoint or BACKENDS[backend])
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    connections = max_concurrency or len(items)
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)

    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout), limits=limits) as client:
        model_id = model or await _discover_model(client, root, headers)

        def body(p: BenchPrompt) -> dict:
            return _payload(backend, model_id, p, temperature, ignore_eos, extra_body)

        if initial_test:  # one request first, so a wrong model name or URL fails fast and clearly
            first = await _send(client, url, headers, backend, body(items[0]), items[0])
            if not first.success:
                raise BenchmarkError(f"the initial test request to {url} failed: {first.error}")

        send = functools.partial(_send, client, url, headers, backend)
        results, start, duration = await _send_all(items, lambda p: send(body(p), p), max_concurrency,
                                                   request_rate, burstiness, seed, progress)

    config = {
        "date": datetime.now().strftime("%Y%m%d-%H%M%S"), "backend": backend, "base_url": root,
        "endpoint": endpoint or BACKENDS[backend], "model_id": model_id, "num_prompts": len(items),
        "request_rate": request_rate if math.isfinite(request_rate) else "inf", "burstiness": burstiness,
        "max_concurrency": max_concurrency, "seed": seed, "temperature": temperature, "ignore_eos": ignore_eos,
        "percentile_metrics": list(percentile_metrics), "metric_percentiles": list(metric_percentiles),
    }
    summary, summaries = _summarize(results, duration, metric_percentiles, start)
    return ServingBenchmarkResult(config=config, requests=list(results), summary=summary, metrics=summaries)


def run_serving_benchmark(base_url: str = "http://127.0.0.1:8000", **kwargs) -> ServingBenchmarkResult:
    """Benchmark an OpenAI-compatible server (npukit's or vLLM's) like `vllm bench serve`.

    `base_url`: `http://host:port` (a trailing `/v1` is fine). Keyword arguments: see
    `async_run_serving_benchmark` (model, backend "openai" | "openai-chat", prompts, num_prompts,
    random_input_len, random_output_len, max_concurrency, request_rate, seed, tokenizer, api_key, ...).
    Works in notebooks too (where an event loop already runs: the benchmark gets its own thread).
    """
    coro = async_run_serving_benchmark(base_url, **kwargs)
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = asyncio.run(coro)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = e

    t = threading.Thread(target=run, name="npukit-bench")
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["result"]


# --------------------------------------------------------------------------------------------------
# CLI: npukit bench serve
# --------------------------------------------------------------------------------------------------


def add_bench_serve_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The `npukit bench serve` flags, named like `vllm bench serve`'s."""
    p.add_argument("--backend", choices=sorted(BACKENDS), default="openai",
                   help="openai (/v1/completions) or openai-chat (/v1/chat/completions) (default: openai)")
    p.add_argument("--base-url", default=None, help="server URL, e.g. http://127.0.0.1:8000 (overrides --host/--port)")
    p.add_argument("--host", default="127.0.0.1", help="server host (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="server port (default: 8000)")
    p.add_argument("--endpoint", default=None, help="API path (default: from --backend)")
    p.add_argument("--model", default=None, help="model name to send (default: the first one /v1/models lists)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer for random prompts: embedded name, folder or cached hub id (default: --model if "
                        "found locally, else word-based prompts)")
    p.add_argument("--dataset-name", choices=["random", "custom"], default="random",
                   help="random token prompts, or custom prompts from --dataset-path (default: random)")
    p.add_argument("--dataset-path", default=None,
                   help="custom prompts: JSON lines with a \"prompt\" field, or one per line")
    p.add_argument("--num-prompts", type=int, default=100, help="number of requests (default: 100)")
    p.add_argument("--random-input-len", type=int, default=1024, help="prompt tokens (default: 1024)")
    p.add_argument("--random-output-len", type=int, default=128, help="max_tokens of each request (default: 128)")
    p.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="lengths vary uniformly within +-ratio (default: 0)")
    p.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight (default: no limit)")
    p.add_argument("--request-rate", type=float, default=float("inf"),
                   help="requests per second, Poisson arrivals (default: inf = all at once)")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of arrival gaps (default: 1 = Poisson)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default: 0 = greedy)")
    p.add_argument("--ignore-eos", action="store_true", help="generate exactly the output length (vLLM extension)")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="API key (default: $OPENAI_API_KEY)")
    p.add_argument("--percentile-metrics", default="ttft,tpot,itl,e2el",
                   help="metrics to report (default: ttft,tpot,itl,e2el)")
    p.add_argument("--metric-percentiles", default="99", help="comma-separated percentiles (default: 99)")
    p.add_argument("--save-result", action="store_true", help="save the result as JSON")
    p.add_argument("--result-dir", default=".", help="where --save-result writes (default: .)")
    p.add_argument("--result-filename", default=None, help="file name for --save-result (default: generated)")
    p.add_argument("--disable-tqdm", action="store_true", help="no progress bar")
    p.add_argument("--compare-url", default=None, metavar="URL",
                   help="a second server (e.g. `vllm serve` on the same model): run the same prompts against it "
                        "too and print both side by side")
    p.add_argument("--compare-model", default=None, help="model name on --compare-url (default: its first)")
    return p


def compare_table(results: dict[str, ServingBenchmarkResult]) -> str:
    """Output tok/s, TPOT and TTFT of each server (mean, ms) and each one's ratio to the first."""
    names = list(results)
    rows = [("output tok/s", "output_throughput", ".1f"), ("mean TPOT (ms)", "mean_tpot_ms", ".1f"),
            ("mean TTFT (ms)", "mean_ttft_ms", ".1f"), ("failed", "failed", "d")]
    head = "| metric | " + " | ".join(names) + " | " + " | ".join(f"{n} / {names[0]}" for n in names[1:]) + " |"
    lines = [head, "|" + "---|" * (1 + 2 * len(names) - 1)]
    for label, key, fmt in rows:
        vals = [results[n].summary.get(key) or 0 for n in names]
        ratios = [f"{v / vals[0]:.2f}" if vals[0] else "-" for v in vals[1:]]
        lines.append(f"| {label} | " + " | ".join(format(v, fmt) for v in vals) + " | " + " | ".join(ratios) + " |")
    return "\n".join(lines)


def build_bench_serve_parser() -> argparse.ArgumentParser:
    return add_bench_serve_args(argparse.ArgumentParser(
        prog="npukit bench serve", description="Benchmark an OpenAI-compatible server like `vllm bench serve`."))


def run_bench_serve(args: argparse.Namespace) -> int:
    """`npukit bench serve` with parsed args: print the result (and save it). Returns the exit code."""
    base_url = args.base_url or f"http://{args.host}:{args.port}"
    try:
        percentiles = [float(x) for x in args.metric_percentiles.split(",") if x.strip()]
    except ValueError:
        return error(f"--metric-percentiles takes numbers like 50,90,99, got {args.metric_percentiles!r}")
    metrics = [x.strip() for x in args.percentile_metrics.split(",") if x.strip()]
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    if args.tokenizer and tokenizer is None:
        return error(f"cannot find the tokenizer {args.tokenizer!r} locally (embedded name, folder or cached hub id).")
    if tokenizer is None and args.dataset_name == "random":
        print("npukit bench: no local tokenizer (pass --tokenizer): random prompts are words, about one token "
              "each; token counts come from the server's usage.", file=sys.stderr)
    prompts = None
    if args.dataset_name == "custom":
        if not args.dataset_path:
            return error("--dataset-name custom needs --dataset-path FILE")
        try:
            prompts = read_prompts(args.dataset_path, args.random_output_len, tokenizer)[: args.num_prompts]
        except (OSError, ValueError) as e:
            return error(str(e))
    results = {}
    for label, url, model in (("server", base_url, args.model), ("compare", args.compare_url, args.compare_model)):
        if url is None:
            continue
        try:
            results[f"{label} ({url})"] = _bench_one(args, url, model, prompts, tokenizer, metrics, percentiles)
        except (BenchmarkError, ValueError) as e:
            return error(str(e))
    result = next(iter(results.values()))
    for r in results.values():
        print(r)
    if len(results) > 1:
        print(compare_table(results))
    if result.errors:
        print(f"first error: {result.errors[0]}", file=sys.stderr)
    if args.save_result:
        name = args.result_filename or (
            f"{args.backend}-{result.config['request_rate']}qps-concurrency{args.max_concurrency}-"
            f"{str(result.config['model_id']).replace('/', '_')}-{result.config['date']}.json")
        print(f"saved {result.save(Path(args.result_dir) / name)}", file=sys.stderr)
    return 0 if all(r.summary["completed"] for r in results.values()) else 1


def _bench_one(args, base_url, model, prompts, tokenizer, metrics, percentiles) -> ServingBenchmarkResult:
    return run_serving_benchmark(
        base_url, model=model, backend=args.backend, endpoint=args.endpoint, prompts=prompts,
        num_prompts=args.num_prompts, random_input_len=args.random_input_len,
        random_output_len=args.random_output_len, random_range_ratio=args.random_range_ratio,
        tokenizer=tokenizer, max_concurrency=args.max_concurrency, request_rate=args.request_rate,
        burstiness=args.burstiness, seed=args.seed, temperature=args.temperature, ignore_eos=args.ignore_eos,
        api_key=args.api_key, percentile_metrics=metrics, metric_percentiles=percentiles,
        progress=not args.disable_tqdm)


def bench_serve_main(argv: list[str] | None = None) -> int:
    """`npukit bench serve ...` as a function."""
    return run_bench_serve(build_bench_serve_parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(bench_serve_main())
