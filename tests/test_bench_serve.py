"""npukit.bench: the serving benchmark client, against a fake OpenAI server with known delays
(first token after 50 ms, then one every 20 ms), and against npukit's own server."""
import asyncio
import json
import time

import pytest

from npukit.bench.serve import (
    BenchmarkError,
    BenchPrompt,
    bench_serve_main,
    load_tokenizer,
    random_prompts,
    read_prompts,
    run_serving_benchmark,
)
from npukit.serving import ServerThread

FIRST_DELAY, TOKEN_DELAY, NUM_TOKENS = 0.050, 0.020, 6


def fake_openai_app():
    """Streams NUM_TOKENS words: the first after FIRST_DELAY, then one per TOKEN_DELAY. A prompt with
    'FAIL' gets a 500. usage counts words."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse

    app = FastAPI()
    state = {"in_flight": 0, "max_in_flight": 0}
    app.state.counters = state

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "fake-model", "object": "model"}]}

    async def stream(body: dict, chat: bool):
        prompt = body["messages"][-1]["content"] if chat else body["prompt"]
        n = min(NUM_TOKENS, body.get("max_tokens") or body.get("max_completion_tokens") or NUM_TOKENS)
        state["in_flight"] += 1
        state["max_in_flight"] = max(state["max_in_flight"], state["in_flight"])
        try:
            for i in range(n):
                await asyncio.sleep(FIRST_DELAY if i == 0 else TOKEN_DELAY)
                piece = f" w{i}"
                choice = {"index": 0, "delta": {"content": piece}} if chat else {"index": 0, "text": piece}
                choice["finish_reason"] = "length" if i == n - 1 else None
                yield f"data: {json.dumps({'choices': [choice]})}\n\n"
            usage = {"prompt_tokens": len(prompt.split()), "completion_tokens": n,
                     "total_tokens": len(prompt.split()) + n}
            yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            state["in_flight"] -= 1

    async def handle(request: Request, chat: bool):
        body = await request.json()
        if body.get("model") != "fake-model":
            return JSONResponse({"error": {"message": f"The model `{body.get('model')}` does not exist."}}, 404)
        text = json.dumps(body)
        if "FAIL" in text:
            return JSONResponse({"error": {"message": "asked to fail"}}, 500)
        return StreamingResponse(stream(body, chat), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await handle(request, chat=True)

    return app


@pytest.fixture(scope="module")
def fake_server():
    with ServerThread(fake_openai_app()) as s:
        yield s


def test_metrics_match_the_known_delays(fake_server):
    r = run_serving_benchmark(fake_server.url, num_prompts=8, max_concurrency=4, random_input_len=5,
                              random_output_len=NUM_TOKENS, seed=1)
    s = r.summary
    assert (s["completed"], s["failed"]) == (8, 0)
    assert s["total_input_tokens"] == 8 * 5 and s["total_output_tokens"] == 8 * NUM_TOKENS
    assert r.config["model_id"] == "fake-model"  # discovered from /v1/models
    # Measured sleeps: never shorter than asked; generous upper bounds for a busy machine.
    assert 0.9 * FIRST_DELAY * 1e3 <= s["mean_ttft_ms"] <= 2.5 * FIRST_DELAY * 1e3
    assert 0.9 * TOKEN_DELAY * 1e3 <= s["mean_tpot_ms"] <= 2.5 * TOKEN_DELAY * 1e3
    assert 0.9 * TOKEN_DELAY * 1e3 <= s["median_itl_ms"] <= 2.5 * TOKEN_DELAY * 1e3
    expected_e2e = (FIRST_DELAY + (NUM_TOKENS - 1) * TOKEN_DELAY) * 1e3
    assert 0.9 * expected_e2e <= s["mean_e2el_ms"] <= 2.5 * expected_e2e
    # internal consistency of the derived numbers
    assert s["output_throughput"] == pytest.approx(s["total_output_tokens"] / s["duration"])
    assert s["request_throughput"] == pytest.approx(8 / s["duration"])
    for req in r.requests:
        assert len(req.itl) == NUM_TOKENS - 1 and req.generated_text == "".join(f" w{i}" for i in range(NUM_TOKENS))
        assert req.tpot == pytest.approx((req.latency - req.ttft) / (NUM_TOKENS - 1))


def test_max_concurrency_is_respected(fake_server):
    counters = fake_server.app.state.counters
    counters["max_in_flight"] = 0
    r = run_serving_benchmark(fake_server.url, num_prompts=6, max_concurrency=2, random_input_len=3,
                              random_output_len=2, initial_test=False)
    assert r.summary["completed"] == 6 and counters["max_in_flight"] == 2


def test_poisson_arrivals_spread_the_requests(fake_server):
    r = run_serving_benchmark(fake_server.url, num_prompts=6, request_rate=50.0, random_input_len=3,
                              random_output_len=2, initial_test=False, seed=3)
    starts = [q.metrics.arrival_time for q in r.requests]
    assert starts == sorted(starts) and starts[-1] - starts[0] > 0.0
    assert r.config["request_rate"] == 50.0
    assert "Request rate configured (RPS):           50.00" in str(r)


def test_failed_requests_are_counted_with_their_error(fake_server, tmp_path):
    prompts = ["one two", "please FAIL now", "three four five"]
    r = run_serving_benchmark(fake_server.url + "/v1", prompts=prompts, random_output_len=3, backend="openai-chat")
    assert (r.summary["completed"], r.summary["failed"]) == (2, 1)
    assert r.errors == ["HTTP 500: asked to fail"]
    assert r.summary["total_input_tokens"] == 2 + 3  # from the server's usage
    saved = json.loads(r.save(tmp_path / "result.json").read_text())
    assert saved["completed"] == 2 and saved["errors"][1] == "HTTP 500: asked to fail"
    assert saved["output_lens"] == [3, 0, 3] and "mean_ttft_ms" in saved and saved["backend"] == "openai-chat"


def test_report_layout_is_vllms(fake_server):
    r = run_serving_benchmark(fake_server.url, num_prompts=3, max_concurrency=1, random_input_len=4,
                              random_output_len=3, metric_percentiles=[50, 99])
    text = str(r)
    lines = text.splitlines()
    assert lines[0] == "============ Serving Benchmark Result ============" and lines[-1] == "=" * 50
    assert lines[1] == f"{'Successful requests:':<40} {3:<10}"
    for label in ("Failed requests:", "Maximum request concurrency:", "Benchmark duration (s):",
                  "Total input tokens:", "Total generated tokens:", "Request throughput (req/s):",
                  "Output token throughput (tok/s):", "Peak output token throughput (tok/s):",
                  "Peak concurrent requests:", "Total token throughput (tok/s):", "Mean TTFT (ms):",
                  "Median TPOT (ms):", "P50 ITL (ms):", "P99 E2EL (ms):"):
        assert any(line.startswith(label) for line in lines), label
    assert "---------------Time to First Token----------------" in lines
    assert "-----Time per Output Token (excl. 1st token)------" in lines
    # max_concurrency=1: each request starts after the previous one finished
    spans = sorted((q.metrics.arrival_time, q.metrics.finish_time) for q in r.requests)
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:]))
    # vLLM's peaks count per one-second bucket (short requests in the same second all count)
    assert 1 <= r.summary["max_concurrent_requests"] <= 3 and 3 <= r.summary["max_output_tokens_per_s"] <= 9
    assert "<table>" in r._repr_html_()


def test_wrong_model_or_dead_server_fail_fast_with_a_clear_error(fake_server):
    with pytest.raises(BenchmarkError, match="initial test request.*does not exist"):
        run_serving_benchmark(fake_server.url, model="nope", num_prompts=2, random_input_len=2, random_output_len=2)
    with pytest.raises(BenchmarkError, match="cannot reach"):
        run_serving_benchmark("http://127.0.0.1:9", num_prompts=1, random_input_len=2, random_output_len=2)
    with pytest.raises(ValueError, match="max_concurrency"):
        run_serving_benchmark(fake_server.url, max_concurrency=0)
    with pytest.raises(ValueError, match="backend"):
        run_serving_benchmark(fake_server.url, backend="tgi")


def test_random_prompts_with_and_without_a_tokenizer():
    words = random_prompts(4, 7, 5, seed=0)
    assert words == random_prompts(4, 7, 5, seed=0) and words != random_prompts(4, 7, 5, seed=1)
    assert all(len(p.prompt.split()) == p.prompt_len == 7 and p.output_len == 5 for p in words)
    varied = random_prompts(50, 10, 10, range_ratio=0.5, seed=0)
    assert {p.prompt_len for p in varied} <= set(range(5, 16)) and len({p.prompt_len for p in varied}) > 3
    tok = load_tokenizer("tiny-llama")
    assert tok is not None and load_tokenizer("no-such/model-anywhere") is None
    prompts = random_prompts(5, 32, 8, tokenizer=tok, seed=0)
    for p in prompts:  # random ids do not round-trip exactly through text (split UTF-8 bytes): nearly
        assert abs(p.prompt_len - len(tok(p.prompt, add_special_tokens=False)["input_ids"])) <= 2
        assert 24 <= p.prompt_len <= 32
    with pytest.raises(ValueError, match="must be >= 1"):
        random_prompts(0, 8, 8)


def test_read_prompts(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "hello there"}\nplain line here\n\n')
    got = read_prompts(f, output_len=4)
    assert got == [BenchPrompt("hello there", 2, 4), BenchPrompt("plain line here", 3, 4)]
    (tmp_path / "bad.jsonl").write_text('{"text": "x"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        read_prompts(tmp_path / "bad.jsonl", 4)


def test_cli(fake_server, tmp_path, capsys):
    rc = bench_serve_main(["--base-url", fake_server.url, "--num-prompts", "3", "--random-input-len", "4",
                           "--random-output-len", "2", "--max-concurrency", "2", "--disable-tqdm", "--save-result",
                           "--result-dir", str(tmp_path), "--result-filename", "r.json"])
    out = capsys.readouterr()
    assert rc == 0 and "Serving Benchmark Result" in out.out and "Successful requests:" in out.out
    assert json.loads((tmp_path / "r.json").read_text())["completed"] == 3
    assert bench_serve_main(["--base-url", fake_server.url, "--metric-percentiles", "x"]) == 2
    assert "--metric-percentiles" in capsys.readouterr().err
    assert bench_serve_main(["--base-url", fake_server.url, "--dataset-name", "custom"]) == 2
    assert "--dataset-path" in capsys.readouterr().err


def test_against_npukit_serve_over_the_real_engine(tiny):
    from npukit.engine import LLM
    from npukit.serving import create_app

    model, tok = tiny
    llm = LLM(model, tok, num_kv_blocks=128, max_model_len=256)
    with ServerThread(create_app(llm, served_model_name="tiny")) as s:
        t0 = time.perf_counter()
        r = run_serving_benchmark(s.url, num_prompts=8, random_input_len=16, random_output_len=8, tokenizer=tok,
                                  ignore_eos=True, backend="openai-chat")
        assert time.perf_counter() - t0 >= r.summary["duration"]
    assert (r.summary["completed"], r.summary["total_output_tokens"]) == (8, 64)
    assert all(q.output_len == 8 and q.ttft > 0 for q in r.requests)


def test_cli_compares_two_servers_in_one_run(fake_server, capsys):
    rc = bench_serve_main(["--base-url", fake_server.url, "--compare-url", fake_server.url + "/v1", "--num-prompts",
                           "2", "--random-input-len", "3", "--random-output-len", "3", "--disable-tqdm"])
    out = capsys.readouterr().out
    assert rc == 0 and out.count("Serving Benchmark Result") == 2
    assert "| output tok/s |" in out and "| mean TPOT (ms) |" in out and "/ server (" in out
