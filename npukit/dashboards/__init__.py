"""ipywidgets dashboards for the notebooks: one line to show each.

    from npukit.dashboards import PrecisionDashboard, GenerationDashboard, LatencyDashboard
    PrecisionDashboard("smollm2-135m-instruct")          # fp32 / bf16 / fp16: memory, speed, drift
    GenerationDashboard(model, tokenizer)                # sampling knobs, streamed reply, TTFT / TPOT
    LatencyDashboard(model, tokenizer)                   # N runs with / without KV cache, distributions, memory

Each dashboard keeps its logic in methods bound to buttons (``run()``, ``generate()``), so tests drive
it by setting widget values and calling ``button.click()``. Shared pieces live in ``base.py``
(``Dashboard``, the ``@action`` guard that turns errors into a status line, PNG plotting helpers).
Modules load on first use: importing this package does not import torch or matplotlib.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "Dashboard": "npukit.dashboards.base",
    "PrecisionDashboard": "npukit.dashboards.precision",
    "compare_precisions": "npukit.dashboards.precision",
    "GenerationDashboard": "npukit.dashboards.generation",
    "stream_chat": "npukit.dashboards.generation",
    "LatencyDashboard": "npukit.dashboards.latency",
    "kv_cache_bytes": "npukit.dashboards.latency",
    "kv_cache_usage": "npukit.dashboards.latency",
    # NOTE: written separately (notebooks 05-08); resolved only when asked for.
    "EngineDashboard": "npukit.dashboards.engine",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'npukit.dashboards' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
