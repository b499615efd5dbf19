"""Issue 11's targets, measured against a real `npukit serve` app in this process (127.0.0.1 only):

    PYTHONPATH=. python benchmarks/serve_hardening.py [--model smollm2-135m-instruct] [--disconnects 1000]

1. /health p99 while engine steps of >= 1 s run (long prompts, chunked prefill off) and /stats is polled
   every 50 ms; 2. a 50 MB body: time to the 413; 3. N clients that disconnect mid-body or mid-stream:
   KV blocks still used afterwards. (The fuzz target is tests/test_serving_hardening.py with
   NPUKIT_FUZZ_EXAMPLES=600.)
"""
import argparse
import json
import socket
import statistics
import threading
import time

import httpx

from npukit.engine import LLM
from npukit.serving import ServerThread, create_app


def health_under_long_steps(s, llm, prompt_words: int) -> None:
    steps, stop = [], threading.Event()

    def timed_step(real=llm.step):
        t = time.perf_counter()
        out = real()
        steps.append(time.perf_counter() - t)
        return out

    llm.step = timed_step
    prompt = " ".join(f"word{i}" for i in range(prompt_words))
    load = [threading.Thread(target=lambda: httpx.post(s.base_url + "/completions", json={
        "prompt": prompt, "max_tokens": 8, "ignore_eos": True}, timeout=600)) for _ in range(4)]

    def poll_stats():
        with httpx.Client(timeout=30) as http:
            while not stop.is_set():
                http.get(s.url + "/stats")
                time.sleep(0.05)

    poller = threading.Thread(target=poll_stats)
    for t in load + [poller]:
        t.start()
    lat = []
    with httpx.Client(timeout=30) as http:
        while any(t.is_alive() for t in load):
            t0 = time.perf_counter()
            http.get(s.url + "/health")
            lat.append(time.perf_counter() - t0)
            time.sleep(0.02)
    stop.set()
    poller.join()
    del llm.step
    lat.sort()
    long_steps = [x for x in steps if x >= 1.0]
    print(f"/health: {len(lat)} probes, p50 {statistics.median(lat) * 1e3:.1f} ms, "
          f"p99 {lat[max(0, int(len(lat) * 0.99) - 1)] * 1e3:.1f} ms, max {lat[-1] * 1e3:.1f} ms; engine steps: "
          f"{len(steps)}, {len(long_steps)} of >= 1 s (longest {max(steps):.2f} s)")


def big_body(s) -> None:
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 52428800\r\n\r\n")
    t = time.perf_counter()
    with socket.create_connection(("127.0.0.1", s.port)) as sock:
        sock.sendall(head)
        try:
            for _ in range(800):  # keep sending the 50 MB until the server answers
                sock.sendall(b"x" * 65536)
        except OSError:
            pass
        answer = sock.recv(100)
    status = answer.split(b"\r\n")[0].decode()
    print(f"50 MB body: {status} after {time.perf_counter() - t:.3f} s")


def disconnects(s, llm, n: int) -> None:
    body = json.dumps({"prompt": "A long story:", "max_tokens": 64, "ignore_eos": True, "stream": True}).encode()
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body))
    t = time.perf_counter()
    for i in range(n):
        with socket.create_connection(("127.0.0.1", s.port)) as sock:
            sock.sendall(head + (body[: len(body) // 2] if i % 2 else body))
            if not i % 2:
                sock.recv(100)
    while llm.stats().num_running or llm.stats().num_waiting:
        time.sleep(0.05)
    st = llm.stats()
    print(f"{n} disconnecting clients in {time.perf_counter() - t:.1f} s: running {st.num_running}, "
          f"blocks used {st.num_blocks_used} (of which prefix-cached {st.num_blocks_cached})")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--prompt-words", type=int, default=450)
    ap.add_argument("--disconnects", type=int, default=1000)
    a = ap.parse_args()
    llm = LLM(a.model, device="cpu", dtype="float32", max_model_len=2048, max_num_batched_tokens=8192,
              enable_chunked_prefill=False)
    with ServerThread(create_app(llm, served_model_name="m")) as s:
        health_under_long_steps(s, llm, a.prompt_words)
        big_body(s)
        disconnects(s, llm, a.disconnects)


if __name__ == "__main__":
    main()
