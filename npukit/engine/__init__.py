"""npukit's engine: a small, readable vLLM (paged KV cache, continuous batching, prefix caching).

    from npukit.engine import LLM, SamplingParams
    llm = LLM("smollm2-135m-instruct")
    llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=16))

Modules, in the order a request meets them: sampling (SamplingParams), sequence, scheduler,
block_manager, runner (+ kv_cache), sampling (Sampler), llm.
"""
from .config import EngineConfig
from .llm import LLM, CompletionOutput, EngineStats, RequestOutput
from .sampling import SamplingParams

__all__ = ["LLM", "SamplingParams", "EngineConfig", "RequestOutput", "CompletionOutput", "EngineStats"]
