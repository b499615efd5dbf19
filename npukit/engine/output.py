"""From sampled tokens to what the user sees (vLLM v1's detokenizer + output_processor, in one module).

The engine core (scheduler, runner, sampler) deals in token ids only. After a step's tokens are
committed, `OutputProcessor.process` takes each `(sequence, token)` and
1. appends the token (with its logprobs) and stamps the request's metrics,
2. detokenizes incrementally (`detokenize_incrementally`: only the new characters),
3. checks the stop conditions (`check_stop`: EOS, stop token ids, stop strings, max_tokens, max_seq_len),
and `make_output` builds the request's `RequestOutput` (one `CompletionOutput` per sample).

A request's state (`RequestState`) keeps its latest `RequestOutput`, so any thread that waits for a
request sees its outputs, whichever thread ran the step that produced them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..metrics import RequestMetrics
from .sampling_params import SamplingParams

if TYPE_CHECKING:
    from .sequence import Sequence


@dataclass
class CompletionOutput:
    """One sample of a request (vLLM's CompletionOutput)."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[dict[int, float]] | None = None  # per output token: {token_id: logprob}, top-k + sampled
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error" | None (still running)
    stop_reason: int | str | None = None  # the stop token id / stop string that ended it (None for EOS)

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """A request's state after a step, or its final result (vLLM's RequestOutput)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache


@dataclass(eq=False)
class RequestState:
    """What the engine keeps per request beyond its sequences (vLLM v1's RequestState)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    metrics: RequestMetrics  # the request's timestamps (the only copy: sequences keep none)
    stop_ids: tuple[int, ...]  # what min_tokens masks: EOS (unless ignore_eos) + stop_token_ids
    stop_hold: int             # chars held back from unfinished text (a stop string may be forming)
    finished: bool = False
    output: RequestOutput | None = None  # the latest output (updated by every step that touched it)

    @property
    def all_samples_finished(self) -> bool:
        return len(self.seqs) == self.params.n and all(s.is_finished for s in self.seqs)


def detokenize_incrementally(tokenizer, seq: Sequence, skip_special_tokens: bool) -> str:
    """Append the new token's text to seq.output_text and return it (as vLLM): decode a small window
    around the new token and keep only complete characters; a token that ends mid-character waits."""
    ids, decode = seq.token_ids, tokenizer.decode
    prefix = decode(ids[seq.prefix_offset:seq.read_offset], skip_special_tokens=skip_special_tokens)
    full = decode(ids[seq.prefix_offset:], skip_special_tokens=skip_special_tokens)
    if len(full) > len(prefix) and not full.endswith("\ufffd"):
        delta = full[len(prefix):]
        seq.output_text += delta
        seq.prefix_offset, seq.read_offset = seq.read_offset, len(ids)
        return delta
    return ""


def check_stop(seq: Sequence, params: SamplingParams, new_text: str, eos_token_ids: tuple[int, ...],
               max_seq_len: int) -> str | None:
    """The finish reason after seq's last token ("stop" / "length"), or None; sets seq.stop_reason and
    trims a stop string off seq.output_text."""
    p, token = params, seq.token_ids[-1]
    if seq.num_output_tokens >= p.min_tokens:
        if not p.ignore_eos and token in eos_token_ids:
            return "stop"
        if token in p.stop_token_ids:
            seq.stop_reason = token
            return "stop"
        if p.stop_list and new_text:
            text = seq.output_text
            for stop in p.stop_list:
                # NOTE: the stop string can only end inside the new text: search just that window.
                idx = text.find(stop, max(0, len(text) - len(new_text) - len(stop) + 1))
                if idx != -1:
                    seq.output_text = text[: idx + len(stop)] if p.include_stop_str_in_output else text[:idx]
                    seq.stop_reason = stop
                    return "stop"
    if p.max_tokens is not None and seq.num_output_tokens >= p.max_tokens:
        return "length"
    if len(seq.token_ids) >= max_seq_len:
        return "length"
    return None


@dataclass
class SampledToken:
    """One committed sample of a step: the sequence, its new token and the token's logprobs."""

    seq: Sequence
    token_id: int
    logprobs: dict[int, float] | None
    sampled_logprob: float


class OutputProcessor:
    """Detokenizes, checks stops and builds RequestOutputs; knows the tokenizer, nothing of the KV cache."""

    def __init__(self, tokenizer, eos_token_ids: tuple[int, ...], max_seq_len: int) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.max_seq_len = max_seq_len

    def new_request(self, request_id: str, prompt: str | None, ids: list[int], params: SamplingParams,
                    seq: Sequence, arrival_time: float) -> RequestState:
        seq.prefix_offset, seq.read_offset = max(0, len(ids) - 5), len(ids)
        stop_ids = tuple(params.stop_token_ids) + (() if params.ignore_eos else self.eos_token_ids)
        hold = 0 if params.include_stop_str_in_output else max((len(s) for s in params.stop_list), default=1) - 1
        return RequestState(request_id, prompt, list(ids), params, [seq],
                            RequestMetrics(arrival_time=arrival_time, num_prompt_tokens=len(ids)), stop_ids, hold)

    def process(self, state: RequestState, sample: SampledToken, now: float) -> str | None:
        """Append one sampled token to its sequence; returns the finish reason it causes, if any."""
        seq = sample.seq
        seq.append_token(sample.token_id, sample.logprobs)
        seq.cumulative_logprob += sample.sampled_logprob
        state.metrics.record_token(now)
        new_text = detokenize_incrementally(self.tokenizer, seq, state.params.skip_special_tokens)
        return check_stop(seq, state.params, new_text, self.eos_token_ids, self.max_seq_len)

    @staticmethod
    def make_output(state: RequestState) -> RequestOutput:
        """The request's RequestOutput now; also kept as state.output."""
        outs = []
        want_lp = state.params.logprobs is not None
        for seq in sorted(state.seqs, key=lambda s: s.index):
            text = seq.output_text
            if state.stop_hold and not seq.is_finished:  # do not show what may become a stop string
                text = text[: max(0, len(text) - state.stop_hold)]
            outs.append(CompletionOutput(
                index=seq.index, text=text, token_ids=seq.output_token_ids,
                cumulative_logprob=seq.cumulative_logprob if want_lp else None,
                logprobs=list(seq.output_logprobs) if want_lp else None,
                finish_reason=seq.finish_reason, stop_reason=seq.stop_reason))
        state.output = RequestOutput(state.request_id, state.prompt, state.prompt_token_ids, outs, state.finished,
                                     state.metrics, num_cached_tokens=state.seqs[0].num_cached_tokens)
        return state.output
