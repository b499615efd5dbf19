"""Issue 11's serving-speed table in one run: `npukit serve` and `vllm serve`, same model, same client.

    PYTHONPATH=. python benchmarks/bench_serve_vs_vllm.py --vllm-python /work/vllm-venv/bin/python
    PYTHONPATH=. python benchmarks/bench_serve_vs_vllm.py --vllm-python ... --vllm-env VLLM_CPU_OMP_THREADS_BIND=0-1
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 PYTHONPATH=. python benchmarks/bench_serve_vs_vllm.py ...

Starts both servers on free 127.0.0.1 ports (vLLM-CPU as vLLM recommends: tcmalloc and Intel OpenMP
preloaded where installed, see `npukit.bench.vllm_peer.vllm_cpu_tuning`; its own thread binding unless
--vllm-env says otherwise), waits for /health, then for each concurrency sends the same seeded chat
requests (`npukit bench serve`'s client, vLLM's random workload shape) to one server after the other (the
idle one waits on its socket) and prints output tok/s, TPOT and TTFT side by side with the ratios.
Without --vllm-python only npukit is measured. NOTE: on a 2-core machine vLLM's auto binding runs ONE OpenMP
thread (it keeps a core for its engine core); bound to both cores (the second command) it was 1.6-2.2x faster
here, so that is the peer to beat.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from npukit.bench.serve import compare_table, load_tokenizer, run_serving_benchmark  # noqa: E402
from npukit.bench.vllm_peer import vllm_cpu_tuning  # noqa: E402
from npukit.parallel.executor import free_port  # noqa: E402
from npukit.samples import sample_path  # noqa: E402


def start(cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
    with log.open("w") as out:  # the server writes to its own copy of the file descriptor
        return subprocess.Popen(cmd, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT)


def wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout_s: float = 900) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server at {url} exited with {proc.returncode}; its log: {log}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise SystemExit(f"the server at {url} was not healthy after {timeout_s:.0f} s; its log: {log}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct", help="embedded name or model folder")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--vllm-python", default=os.environ.get("NPUKIT_VLLM_PYTHON"),
                   help="python of a venv with vllm-cpu (default: $NPUKIT_VLLM_PYTHON; unset: npukit only)")
    p.add_argument("--vllm-env", nargs="*", default=[], metavar="K=V",
                   help="extra environment for vLLM, e.g. VLLM_CPU_OMP_THREADS_BIND=nobind OMP_NUM_THREADS=2")
    p.add_argument("--npukit-args", default="", help="extra `npukit serve` flags, one string")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--prompts-per-concurrency", type=int, default=4, help="num prompts = max(8, this x concurrency)")
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--logs", default="/tmp/npukit-bench-serve", help="server logs go here")
    args = p.parse_args()

    model_dir = str(sample_path(args.model)) if not Path(args.model).is_dir() else args.model
    logs = Path(args.logs)
    logs.mkdir(parents=True, exist_ok=True)
    servers: dict[str, tuple[str, subprocess.Popen, Path]] = {}
    try:
        port = free_port()
        cmd = [sys.executable, "-m", "npukit", "serve", model_dir, "--served-model-name", "m", "--dtype", args.dtype,
               "--port", str(port), "--log-level", "warning", *args.npukit_args.split()]
        servers["npukit"] = (f"http://127.0.0.1:{port}", start(cmd, {}, logs / "npukit.log"), logs / "npukit.log")
        if args.vllm_python:
            port = free_port()
            env, report = vllm_cpu_tuning(args.vllm_python)
            env |= dict(kv.split("=", 1) for kv in args.vllm_env)
            env.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
            print(f"vLLM-CPU settings: {report}; extra env: {args.vllm_env or 'none'}")
            cmd = [args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
                   "--served-model-name", "m", "--dtype", args.dtype, "--port", str(port)]
            servers["vLLM"] = (f"http://127.0.0.1:{port}", start(cmd, env, logs / "vllm.log"), logs / "vllm.log")
        for url, proc, log in servers.values():
            wait_healthy(url, proc, log)
        tokenizer = load_tokenizer(model_dir)
        rows = []
        for c in args.concurrency:
            n = max(8, args.prompts_per_concurrency * c)
            results = {name: run_serving_benchmark(
                url, model="m", backend="openai-chat", num_prompts=n, random_input_len=args.input_len,
                random_output_len=args.output_len, tokenizer=tokenizer, max_concurrency=c, ignore_eos=True, seed=0)
                for name, (url, _, _) in servers.items()}
            print(f"\n== concurrency {c}, {n} prompts of {args.input_len} tokens, {args.output_len} out")
            print(compare_table(results))
            rows.append((c, n, {k: r.summary for k, r in results.items()}))
        names = list(servers)
        print("\n| concurrency | " + " | ".join(f"{k} out tok/s | {k} TPOT ms | {k} TTFT ms" for k in names) + " |")
        print("|---|" + "---|" * (3 * len(names)))
        for c, n, s in rows:
            print(f"| {c} ({n} prompts) | " + " | ".join(
                f"{s[k]['output_throughput']:.1f} | {s[k]['mean_tpot_ms']:.1f} | {s[k]['mean_ttft_ms']:.1f}"
                for k in names) + " |")
    finally:
        for _, proc, _ in servers.values():
            proc.terminate()
        for _, proc, _ in servers.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
