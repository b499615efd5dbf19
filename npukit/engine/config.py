"""EngineConfig: the knobs of the engine, named like `vllm serve` flags.

| npukit                    | vllm serve                    |
|---------------------------|-------------------------------|
| block_size                | --block-size                  |
| num_kv_blocks             | --num-gpu-blocks-override     |
| kv_cache_memory_fraction  | --gpu-memory-utilization      |
| max_num_seqs              | --max-num-seqs                |
| max_num_batched_tokens    | --max-num-batched-tokens      |
| max_model_len             | --max-model-len               |
| enable_prefix_caching     | --enable-prefix-caching       |
| enable_chunked_prefill    | --enable-chunked-prefill      |
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EngineConfig:
    block_size: int = 16
    # Number of KV blocks. None: derived from kv_cache_memory_fraction and the device's memory.
    num_kv_blocks: int | None = None
    # Fraction of (free) device memory the KV cache may take when num_kv_blocks is None.
    # NOTE: unlike vLLM's --gpu-memory-utilization (which covers weights + activations + KV), this
    # fraction applies to the memory left *after* the weights are loaded; on CPU to available RAM.
    kv_cache_memory_fraction: float = 0.3
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True

    def __post_init__(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(msg)

        need(isinstance(self.block_size, int) and self.block_size > 0,
             f"block_size must be a positive int (vLLM uses 16 on GPU, 128 on Ascend), got {self.block_size!r}")
        need(self.num_kv_blocks is None or (isinstance(self.num_kv_blocks, int) and self.num_kv_blocks > 0),
             f"num_kv_blocks must be None (auto) or a positive int, got {self.num_kv_blocks!r}")
        need(0.0 < self.kv_cache_memory_fraction <= 1.0,
             f"kv_cache_memory_fraction must be in (0, 1], got {self.kv_cache_memory_fraction!r}")
        need(isinstance(self.max_num_seqs, int) and self.max_num_seqs > 0,
             f"max_num_seqs must be a positive int, got {self.max_num_seqs!r}")
        need(isinstance(self.max_num_batched_tokens, int) and self.max_num_batched_tokens > 0,
             f"max_num_batched_tokens must be a positive int, got {self.max_num_batched_tokens!r}")
        need(self.max_model_len is None or (isinstance(self.max_model_len, int) and self.max_model_len > 0),
             f"max_model_len must be None or a positive int, got {self.max_model_len!r}")
        if not self.enable_chunked_prefill and self.max_model_len is not None:
            need(self.max_num_batched_tokens >= self.max_model_len,
                 f"without chunked prefill a whole prompt must fit one step: max_num_batched_tokens "
                 f"({self.max_num_batched_tokens}) must be >= max_model_len ({self.max_model_len}); "
                 "raise it or enable_chunked_prefill=True")
