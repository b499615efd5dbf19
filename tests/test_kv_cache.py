"""The paged K/V tensors: slots, write, gather, copy, sizes."""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig

from npukit.engine.kv_cache import KVCache, kv_bytes_per_block, kv_shape, slot_mapping_for


def _cache(num_layers=2, num_blocks=6, block_size=4):
    return KVCache.allocate(num_layers, num_blocks=num_blocks, block_size=block_size, num_kv_heads=2, head_dim=3,
                            dtype=torch.float32, device="cpu")


def test_slot_mapping_follows_the_block_table():
    # positions 0..5 with blocks of 4: block 7 holds 0-3, block 2 holds 4-5
    assert slot_mapping_for([7, 2], 0, 6, 4) == [28, 29, 30, 31, 8, 9]
    assert slot_mapping_for([7, 2], 5, 6, 4) == [9]
    with pytest.raises(ValueError, match="allocate/append_slots before running the model"):
        slot_mapping_for([7], 0, 5, 4)


def gather_slots(cache, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K, V at the given slots ``[n]`` -> ``[n, num_kv_heads, head_dim]`` (what the runner's gathers must equal)."""
    kc, vc = cache.k_caches[layer], cache.v_caches[layer]
    return kc.view(-1, *kc.shape[2:])[slots], vc.view(-1, *vc.shape[2:])[slots]


def test_write_then_gather_roundtrip():
    cache = _cache(num_layers=1)
    assert cache.k_caches[0].shape == (6, 4, 2, 3) and cache.num_blocks == 6 and cache.block_size == 4
    k, v = torch.randn(5, 2, 3), torch.randn(5, 2, 3)
    slots = torch.tensor(slot_mapping_for([5, 0], 0, 5, 4))  # 20, 21, 22, 23, 0
    cache.write(0, k, v, slots)
    kk, vv = gather_slots(cache, 0, slots)
    assert torch.equal(kk, k) and torch.equal(vv, v)
    kb, vb = cache.gather_blocks(0, torch.tensor([5, 0]), 1)  # one sequence, blocks 5 then 0
    assert kb.shape == (1, 8, 2, 3)
    assert torch.equal(kb[0, :5], k) and torch.equal(vb[0, :5], v)
    assert torch.count_nonzero(kb[0, 5:]) == 0  # untouched slots stay zero (masked reads must not be NaN)


def test_gather_blocks_of_several_sequences():
    cache = _cache(num_layers=1)
    for block in range(6):
        cache.k_caches[0][block] = block
    kb, _ = cache.gather_blocks(0, torch.tensor([3, 1, 4, 0]), 2)  # seq 0: blocks 3, 1; seq 1: 4, 0
    assert kb.shape == (2, 8, 2, 3)
    assert kb[0, :4].unique().tolist() == [3.0] and kb[0, 4:].unique().tolist() == [1.0]
    assert kb[1, :4].unique().tolist() == [4.0] and kb[1, 4:].unique().tolist() == [0.0]


def test_copy_blocks_copies_k_and_v_in_every_layer():
    cache = _cache(num_layers=3)
    for t in cache.k_caches + cache.v_caches:
        t.copy_(torch.randn_like(t))
    before = [t.clone() for t in cache.k_caches + cache.v_caches]
    cache.copy_blocks([(1, 4), (2, 5)])
    for old, new in zip(before, cache.k_caches + cache.v_caches):
        assert torch.equal(new[4], old[1]) and torch.equal(new[5], old[2])
        assert torch.equal(new[:4], old[:4])  # sources and others untouched
    cache.copy_blocks([])  # no-op


def test_sizes_from_the_model_config():
    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=3)
    assert kv_shape(cfg) == (3, 2, 16)
    # 2 (K and V) * 3 layers * 16 tokens * 2 heads * 16 dims * 4 bytes
    assert kv_bytes_per_block(cfg, 16, torch.float32) == 2 * 3 * 16 * 2 * 16 * 4
    assert kv_bytes_per_block(cfg, 16, torch.bfloat16) == 2 * 3 * 16 * 2 * 16 * 2
    cache = KVCache.allocate(3, 5, 16, 2, 16, torch.float32, "cpu")
    assert cache.num_bytes == 5 * kv_bytes_per_block(cfg, 16, torch.float32)
