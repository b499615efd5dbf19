"""SamplingParams: how to sample one request, with vLLM's names, defaults and checks.

Validation happens here, once, when the params are built: a value that passes can never make a step fail.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

SAMPLING_EPS = 1e-5  # temperature below this is greedy (vLLM's _SAMPLING_EPS)
MAX_LOGPROBS = 20    # vLLM's default --max-logprobs
MAX_STOP_STRINGS = 64       # bounds on client-given lists (each step scans them)
MAX_STOP_TOKEN_IDS = 1024
MAX_STOP_STRING_CHARS = 1024
MIN_REPETITION_PENALTY = 1e-4
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed accepts


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass
class SamplingParams:
    """How to sample one request; the names and defaults follow `vllm.SamplingParams`."""

    n: int = 1
    temperature: float = 1.0          # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0                    # 0 or -1 = off
    min_p: float = 0.0
    repetition_penalty: float = 1.0   # over prompt + output; > 1 discourages repeats
    presence_penalty: float = 0.0     # over output only, in [-2, 2]
    frequency_penalty: float = 0.0    # over output only, in [-2, 2]
    seed: int | None = None
    max_tokens: int | None = 16       # None: up to max_model_len
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None       # top-k logprobs of every sampled token (+ the sampled one)
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    stop_list: list[str] = field(init=False, repr=False, default_factory=list)

    def __post_init__(self) -> None:
        self._check_sampling()
        self._check_lengths()
        self._check_stops()
        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
            _need(isinstance(getattr(self, name), bool), f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.top_k == -1:
            self.top_k = 0
        # NOTE: numbers go into float32 / int64 tensors in the sampler: a JSON int too big for a float, or a
        # top_k beyond int64, would raise there (inside a step), so convert and bound them here.
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if _is_num(v) and not isinstance(v, float):
                try:
                    setattr(self, name, float(v))
                except OverflowError:
                    raise ValueError(f"{name} is out of range, got {v!r}") from None

    def _check_sampling(self) -> None:
        _need(_is_int(self.n) and self.n >= 1, f"n must be an int >= 1, got {self.n!r}")
        _need(_is_num(self.temperature), f"temperature must be a number, got {self.temperature!r}")
        _need(self.temperature >= 0, f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        _need(self.temperature < float("inf"), f"temperature must be finite, got {self.temperature!r}")
        _need(_is_num(self.top_p) and 0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p!r}")
        _need(_is_int(self.top_k) and (self.top_k >= 0 or self.top_k == -1) and self.top_k < 2**31,
              f"top_k must be -1 or 0 (off) or an int >= 1, got {self.top_k!r}")
        _need(_is_num(self.min_p) and 0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p!r}")
        # NOTE: bounded so that logits / penalty / temperature stays finite in float32 (an inf row samples NaN)
        _need(_is_num(self.repetition_penalty)
              and MIN_REPETITION_PENALTY <= self.repetition_penalty <= 1 / MIN_REPETITION_PENALTY,
              f"repetition_penalty must be in [{MIN_REPETITION_PENALTY}, {1 / MIN_REPETITION_PENALTY:g}] (1 = off), "
              f"got {self.repetition_penalty!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            _need(_is_num(v) and -2 <= v <= 2, f"{name} must be in [-2, 2] (0 = off), got {v!r}")
        _need(self.seed is None or (_is_int(self.seed) and SEED_MIN <= self.seed <= SEED_MAX),
              f"seed must be None or an int in [-2**63, 2**64 - 1], got {self.seed!r}")
        _need(self.logprobs is None or (_is_int(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS),
              f"logprobs must be None or an int in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")

    def _check_lengths(self) -> None:
        _need(self.max_tokens is None or (_is_int(self.max_tokens) and self.max_tokens >= 1),
              f"max_tokens must be None or an int >= 1, got {self.max_tokens!r}")
        _need(_is_int(self.min_tokens) and self.min_tokens >= 0,
              f"min_tokens must be an int >= 0, got {self.min_tokens!r}")
        _need(self.max_tokens is None or self.min_tokens <= self.max_tokens,
              f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})")

    def _check_stops(self) -> None:
        if self.stop is None:
            self.stop_list = []
        elif isinstance(self.stop, str):
            self.stop_list = [self.stop]
        elif isinstance(self.stop, (list, tuple)):
            self.stop_list = list(self.stop)
        else:
            raise ValueError(f"stop must be a non-empty string or a list of non-empty strings, got {self.stop!r}")
        _need(all(isinstance(s, str) and s for s in self.stop_list),
              f"stop must be a non-empty string or a list of non-empty strings, got {self.stop!r}")
        _need(len(self.stop_list) <= MAX_STOP_STRINGS and all(len(s) <= MAX_STOP_STRING_CHARS for s in self.stop_list),
              f"stop: at most {MAX_STOP_STRINGS} strings of at most {MAX_STOP_STRING_CHARS} characters")
        _need(self.stop_token_ids is None or isinstance(self.stop_token_ids, (list, tuple)),
              f"stop_token_ids must be a list of non-negative ints, got {self.stop_token_ids!r}")
        ids = [] if self.stop_token_ids is None else list(self.stop_token_ids)
        _need(len(ids) <= MAX_STOP_TOKEN_IDS, f"stop_token_ids: at most {MAX_STOP_TOKEN_IDS} ids, got {len(ids)}")
        _need(all(_is_int(t) and t >= 0 for t in ids),
              f"stop_token_ids must be a list of non-negative ints, got {self.stop_token_ids!r}")
        self.stop_token_ids = ids

    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def seed_for(self, index: int) -> int | None:
        """The seed of the request's index-th sample (sample 0 uses `seed` itself)."""
        if self.seed is None or index == 0:
            return self.seed
        digest = hashlib.blake2b(f"{self.seed}:{index}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


