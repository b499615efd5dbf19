"""npukit's engine: a small, readable vLLM (paged KV cache, continuous batching, prefix caching).

    from npukit.engine import LLM, SamplingParams
    llm = LLM("smollm2-135m-instruct")
    llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=16))

Modules, in the order a request meets them: config (EngineConfig), sampling_params, sequence, scheduler,
block_manager, runner (+ kv_cache), sampling (the Sampler), output (detokenizer, stops, RequestOutput), llm.
The names below load on first use, so `npukit.engine.config` (stdlib only) imports without torch.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "EngineConfig": "config",
    "SamplingParams": "sampling_params",
    "LLM": "llm", "RequestOutput": "llm", "CompletionOutput": "llm", "EngineStats": "llm",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
