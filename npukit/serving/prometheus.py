"""`GET /metrics` in Prometheus' text format, with vLLM's metric names (so vLLM's dashboards read npukit).

Written by hand (the format is a few lines per metric); the engine thread records, the handler renders a
copy. Names follow vLLM v1: vllm:num_requests_running, vllm:num_requests_waiting, vllm:kv_cache_usage_perc,
vllm:time_to_first_token_seconds, vllm:time_per_output_token_seconds (vLLM also calls it
inter_token_latency), vllm:e2e_request_latency_seconds, vllm:prompt_tokens_total, vllm:generation_tokens_total,
vllm:request_success_total.
"""
import threading

# vLLM's buckets (vllm/v1/metrics/loggers.py)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0)


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.count, self.sum = 0, 0.0

    def observe(self, value: float) -> None:
        for i, b in enumerate(self.buckets):
            if value <= b:
                self.counts[i] += 1
                break
        self.count += 1
        self.sum += value

    def lines(self, name: str, labels: str) -> list[str]:
        out, running = [], 0
        for b, c in zip(self.buckets, self.counts):
            running += c
            out.append(f'{name}_bucket{{{labels},le="{b}"}} {running}')
        out += [f'{name}_bucket{{{labels},le="+Inf"}} {self.count}', f"{name}_count{{{labels}}} {self.count}",
                f"{name}_sum{{{labels}}} {self.sum}"]
        return out


class ServingMetrics:
    """Counters and histograms of finished requests (the engine thread records, any thread renders)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.ttft, self.tpot, self.e2e = Histogram(TTFT_BUCKETS), Histogram(TPOT_BUCKETS), Histogram(E2E_BUCKETS)
        self.success: dict[str, int] = {}

    def record(self, metrics, finish_reason: str | None) -> None:
        with self._lock:
            for hist, value in ((self.ttft, metrics.ttft), (self.tpot, metrics.tpot), (self.e2e, metrics.e2e)):
                if value is not None:
                    hist.observe(value)
            reason = finish_reason or "abort"
            self.success[reason] = self.success.get(reason, 0) + 1

    def render(self, stats: dict, model_name: str) -> str:
        labels = f'model_name="{model_name}"'
        gauges = [("vllm:num_requests_running", "gauge", "Requests in the running batch.", stats.get("num_running", 0)),
                  ("vllm:num_requests_waiting", "gauge", "Requests waiting to be scheduled.",
                   stats.get("num_waiting", 0)),
                  ("vllm:kv_cache_usage_perc", "gauge", "KV cache usage (1 = full).", stats.get("kv_cache_usage", 0.0)),
                  ("vllm:num_preemptions_total", "counter", "Preemptions.", stats.get("num_preemptions", 0)),
                  ("vllm:prompt_tokens_total", "counter", "Prompt tokens.", stats.get("num_prompt_tokens", 0)),
                  ("vllm:generation_tokens_total", "counter", "Generated tokens.",
                   stats.get("num_generated_tokens", 0))]
        out = []
        for name, kind, help_, value in gauges:
            out += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name}{{{labels}}} {value}"]
        with self._lock:
            out += ["# HELP vllm:request_success_total Finished requests by finish reason.",
                    "# TYPE vllm:request_success_total counter"]
            out += [f'vllm:request_success_total{{{labels},finished_reason="{r}"}} {n}'
                    for r, n in sorted(self.success.items())]
            for name, hist, help_ in (("vllm:time_to_first_token_seconds", self.ttft, "Time to first token."),
                                      ("vllm:time_per_output_token_seconds", self.tpot, "Time per output token."),
                                      ("vllm:e2e_request_latency_seconds", self.e2e, "End-to-end request latency.")):
                out += [f"# HELP {name} {help_}", f"# TYPE {name} histogram", *hist.lines(name, labels)]
        return "\n".join(out) + "\n"
