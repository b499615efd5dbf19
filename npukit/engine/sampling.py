"""The Sampler: turns a step's logits into next tokens (the knobs are `SamplingParams`, in sampling_params.py).

The sampler works on a whole step at once: logits `[num_rows, vocab]` (float32) plus the sequence of
each row. Per-row knobs become small tensors, so the work is a handful of batched tensor ops; only
seeded rows loop (each draws from its own `torch.Generator`, so its samples do not depend on what
else is in the batch).

Order of operations (as in vLLM v1): min_tokens mask -> penalties -> temperature -> min_p ->
top_k / top_p -> sample (greedy rows: argmax). Logprobs are taken from the raw logits (vLLM's
default "raw_logprobs").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING
from typing import Sequence as Seq

import torch

if TYPE_CHECKING:
    from .sequence import Sequence


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[dict[int, float] | None]  # None where the request did not ask for logprobs
    sampled_logprobs: list[float]             # logprob of each sampled token (raw model distribution)
    ok: list[bool]                            # False: the row's logits were not finite (NaN / +inf)

    @classmethod
    def concat(cls, parts: list[SamplerOutput | None]) -> SamplerOutput:
        """One output from one-row outputs; None (a row that could not be sampled) becomes ok=False."""
        parts = [p or cls([0], [None], [0.0], [False]) for p in parts]
        return cls(*([x for p in parts for x in getattr(p, name)]
                     for name in ("token_ids", "logprobs", "sampled_logprobs", "ok")))


class Sampler:
    """Turns a step's logits into one token per row."""

    def __call__(self, logits: torch.Tensor, seqs: Seq["Sequence"],
                 stop_ids: Seq[Seq[int]] | None = None) -> SamplerOutput:
        """logits: float32 [len(seqs), vocab]. stop_ids[i]: token ids that the min_tokens rule masks
        for row i (EOS unless ignore_eos, plus stop_token_ids). Does not modify `seqs` (except for
        creating a seeded sequence's generator on first use)."""
        num_rows, vocab = logits.shape
        assert num_rows == len(seqs), (num_rows, len(seqs))
        params = [s.sampling_params for s in seqs]
        logits = logits.float()

        # One pass gives the greedy tokens and the rows that cannot be sampled: a row's max is NaN if
        # it has a NaN, +inf if it has a +inf, -inf if nothing is finite.
        # NOTE: such rows are reported (ok=False) and zeroed so the rest of the batch goes on.
        row_max, tokens = logits.max(dim=-1)
        bad = ~torch.isfinite(row_max)
        ok = (~bad).tolist()
        if not all(ok):
            logits = logits.masked_fill(bad.unsqueeze(-1), 0.0)

        want_logprobs = [p.logprobs is not None for p in params]
        raw_logprobs = torch.log_softmax(logits, dim=-1) if any(want_logprobs) else None

        all_greedy = all(p.greedy for p in params)
        if any(p.has_penalties or p.min_tokens for p in params):
            logits = logits.clone()
            self._apply_min_tokens(logits, seqs, stop_ids)
            self._apply_penalties(logits, seqs)
            tokens = logits.argmax(dim=-1)
        if not all_greedy:
            tokens = self._sample_random(logits, seqs, tokens)

        token_list = tokens.tolist()
        sampled_lp = [0.0] * num_rows
        out_lp: list[dict[int, float] | None] = [None] * num_rows
        if raw_logprobs is not None:
            chosen = raw_logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1).tolist()
            k_max = max(p.logprobs or 0 for p in params)
            top_v, top_i = raw_logprobs.topk(k_max, dim=-1) if k_max else (None, None)
            for i, p in enumerate(params):
                sampled_lp[i] = chosen[i]
                if p.logprobs is None:
                    continue
                d: dict[int, float] = {}
                if p.logprobs:
                    d = dict(zip(top_i[i, : p.logprobs].tolist(), top_v[i, : p.logprobs].tolist()))
                d[token_list[i]] = chosen[i]
                out_lp[i] = d
        return SamplerOutput(token_list, out_lp, sampled_lp, ok)

    @staticmethod
    def _apply_min_tokens(logits: torch.Tensor, seqs, stop_ids) -> None:
        for i, s in enumerate(seqs):
            p = s.sampling_params
            if p.min_tokens and s.num_output_tokens < p.min_tokens:
                ids = list(stop_ids[i]) if stop_ids is not None else list(p.stop_token_ids)
                if ids:
                    logits[i, ids] = float("-inf")

    @staticmethod
    def _apply_penalties(logits: torch.Tensor, seqs) -> None:
        rows = [i for i, s in enumerate(seqs) if s.sampling_params.has_penalties]
        if not rows:
            return
        vocab = logits.shape[1]
        for i in rows:  # O(tokens of the penalised rows); off the fast path
            s, p = seqs[i], seqs[i].sampling_params
            row = logits[i]
            if p.repetition_penalty != 1.0:
                seen = torch.zeros(vocab, dtype=torch.bool, device=logits.device)
                seen[torch.tensor(s.token_ids, dtype=torch.long, device=logits.device)] = True
                penalised = torch.where(row > 0, row / p.repetition_penalty, row * p.repetition_penalty)
                row.copy_(torch.where(seen, penalised, row))
            if (p.frequency_penalty or p.presence_penalty) and s.num_output_tokens:
                counts = torch.zeros(vocab, dtype=row.dtype, device=logits.device)
                out = torch.tensor(s.output_token_ids, dtype=torch.long, device=logits.device)
                counts.index_add_(0, out, torch.ones(len(out), dtype=row.dtype, device=logits.device))
                row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)

    @staticmethod
    def _sample_random(logits: torch.Tensor, seqs, greedy_tokens: torch.Tensor) -> torch.Tensor:
        params = [s.sampling_params for s in seqs]
        rows = [i for i, p in enumerate(params) if not p.greedy]
        sub = [params[i] for i in rows]
        dev = logits.device
        idx = torch.tensor(rows, dtype=torch.long, device=dev)
        x = logits if len(rows) == len(seqs) else logits.index_select(0, idx)
        x = x / torch.tensor([p.temperature for p in sub], dtype=x.dtype, device=dev).unsqueeze(1)
        if any(p.min_p > 0 for p in sub):
            # p_i >= min_p * p_max  <=>  x_i >= x_max + log(min_p)   (log(0) = -inf: off)
            log_min_p = torch.tensor([p.min_p for p in sub], dtype=x.dtype, device=dev).log().unsqueeze(1)
            x = x.masked_fill(x < x.max(dim=-1, keepdim=True).values + log_min_p, float("-inf"))
        # NOTE: one uniform number per sampled token and row; a seeded row draws it from its own
        # generator, so its samples depend only on its seed and its logits, not on the batch.
        # NOTE: every generator exists before any number is drawn, so a seed that cannot seed one raises
        # before any other row's generator advanced (the engine then retries the rows one by one).
        gens = [(j, _generator(seqs[i], dev)) for j, i in enumerate(rows) if sub[j].seed is not None]
        u = torch.rand(len(rows), device=dev)
        for j, gen in gens:
            u[j] = torch.rand(1, generator=gen, device=dev)[0]
        sampled = torch.empty(len(rows), dtype=torch.long, device=dev)
        trunc = [j for j, p in enumerate(sub) if p.top_k > 0 or p.top_p < 1.0]
        plain = [j for j, p in enumerate(sub) if not (p.top_k > 0 or p.top_p < 1.0)]
        if len(plain) == len(rows):
            sampled = _inverse_cdf(torch.softmax(x, dim=-1), u)
        elif plain:
            sampled[plain] = _inverse_cdf(torch.softmax(x[plain], dim=-1), u[plain])
        if trunc:
            sampled[trunc] = _sample_top_k_top_p(x[trunc], [sub[j].top_k for j in trunc],
                                                 [sub[j].top_p for j in trunc], u[trunc])
        out = greedy_tokens.clone()
        out[idx] = sampled
        return out


