"""npukit.bench.vllm_peer against a FAKE vllm package (no real vLLM venv needed): the R.json contract, what reaches
vllm.LLM / SamplingParams, CPU time of child processes, and the error messages."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest

from npukit.bench import vllm_peer
from npukit.bench.vllm_peer import run_vllm_peer

# A stand-in for vllm: records what it was given in $FAKE_VLLM_LOG, returns token_ids of the requested
# length (cut at $FAKE_VLLM_STOP_AT, like an EOS), and like vLLM V1 does its work in a CHILD process (here
# a CPU-burning helper started by LLM() that burns 0.3 s of CPU per generate call).
FAKE_VLLM = '''
import json, os, subprocess, sys
from types import SimpleNamespace

__version__ = "0.0.fake"
_BURNER = ("import sys, time\\n"
           "for _ in sys.stdin:\\n"
           "    t = time.process_time()\\n"
           "    while time.process_time() - t < 0.3: pass\\n"
           "    print('done', flush=True)\\n")


class SamplingParams:
    def __init__(self, temperature=1.0, max_tokens=16, ignore_eos=False):
        self.temperature, self.max_tokens, self.ignore_eos = temperature, max_tokens, ignore_eos


class LLM:
    def __init__(self, model, **kwargs):
        if not os.path.isdir(model):
            raise ValueError(f"fake vllm: no model folder {model}")
        self.log = {"model": model, "kwargs": kwargs, "generate": [],
                    "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "VLLM_CPU_OMP_THREADS_BIND",
                                                       "FAKE_TUNING") if k in os.environ}}
        self.core = subprocess.Popen([sys.executable, "-c", _BURNER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        if os.environ.get("FAKE_VLLM_HANG"):  # an engine core that never comes up
            hung = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
            open(os.environ["FAKE_VLLM_HANG"], "w").write(str(hung.pid))
            hung.wait()

    def reset_prefix_cache(self):
        self.log["generate"].append("reset_prefix_cache")

    def generate(self, prompts, params, use_tqdm=True):
        params = params if isinstance(params, list) else [params] * len(prompts)
        self.log["generate"].append([[p["prompt_token_ids"] for p in prompts],
                                     [[s.temperature, s.max_tokens, s.ignore_eos] for s in params]])
        with open(os.environ["FAKE_VLLM_LOG"], "w") as f:
            json.dump(self.log, f)
        self.core.stdin.write("go\\n"); self.core.stdin.flush(); self.core.stdout.readline()
        stop = int(os.environ.get("FAKE_VLLM_STOP_AT", 10**9))
        return [SimpleNamespace(outputs=[SimpleNamespace(token_ids=list(range(min(s.max_tokens, stop))))])
                for s in params]
'''

PROMPTS = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
MAX_TOKENS = [4, 1, 7]


@pytest.fixture
def fake_vllm(tmp_path, monkeypatch):
    """A fake vllm on PYTHONPATH, a model folder, and the log file the fake writes."""
    (tmp_path / "site" / "vllm").mkdir(parents=True)
    (tmp_path / "site" / "vllm" / "__init__.py").write_text(FAKE_VLLM)
    (tmp_path / "model").mkdir()
    log = tmp_path / "fake_vllm_log.json"
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("FAKE_VLLM_LOG", str(log))
    for var in ("OMP_NUM_THREADS", "VLLM_CPU_OMP_THREADS_BIND", "FAKE_VLLM_STOP_AT"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path / "model", log


def test_result_contract_and_what_reaches_vllm(fake_vllm):
    model, log = fake_vllm
    r = run_vllm_peer(sys.executable, str(model), PROMPTS, MAX_TOKENS, "bfloat16")

    assert r["num_requests"] == len(PROMPTS)
    assert r["output_tokens"] == sum(MAX_TOKENS)
    assert r["vllm_version"] == "0.0.fake"
    assert r["wall_s"] > 0 and r["load_s"] >= 0
    # the fake's worker child burnt 0.3 s of CPU during the timed generate: cpu_s must include it
    children = {k: v for k, v in r["cpu_s_by_process"].items() if k != "main"}
    assert max(children.values()) >= 0.25
    assert r["cpu_s"] == pytest.approx(sum(r["cpu_s_by_process"].values()))

    seen = json.loads(log.read_text())
    assert seen["model"] == str(model)
    assert seen["kwargs"]["dtype"] == "bfloat16" and seen["kwargs"]["seed"] == 0
    assert seen["kwargs"]["max_num_seqs"] == 64
    assert seen["kwargs"]["kv_cache_memory_bytes"] == 4 * 2**30
    warmup, reset, timed = seen["generate"]
    assert len(warmup[0]) == 1 and reset == "reset_prefix_cache"
    prompt_ids, params = timed
    assert prompt_ids == PROMPTS  # given as token ids, in order
    assert params == [[0.0, m, True] for m in MAX_TOKENS]  # greedy, ignore_eos, each its own max_tokens
    assert seen["env"] == {}  # vLLM's own thread binding


def test_output_tokens_are_counted_from_the_outputs(fake_vllm, monkeypatch):
    model, _ = fake_vllm
    monkeypatch.setenv("FAKE_VLLM_STOP_AT", "3")  # the fake stops early, as if at EOS
    r = run_vllm_peer(sys.executable, str(model), PROMPTS, MAX_TOKENS, "float32")
    assert r["output_tokens"] == sum(min(m, 3) for m in MAX_TOKENS)


def test_engine_args_and_threads(fake_vllm):
    model, log = fake_vllm
    run_vllm_peer(sys.executable, str(model), PROMPTS, MAX_TOKENS, "float32", max_num_seqs=8,
                  max_num_batched_tokens=1024, kv_cache_space_gib=0.5, threads=1, enforce_eager=True)
    seen = json.loads(log.read_text())
    kw = seen["kwargs"]
    assert (kw["max_num_seqs"], kw["max_num_batched_tokens"], kw["enforce_eager"]) == (8, 1024, True)
    assert kw["kv_cache_memory_bytes"] == 2**29
    assert seen["env"] == {"OMP_NUM_THREADS": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}


def test_tuned_runs_get_vllms_cpu_recommendations_and_say_which(fake_vllm, monkeypatch, tmp_path):
    model, log = fake_vllm
    monkeypatch.setattr(vllm_peer, "vllm_cpu_tuning", lambda python: ({"FAKE_TUNING": "on"}, {"tcmalloc": "t.so"}))
    r = run_vllm_peer(sys.executable, str(model), PROMPTS, MAX_TOKENS, "float32")
    assert json.loads(log.read_text())["env"] == {"FAKE_TUNING": "on"}
    assert r["tuning"] == {"tcmalloc": "t.so", "threads": "VLLM_CPU_OMP_THREADS_BIND=auto (vLLM's own binding)"}
    r = run_vllm_peer(sys.executable, str(model), PROMPTS, MAX_TOKENS, "float32", tuned=False, threads=1)
    assert "FAKE_TUNING" not in json.loads(log.read_text())["env"] and r["tuning"]["threads"] == "1, unbound"
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0-1")  # the caller binds vLLM to every core: passed on, reported
    r = run_vllm_peer(sys.executable, str(model), PROMPTS, MAX_TOKENS, "float32")
    assert json.loads(log.read_text())["env"]["VLLM_CPU_OMP_THREADS_BIND"] == "0-1"
    assert r["tuning"]["threads"] == "VLLM_CPU_OMP_THREADS_BIND=0-1 (from the environment)"
    monkeypatch.undo()
    # what the real one finds: tcmalloc from the system, Intel OpenMP from the venv's lib/
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "lib").mkdir()
    lib = tmp_path / "libtcmalloc_minimal.so.4"
    lib.write_bytes(b"")
    monkeypatch.setattr(vllm_peer, "TCMALLOC_GLOBS", (str(lib),))
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    env, report = vllm_peer.vllm_cpu_tuning(str(venv / "bin" / "python"))
    assert env == {"LD_PRELOAD": str(lib)} and report["tcmalloc"] == str(lib)
    assert "pip install intel-openmp" in report["intel_openmp"]
    (venv / "lib" / "libiomp5.so").write_bytes(b"")
    monkeypatch.setattr(vllm_peer, "TCMALLOC_GLOBS", ())
    env, report = vllm_peer.vllm_cpu_tuning(str(venv / "bin" / "python"))
    assert env == {"LD_PRELOAD": str(venv / "lib" / "libiomp5.so")}
    assert "apt-get install libtcmalloc-minimal4" in report["tcmalloc"]


def test_missing_interpreter_says_how_to_make_the_venv(tmp_path):
    with pytest.raises(FileNotFoundError, match="no python interpreter at .*vllm-cpu"):
        run_vllm_peer(str(tmp_path / "no-venv" / "bin" / "python"), str(tmp_path), PROMPTS, MAX_TOKENS,
                      "bfloat16")


def test_broken_vllm_install_is_reported(fake_vllm, tmp_path):
    model, _ = fake_vllm
    (tmp_path / "site" / "vllm" / "__init__.py").write_text("raise ImportError('No module named vllm._C')")
    with pytest.raises(RuntimeError, match=r"(?s)cannot import vllm in .*vllm\._C.*venv that has vllm-cpu"):
        run_vllm_peer(sys.executable, str(model), PROMPTS, MAX_TOKENS, "bfloat16")


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed here")
def test_interpreter_without_vllm(tmp_path):
    with pytest.raises(RuntimeError, match="cannot import vllm in"):
        run_vllm_peer(sys.executable, str(tmp_path), PROMPTS, MAX_TOKENS, "bfloat16")


def test_engine_failure_carries_stderr_tail(fake_vllm, tmp_path):
    with pytest.raises(RuntimeError, match=r"(?s)vLLM peer failed \(exit 1\).*fake vllm: no model folder"):
        run_vllm_peer(sys.executable, str(tmp_path / "missing-model"), PROMPTS, MAX_TOKENS, "bfloat16")


def test_timeout_ends_the_engine_processes_too(fake_vllm, tmp_path, monkeypatch):
    psutil = pytest.importorskip("psutil")
    model, _ = fake_vllm
    pid_file = tmp_path / "core.pid"
    monkeypatch.setenv("FAKE_VLLM_HANG", str(pid_file))
    with pytest.raises(RuntimeError, match="did not finish in 2 s"):
        run_vllm_peer(sys.executable, str(model), PROMPTS, MAX_TOKENS, "bfloat16", timeout_s=2)
    hung_pid = int(pid_file.read_text())  # the fake's child: killed with the script's whole session

    def gone() -> bool:
        try:
            return psutil.Process(hung_pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    deadline = time.monotonic() + 5
    while not gone() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gone()


def test_bad_arguments():
    with pytest.raises(ValueError, match="2 prompts but 3 max_tokens"):
        run_vllm_peer(sys.executable, "m", PROMPTS[:2], MAX_TOKENS, "bfloat16")
    with pytest.raises(TypeError, match="unknown engine args \\['gpu_memory_utilization'\\]"):
        run_vllm_peer(sys.executable, "m", PROMPTS, MAX_TOKENS, "bfloat16", gpu_memory_utilization=0.5)


def test_script_rejects_a_bad_workload(fake_vllm, tmp_path):
    model, _ = fake_vllm
    workload = tmp_path / "w.json"
    workload.write_text(json.dumps({"prompts": PROMPTS, "max_tokens": [1]}))
    proc = subprocess.run([sys.executable, vllm_peer.__file__, "--model", str(model), "--workload",
                           str(workload), "--out", str(tmp_path / "r.json")], capture_output=True, text=True)
    assert proc.returncode != 0
    assert "needs as many max_tokens as prompts" in proc.stderr
    assert not (tmp_path / "r.json").exists()
