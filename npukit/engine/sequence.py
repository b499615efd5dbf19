"""A request's state as the engine sees it: token ids, how many are computed, its block table."""
from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from .sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"      # not yet scheduled, or preempted (blocks freed, recompute later)
    RUNNING = "running"      # holds blocks; gets tokens computed every step it is scheduled
    FINISHED = "finished"    # done: stopped, length, aborted or rejected


_seq_counter = itertools.count()


@dataclass(eq=False)
class Sequence:
    """One sequence (a request with n > 1 has n of them, sharing the prompt's blocks).

    NOTE: invariants kept by the scheduler and block manager:
    - token_ids[:num_computed_tokens] have their K/V written in the cache at the slots given by
      block_table; position p lives in block block_table[p // block_size] at offset p % block_size.
    - num_computed_tokens <= len(token_ids); a sequence needs a sample once
      num_computed_tokens == len(token_ids) after a step.
    - len(block_table) * block_size >= num_computed_tokens while RUNNING; block_table == [] while WAITING.
    """

    request_id: str
    token_ids: list[int]
    sampling_params: "SamplingParams"
    num_prompt_tokens: int = 0
    seq_id: int = field(default_factory=lambda: next(_seq_counter))
    index: int = 0  # which of the request's n samples this is
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at the last allocation
    block_table: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    output_logprobs: list[dict[int, float]] = field(default_factory=list)
    num_preemptions: int = 0
    cumulative_logprob: float = 0.0
    # chain hashes of the full blocks of token_ids (see BlockManager); extended as blocks fill
    block_hashes: list[int] = field(default_factory=list, repr=False)
    # per-sequence random generator of a seeded request (created by the sampler on first use)
    generator: "torch.Generator | None" = field(default=None, repr=False)
    # incremental detokenization state (see output.detokenize_incrementally)
    output_text: str = ""
    prefix_offset: int = 0
    read_offset: int = 0
    # NOTE: no timestamps here: a request's times live in its RequestMetrics (output.RequestState.metrics).

    def __post_init__(self) -> None:
        if not self.num_prompt_tokens:
            self.num_prompt_tokens = len(self.token_ids)

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def num_blocks_needed(self, block_size: int, num_tokens: int | None = None) -> int:
        """Blocks needed to hold the first `num_tokens` tokens (default: all)."""
        n = len(self.token_ids) if num_tokens is None else num_tokens
        return (n + block_size - 1) // block_size

    def append_token(self, token_id: int, logprobs: dict[int, float] | None = None) -> None:
        self.token_ids.append(token_id)
        if logprobs is not None:
            self.output_logprobs.append(logprobs)
