"""npukit.metrics: exact numbers on synthetic timestamps, numpy-equal statistics, real HF timing."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from npukit.metrics import (
    GenerationTiming,
    PeakMemory,
    RequestMetrics,
    format_bytes,
    format_seconds,
    peak_memory,
    summarize,
    summarize_requests,
    time_generation,
)


def make_request(arrival, token_times, finish, n_prompt=8):
    return RequestMetrics(
        arrival_time=arrival,
        first_token_time=token_times[0] if token_times else None,
        token_times=list(token_times),
        finish_time=finish,
        num_prompt_tokens=n_prompt,
        num_output_tokens=len(token_times),
    )


# ---------------------------------------------------------------- RequestMetrics


def test_request_metrics_by_hand():
    r = make_request(10.0, [10.5, 10.6, 10.8, 11.1], 11.2)
    assert r.ttft == pytest.approx(0.5)
    assert r.e2e == pytest.approx(1.2)
    # (e2e - ttft) / (n - 1) = (1.2 - 0.5) / 3
    assert r.tpot == pytest.approx(0.7 / 3)
    assert r.itl == pytest.approx([0.1, 0.2, 0.3])
    assert r.output_tokens_per_s == pytest.approx(4 / 1.2)
    d = r.to_dict()
    assert d["ttft"] == pytest.approx(0.5) and d["token_times"] == [10.5, 10.6, 10.8, 11.1]
    assert "TTFT 500.00 ms" in str(r)


def test_record_token_and_finish_fill_the_fields():
    r = RequestMetrics(arrival_time=1.0, num_prompt_tokens=3)
    r.record_token(1.25)
    r.record_token(1.5, num_tokens=2)  # e.g. two tokens accepted in one step
    r.finish(1.75)
    assert r.first_token_time == 1.25
    assert r.token_times == [1.25, 1.5, 1.5]
    assert r.num_output_tokens == 3
    assert r.ttft == pytest.approx(0.25)
    assert r.tpot == pytest.approx((0.75 - 0.25) / 2)
    assert r.itl == pytest.approx([0.25, 0.0])


def test_one_token_has_no_tpot_and_no_itl():
    r = make_request(0.0, [0.3], 0.4)
    assert r.ttft == pytest.approx(0.3)
    assert r.tpot is None
    assert r.itl == []


def test_unfinished_request_reports_none():
    r = RequestMetrics(arrival_time=5.0)
    assert r.ttft is None and r.e2e is None and r.tpot is None and r.output_tokens_per_s is None
    assert "n/a" in str(r)


# ---------------------------------------------------------------- Summary


def test_summarize_matches_numpy():
    values = [0.12, 0.5, 0.31, 0.07, 0.9, 0.44, 0.29]
    s = summarize(values, name="TTFT", unit="s")
    arr = np.array(values)
    assert s.count == 7
    assert s.mean == pytest.approx(arr.mean())
    assert s.median == pytest.approx(np.median(arr))
    assert s.p90 == pytest.approx(np.percentile(arr, 90))
    assert s.p99 == pytest.approx(np.percentile(arr, 99))
    assert s.std == pytest.approx(arr.std())
    assert s.variance == pytest.approx(arr.var())
    assert (s.min, s.max) == (0.07, 0.9)
    assert s.range == pytest.approx(0.83)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(min_value=-1e6, max_value=1e6, allow_nan=False), min_size=1, max_size=50))
def test_summarize_percentiles_property(values):
    s = summarize(values)
    arr = np.asarray(values)
    assert s.p90 == pytest.approx(np.percentile(arr, 90))
    assert s.p99 == pytest.approx(np.percentile(arr, 99))
    assert s.min <= s.median <= s.max
    assert s.min <= s.p90 <= s.p99 <= s.max
    assert s.variance == pytest.approx(s.std**2, rel=1e-9, abs=1e-6)


def test_summarize_statistics_module_agrees():
    import statistics

    values = [5.22, 5.12, 2.96, 5.4]
    s = summarize(values)
    assert s.variance == pytest.approx(statistics.pvariance(values))  # population, like the seed snippets
    assert s.median == pytest.approx(statistics.median(values))


def test_summarize_empty_is_a_clear_error():
    with pytest.raises(ValueError, match="non-empty.*TTFT.*at least one"):
        summarize([], name="TTFT")


def test_summary_display_and_dict():
    s = summarize([0.010, 0.020, 0.030], name="TPOT", unit="s")
    text = str(s)
    assert text.startswith("TPOT: mean 20.00 ms") and "(n=3)" in text
    html = s._repr_html_()
    assert html.startswith("<table>") and "<th>p99</th>" in html and "20.00 ms" in html
    d = s.to_dict()
    assert d["mean"] == pytest.approx(0.02) and d["count"] == 3 and d["unit"] == "s"
    json.dumps(d)


# ---------------------------------------------------------------- summarize_requests


def test_summarize_requests_by_hand():
    reqs = [
        make_request(0.0, [0.2, 0.3, 0.5], 0.6, n_prompt=10),
        make_request(0.1, [0.5], 0.5, n_prompt=4),  # one token: no TPOT, no ITL
        make_request(0.2, [0.4, 0.9], 1.0, n_prompt=6),
    ]
    out = summarize_requests(reqs)
    duration = 1.0 - 0.0
    assert out["num_requests"] == 3
    assert out["duration"] == pytest.approx(duration)
    assert out["total_input_tokens"] == 20 and out["total_output_tokens"] == 6
    assert out["request_throughput"] == pytest.approx(3 / duration)
    assert out["output_throughput"] == pytest.approx(6 / duration)
    assert out["total_token_throughput"] == pytest.approx(26 / duration)
    assert out["ttft"].mean == pytest.approx((0.2 + 0.4 + 0.2) / 3)
    # TPOT only from requests with >= 2 tokens: (0.6-0.2)/2 and (0.8-0.2)/1
    assert out["tpot"].count == 2
    assert out["tpot"].mean == pytest.approx((0.2 + 0.6) / 2)
    assert sorted(out["itl"].to_dict()[k] for k in ("min", "max")) == pytest.approx([0.1, 0.5])
    assert out["itl"].count == 3
    assert out["e2e"].max == pytest.approx(0.8)

    text = str(out)
    assert "Successful requests:" in text and "Mean TTFT (ms):" in text and "P99 ITL (ms):" in text
    assert "<table>" in out._repr_html_()
    json.dumps(out.to_dict())
    assert isinstance(out, dict)


def test_summarize_requests_single_tokens_only():
    out = summarize_requests([make_request(0.0, [0.1], 0.1), make_request(0.0, [0.2], 0.3)])
    assert out["tpot"] is None and out["itl"] is None
    assert "TPOT" not in str(out) and "Mean TTFT" in str(out)


def test_summarize_requests_errors():
    with pytest.raises(ValueError, match="no requests"):
        summarize_requests([])
    with pytest.raises(ValueError, match="request 1 is not finished"):
        summarize_requests([make_request(0.0, [0.1], 0.2), RequestMetrics(arrival_time=0.0)])


# ---------------------------------------------------------------- formatting


def test_format_helpers():
    assert format_seconds(1.5) == "1.50 s"
    assert format_seconds(0.0123) == "12.30 ms"
    assert format_seconds(2.5e-5) == "25.0 µs"
    assert format_seconds(None) == "n/a"
    assert format_bytes(512) == "512 B"
    assert format_bytes(1536) == "1.50 KiB"
    assert format_bytes(3 * 1024**3) == "3.00 GiB"
    assert format_bytes(None) == "n/a"


# ---------------------------------------------------------------- memory


def test_peak_memory_on_cpu_reports_rss():
    import psutil

    with PeakMemory("cpu") as mem:
        x = torch.ones(1024, 1024)  # 4 MiB
        del x
    assert mem.stats is not None and mem.stats.device == "cpu"
    # CPU peak is the process's peak RSS: at least the RSS now.
    assert mem.peak_bytes >= psutil.Process().memory_info().rss // 2 > 0
    assert mem.peak_bytes == mem.stats.peak
    assert peak_memory("cpu") >= mem.peak_bytes  # CPU peak RSS never goes down


# ---------------------------------------------------------------- time_generation on the tiny model


def test_time_generation_stamps_every_token(tiny):
    model, tok = tiny
    n = 12
    t = time_generation(model, tok, "the capital of", max_new_tokens=n, min_new_tokens=n)
    assert isinstance(t, GenerationTiming)
    m = t.metrics
    assert len(t.token_ids) == n == m.num_output_tokens == len(m.token_times)
    assert m.num_prompt_tokens == len(tok("the capital of")["input_ids"])
    times = [m.arrival_time, *m.token_times, m.finish_time]
    assert all(a <= b for a, b in zip(times, times[1:])), "timestamps must be monotone"
    assert m.first_token_time == m.token_times[0]
    assert len(t.itl) == n - 1 and t.tpot is not None and t.ttft > 0
    assert t.text == tok.decode(t.token_ids, skip_special_tokens=True)
    assert t.peak_memory_bytes and t.peak_memory_bytes > 0
    assert "output tokens" in str(t) and "peak" in str(t)
    json.dumps(t.to_dict())

    # The streamer only watches: the tokens are what plain greedy generate gives.
    ids = tok("the capital of", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False)
    assert t.token_ids == ref[0, ids.shape[1]:].tolist()


def test_time_generation_accepts_ids_and_messages(tiny):
    model, tok = tiny
    ids = tok("hello")["input_ids"]
    a = time_generation(model, tok, ids, max_new_tokens=4, min_new_tokens=4)
    b = time_generation(model, tok, torch.tensor(ids), max_new_tokens=4, min_new_tokens=4)
    assert a.token_ids == b.token_ids and a.metrics.num_prompt_tokens == len(ids)
    msgs = [{"role": "user", "content": "hello"}]
    c = time_generation(model, tok, msgs, max_new_tokens=3, min_new_tokens=3)
    assert c.metrics.num_prompt_tokens == len(tok.apply_chat_template(msgs, add_generation_prompt=True)["input_ids"])


def test_time_generation_bad_input(tiny):
    model, tok = tiny
    with pytest.raises(TypeError, match="prompt string.*token ids"):
        time_generation(model, tok, 3.14)
    with pytest.raises(ValueError, match="one non-empty prompt"):
        time_generation(model, tok, torch.zeros(2, 3, dtype=torch.long))


def test_compare_ttft_times_the_same_prompt_three_ways(tiny):
    from npukit.metrics import compare_ttft, generate_one_token_seconds

    model, tok = tiny
    assert generate_one_token_seconds(model, tok, "Hello there", synchronize=False) > 0
    res = compare_ttft(model, tok, "Hello there", repeats=3, max_new_tokens=2)
    assert list(res) == ["first call (cold)", "generate(max_new_tokens=1)", "streamed first token"]
    assert res["first call (cold)"].count == 1 and res["streamed first token"].count == 3
    assert all(s.min > 0 for s in res.values())
    with pytest.raises(ValueError):
        compare_ttft(model, tok, "Hello", repeats=0)


def test_median_range_text():
    from npukit.metrics import median_range, summarize

    assert median_range(summarize([0.010, 0.012, 0.020])) == "12.0 ms (range 10.0-20.0 ms, n=3)"
    assert median_range(summarize([2.0]), scale=1, unit="s") == "2.0 s (one run)"
