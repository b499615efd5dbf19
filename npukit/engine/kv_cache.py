"""The physical paged K/V cache: one K and one V tensor per layer, addressed by slot.

Layout (the vLLM one): ``k_caches[layer]`` and ``v_caches[layer]`` are
``[num_blocks, block_size, num_kv_heads, head_dim]``. Token position ``p`` of a sequence with block
table ``table`` lives at *slot* ``table[p // block_size] * block_size + p % block_size``; viewed flat,
``cache.view(num_blocks * block_size, num_kv_heads, head_dim)[slot]`` is that token's K (or V).

Gathering whole blocks (``cache[block_table]``) gives ``[num_blocks_of_seq, block_size, heads, dim]``,
which views as ``[context_len, heads, dim]`` with no copy beyond the gather itself: that is what the
runner's attention reads.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def kv_shape(model_config) -> tuple[int, int, int]:
    """(num_layers, num_kv_heads, head_dim) of a Llama-family HF config."""
    num_heads = model_config.num_attention_heads
    num_kv_heads = getattr(model_config, "num_key_value_heads", None) or num_heads
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // num_heads
    return model_config.num_hidden_layers, num_kv_heads, head_dim


def kv_bytes_per_block(model_config, block_size: int, dtype: torch.dtype, tensor_parallel_size: int = 1) -> int:
    """Bytes one block takes over all layers, K and V: 2 * layers * block_size * kv_heads * head_dim * itemsize
    (on one rank under tensor parallelism: its share of the KV heads, at least one)."""
    from ..parallel.sharding import kv_heads_per_rank

    num_layers, num_kv_heads, head_dim = kv_shape(model_config)
    num_kv_heads = kv_heads_per_rank(num_kv_heads, tensor_parallel_size)
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * num_layers * block_size * num_kv_heads * head_dim * itemsize


def slot_mapping_for(block_table: list[int], start: int, end: int, block_size: int) -> list[int]:
    """Slots of positions start..end-1 of a sequence with this block table."""
    # NOTE: the block table must already cover position end - 1 (the block manager's job).
    if (end + block_size - 1) // block_size > len(block_table):
        raise ValueError(
            f"block table has {len(block_table)} blocks of {block_size} tokens but positions up to "
            f"{end - 1} were asked for: allocate/append_slots before running the model"
        )
    return [block_table[p // block_size] * block_size + p % block_size for p in range(start, end)]


@dataclass
class KVCache:
    k_caches: list[torch.Tensor]  # per layer [num_blocks, block_size, num_kv_heads, head_dim]
    v_caches: list[torch.Tensor]

    def __post_init__(self):
        # NOTE: the caches viewed by slot [num_blocks * block_size, num_kv_heads, head_dim], made once: at one
        # decode row the two views cost as much as the write (a C write was no faster than index_copy_)
        self.slots = [(k.view(-1, *k.shape[2:]), v.view(-1, *v.shape[2:]))
                      for k, v in zip(self.k_caches, self.v_caches)]

    @classmethod
    def allocate(cls, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str) -> "KVCache":
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        # NOTE: zeros, not empty: padded gathers read unused blocks (masked out, but NaN * 0 is NaN).
        ks = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        vs = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        return cls(ks, vs)

    @property
    def num_layers(self) -> int:
        return len(self.k_caches)

    @property
    def num_blocks(self) -> int:
        return self.k_caches[0].shape[0]

    @property
    def block_size(self) -> int:
        return self.k_caches[0].shape[1]

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k_caches + self.v_caches)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Store k, v ``[num_tokens, num_kv_heads, head_dim]`` at their slots (int64 ``[num_tokens]``)."""
        ks, vs = self.slots[layer]
        ks.index_copy_(0, slot_mapping, k)
        vs.index_copy_(0, slot_mapping, v)

    def gather_blocks(self, layer: int, block_ids: torch.Tensor, num_seqs: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of whole blocks: ``num_seqs`` block tables of equal length ``n``, flattened into ``block_ids``
        ``[num_seqs * n]`` -> ``[num_seqs, n * block_size, num_kv_heads, head_dim]`` each."""
        kc, vc = self.k_caches[layer], self.v_caches[layer]
        shape = (num_seqs, -1, *kc.shape[2:])
        # NOTE: index_select on the block dim copies whole contiguous blocks: ~4x faster than kc[ids] on CPU.
        return kc.index_select(0, block_ids).view(shape), vc.index_select(0, block_ids).view(shape)

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy whole blocks src -> dst in every layer (copy-on-write of a shared last block)."""
        if not pairs:
            return
        device = self.k_caches[0].device
        src = torch.tensor([s for s, _ in pairs], dtype=torch.long, device=device)
        dst = torch.tensor([d for _, d in pairs], dtype=torch.long, device=device)
        for cache in self.k_caches + self.v_caches:
            cache.index_copy_(0, dst, cache.index_select(0, src))