def _generator(seq: "Sequence", device: torch.device) -> torch.Generator:
    # NOTE: one generator per sequence, created on its first sample and advanced by exactly one
    # number per sampled token.
    if seq.generator is None:
        gen = torch.Generator(device=device)
        gen.manual_seed(seq.sampling_params.seed_for(seq.index))  # may raise: then seq keeps no generator
        seq.generator = gen
    return seq.generator


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Sample one index per row of (unnormalised) probs with the uniform numbers u in [0, 1).
    (Cheaper than torch.multinomial or an exponential race on CPU: one cumsum and a binary search.)"""
    cdf = probs.cumsum(dim=-1)
    total = cdf[:, -1:]
    target = torch.minimum(u.unsqueeze(1) * total, total * (1 - 1e-6))
    # NOTE: the first index whose cdf exceeds target has probability > 0 (the cdf grows there), and
    # one exists because target < total.
    return torch.searchsorted(cdf, target, right=True).squeeze(1)


def _sample_top_k_top_p(x: torch.Tensor, top_k: list[int], top_p: list[float], u: torch.Tensor,
                        first_guess: int = 256) -> torch.Tensor:
    """Sample rows of logits x under top_k (0 = off) then top_p (1.0 = off), without sorting the
    whole vocabulary: take the top K candidates of each row; the rows whose top_p mass is not reached
    within them (flat distributions) go round again with K x 4 (K = vocab is the plain full sort)."""
    num_rows, vocab = x.shape
    dev = x.device
    k_all = torch.tensor([t if t > 0 else vocab for t in top_k], device=dev).unsqueeze(1)
    p_all = torch.tensor(top_p, dtype=x.dtype, device=dev).unsqueeze(1)
    # without top_k, top_p's probabilities are normalised over the whole row
    if all(t > 0 for t in top_k):
        lse_all = torch.zeros(num_rows, 1, dtype=x.dtype, device=dev)  # not used
    else:
        lse_all = torch.logsumexp(x, dim=-1, keepdim=True)
    out = torch.empty(num_rows, dtype=torch.long, device=dev)
    todo = torch.arange(num_rows, device=dev)
    K = min(vocab, max(t if t > 0 else first_guess for t in top_k))
    while True:
        if len(todo) == num_rows:  # first round: no copies
            xs, k, p, lse, us = x, k_all, p_all, lse_all, u
        else:
            xs, k, p, lse, us = (t.index_select(0, todo) for t in (x, k_all, p_all, lse_all, u))
        no_top_k = k >= vocab
        vals, ids = xs.topk(K, dim=-1)  # sorted, largest first
        vals = vals.masked_fill(torch.arange(K, device=dev).unsqueeze(0) >= k, float("-inf"))
        norm = torch.where(no_top_k, lse, torch.logsumexp(vals, dim=-1, keepdim=True))
        probs = (vals - norm).exp()
        # NOTE: keep a token while the mass *before* it is < top_p, so the top token always survives.
        keep = ((probs.cumsum(dim=-1) - probs) < p) & (vals > float("-inf"))
        # a row whose K-th candidate is still kept may keep tokens beyond it: look further
        more = (keep[:, -1:] & no_top_k).squeeze(1) if K < vocab else torch.zeros_like(keep[:, 0])
        done = ~more
        j = _inverse_cdf((probs * keep)[done], us[done])
        out[todo[done]] = ids[done].gather(1, j.unsqueeze(1)).squeeze(1)
        if not bool(more.any()):
            return out
        todo, K = todo[more], min(vocab, K * 4)
