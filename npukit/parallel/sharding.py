"""Which weight is split how under tensor parallelism (Megatron-LM; vLLM's parallel linear layers).

One table, used twice: `npukit.plan` counts the bytes each device holds from it (no weights needed),
and the engine's tensor-parallel workers cut the real HF tensors with it. Weights are ``[out, in]``.

    module            split         what each of the tp ranks keeps
    q_proj            COLUMN        rows (output features) of its heads: num_heads / tp heads
    k_proj, v_proj    KV_COLUMN     its KV heads: num_kv_heads / tp of them when num_kv_heads >= tp,
                                    else one head, replicated on tp / num_kv_heads ranks (vLLM's rule)
    o_proj            ROW           the input columns that match its heads; partial sums -> all-reduce
    gate_proj/up_proj COLUMN        intermediate_size / tp rows
    down_proj         ROW           intermediate_size / tp input columns -> all-reduce
    embed_tokens      VOCAB         ceil(vocab / tp) rows (the last shard zero-padded); lookups outside
                                    the shard give 0 -> all-reduce
    lm_head           VOCAB         the same rows: each rank computes its slice of the logits -> gather
    everything else   REPLICATED    norms, q_norm / k_norm, row-parallel biases (added once, after the sum)

A column-parallel bias is split with its rows. Requirements (vLLM's): num_heads % tp == 0,
intermediate_size % tp == 0, and num_kv_heads % tp == 0 or tp % num_kv_heads == 0.
NOTE: vLLM pads the vocabulary to a multiple of 64 before splitting it; we split ceil(vocab / tp) rows,
so the planned embedding bytes can differ from vLLM's by at most 63 rows per shard.
"""
from __future__ import annotations

COLUMN, ROW, KV_COLUMN, VOCAB, REPLICATED = "column", "row", "kv_column", "vocab", "replicated"

SPLITS = {
    "q_proj": COLUMN, "k_proj": KV_COLUMN, "v_proj": KV_COLUMN, "o_proj": ROW,
    "gate_proj": COLUMN, "up_proj": COLUMN, "down_proj": ROW,
    "embed_tokens": VOCAB, "lm_head": VOCAB,
}


class TensorParallelError(ValueError):
    """This model cannot be split over this many devices; the message says which sizes work."""


def valid_tp_sizes(num_heads: int, num_kv_heads: int, intermediate_size: int, up_to: int = 64) -> list[int]:
    """Every tensor-parallel size <= up_to that this model's shapes allow."""
    return [tp for tp in range(1, up_to + 1) if not _why_not(num_heads, num_kv_heads, intermediate_size, tp)]


def _why_not(num_heads: int, num_kv_heads: int, intermediate_size: int, tp: int) -> str:
    if num_heads % tp:
        return f"num_attention_heads ({num_heads}) is not divisible by {tp}"
    if num_kv_heads % tp and tp % num_kv_heads:
        return (f"num_key_value_heads ({num_kv_heads}) can neither be split over {tp} ranks nor replicated "
                f"evenly ({tp} is not a multiple of {num_kv_heads})")
    if intermediate_size % tp:
        return f"intermediate_size ({intermediate_size}) is not divisible by {tp}"
    return ""


def check_tp(num_heads: int, num_kv_heads: int, intermediate_size: int, tp: int) -> None:
    """Raise TensorParallelError naming the field that does not divide, and the sizes that work."""
    if not isinstance(tp, int) or tp < 1:
        raise TensorParallelError(f"tensor_parallel_size must be a positive int, got {tp!r}")
    why = _why_not(num_heads, num_kv_heads, intermediate_size, tp)
    if why:
        ok = valid_tp_sizes(num_heads, num_kv_heads, intermediate_size, up_to=max(tp, 16))
        raise TensorParallelError(f"tensor_parallel_size={tp} does not work for this model: {why}. "
                                  f"Sizes that work: {', '.join(map(str, ok))}")


def kv_heads_per_rank(num_kv_heads: int, tp: int) -> int:
    return max(1, num_kv_heads // tp)


def kv_head_start(num_kv_heads: int, tp: int, rank: int) -> int:
    """First KV head of this rank (split: a contiguous range; replicated: rank // (tp / num_kv_heads))."""
    if num_kv_heads >= tp:
        return rank * (num_kv_heads // tp)
    return rank // (tp // num_kv_heads)


def vocab_per_rank(vocab_size: int, tp: int) -> int:
    return -(-vocab_size // tp)


def shard_numel(split: str, out_features: int, in_features: int, tp: int, *, head_dim: int = 0,
                num_kv_heads: int = 0) -> int:
    """Elements of one rank's shard of an ``[out, in]`` weight (a bias is ``in_features=1``; a row-parallel
    bias is REPLICATED, not ROW)."""
    if split == COLUMN:
        return out_features // tp * in_features
    if split == ROW:
        return out_features * (in_features // tp)
    if split == KV_COLUMN:
        return kv_heads_per_rank(num_kv_heads, tp) * head_dim * in_features
    if split == VOCAB:
        return vocab_per_rank(out_features, tp) * in_features
    if split == REPLICATED:
        return out_features * in_features
    raise ValueError(f"unknown split {split!r}")


def shard_tensor(t, split: str, *, tp: int, rank: int, head_dim: int, num_kv_heads: int):
    """This rank's slice of a weight ``[out, in]`` (or a bias ``[out]``), as a new contiguous tensor."""
    if split == REPLICATED or tp == 1:
        return t
    if split == COLUMN:
        n = t.shape[0] // tp
        return t.narrow(0, rank * n, n).clone()
    if split == ROW:
        n = t.shape[1] // tp
        return t.narrow(1, rank * n, n).contiguous()
    if split == KV_COLUMN:
        n = kv_heads_per_rank(num_kv_heads, tp) * head_dim
        return t.narrow(0, kv_head_start(num_kv_heads, tp, rank) * head_dim, n).clone()
    if split == VOCAB:
        n = vocab_per_rank(t.shape[0], tp)
        start = min(rank * n, t.shape[0])
        rows = t[start:start + n]
        out = t.new_zeros((n, *t.shape[1:]))  # NOTE: the last shard is zero-padded to n rows
        out[:rows.shape[0]] = rows
        return out
    raise ValueError(f"unknown split {split!r}")
