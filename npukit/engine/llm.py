"""LLM: the user-facing engine, shaped like `vllm.LLM` (offline) plus the `add_request / step / abort`
loop that `vllm.LLMEngine` offers to servers.

One step = scheduler.schedule() -> runner.execute_model() -> sampler -> append tokens, detokenize,
check stop conditions -> free the blocks of finished sequences. Everything a step touches is O(number
of scheduled sequences).

    llm = LLM("smollm2-135m-instruct")
    outs = llm.generate(["Hello", "Paris is"], SamplingParams(temperature=0, max_tokens=32))
    print(outs[0].outputs[0].text, outs[0].metrics.ttft, llm.stats())
"""
from __future__ import annotations

import itertools
import math
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from ..metrics import RequestMetrics
from .block_manager import BlockManager
from ..samples import DEFAULT_MODEL
from .config import EngineConfig, engine_fields
from .sampling import Sampler
from .sampling_params import SamplingParams
from .scheduler import Scheduler
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


@dataclass
class EngineStats:
    num_blocks_total: int
    num_blocks_used: int
    num_blocks_free: int          # includes cached blocks that nobody uses (reusable until evicted)
    num_blocks_cached: int        # blocks registered in the prefix cache
    block_size: int
    kv_cache_usage: float         # used / total blocks (vLLM's kv_cache_usage_perc)
    kv_utilization: float         # tokens stored / slots of the used blocks (internal fragmentation)
    prefix_cache_hit_rate: float  # prompt tokens found cached / prompt tokens looked up
    num_running: int
    num_waiting: int
    num_preemptions: int
    num_steps: int
    num_prompt_tokens: int        # prompt tokens of admitted requests
    num_generated_tokens: int


@dataclass(eq=False)
class _Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    metrics: RequestMetrics
    stop_ids: tuple[int, ...]  # what min_tokens masks: EOS (unless ignore_eos) + stop_token_ids
    stop_hold: int             # chars held back from unfinished text (a stop string may be forming)
    finished: bool = False


class LLM:
    def __init__(self, model: Any = DEFAULT_MODEL, tokenizer=None, *, device="auto", dtype="auto",
                 **engine_args: Any) -> None:
        """`model`: an embedded name, a folder or hub id (loaded with npukit.load_model), or a loaded HF model
        (then pass its tokenizer). `engine_args`: EngineConfig's fields (block_size, max_num_seqs, ...)."""
        from .runner import ModelRunner

        self.config, unknown = EngineConfig.from_kwargs(**engine_args)
        if unknown:
            known = ", ".join(f.name for f in engine_fields())
            raise TypeError(f"LLM() got unknown engine settings {sorted(unknown)}; the settings are EngineConfig's "
                            f"fields: {known}")
        if isinstance(model, str) or hasattr(model, "__fspath__"):
            from ..loading import load_model

            model, loaded_tokenizer = load_model(model, device=device, dtype=dtype,
                                                 quantization=self.config.quantization)
            tokenizer = tokenizer or loaded_tokenizer
        elif tokenizer is None:
            raise ValueError("LLM(model=<a loaded model>) also needs its tokenizer: LLM(model, tokenizer) "
                             "(or pass a name / path and npukit.load_model loads both)")
        elif self.config.quantization and getattr(model, "quantization", None) != self.config.quantization:
            from ..quant import quantize_model  # NOTE: a loaded model is quantised in place (its Linears swapped)

            quantize_model(model, self.config.quantization, tokenizer=tokenizer)
        self.config.quantization = getattr(model, "quantization", None)  # e.g. a model quantised beforehand
        self.model, self.tokenizer = model, tokenizer
        cfg = self.config
        if cfg.max_model_len is None:
            cfg.max_model_len = int(getattr(model.config, "max_position_embeddings", 0) or 4096)
            if not cfg.enable_chunked_prefill:  # a (re)computed sequence must fit in one step
                cfg.max_model_len = min(cfg.max_model_len, cfg.max_num_batched_tokens)
        if cfg.num_kv_blocks is None:
            cfg.num_kv_blocks = self._auto_num_blocks()
        self.runner = ModelRunner(model, cfg.block_size, cfg.num_kv_blocks)
        self.block_manager = BlockManager(cfg.num_kv_blocks, cfg.block_size, cfg.enable_prefix_caching)
        self.scheduler = Scheduler(cfg, self.block_manager)
        self.sampler = Sampler()
        # NOTE: no sequence grows past max_seq_len, so one sequence alone always fits the KV cache
        # (the scheduler can always make progress by preempting the others).
        self.max_seq_len = min(cfg.max_model_len, cfg.num_kv_blocks * cfg.block_size)
        self.vocab_size = model.get_input_embeddings().weight.shape[0]
        self.eos_token_ids = self._eos_token_ids()
        self.requests: dict[str, _Request] = {}  # unfinished requests
        self._ids = itertools.count()
        self._lock = threading.RLock()  # add_request / abort may come from another thread than step
        self.num_steps = self.num_prompt_tokens = self.num_generated_tokens = 0

    # ------------------------------------------------------------------ setup helpers
    def _auto_num_blocks(self) -> int:
        from .. import device as device_mod
        from .kv_cache import kv_bytes_per_block

        cfg = self.config
        param = next(self.model.parameters())
        per_block = kv_bytes_per_block(self.model.config, cfg.block_size, param.dtype)
        free = device_mod.memory_stats(param.device).free
        budget = int(free * cfg.kv_cache_memory_fraction)
        if param.device.type == "cpu":
            # NOTE: like vLLM's VLLM_CPU_KVCACHE_SPACE, cap the CPU cache (default 4 GiB): the KV tensors are
            # zero-filled, so an uncapped fraction of a big machine's RAM costs seconds and gigabytes.
            budget = min(budget, int(float(os.environ.get("NPUKIT_CPU_KVCACHE_SPACE", "4")) * 2**30))
        num = budget // per_block
        # no point in more blocks than max_num_seqs sequences of max_model_len tokens
        num = min(num, cfg.max_num_seqs * math.ceil(cfg.max_model_len / cfg.block_size))
        if num < 1:
            raise RuntimeError(
                f"no memory left for the KV cache: {free / 2**20:.0f} MiB free on {param.device}, "
                f"{cfg.kv_cache_memory_fraction:.0%} of it is less than one block ({per_block} bytes); "
                "raise kv_cache_memory_fraction or pass num_kv_blocks=")
        return num

    def _eos_token_ids(self) -> tuple[int, ...]:
        # NOTE: HF generate stops at generation_config.eos_token_id; use the same ids so greedy matches.
        gen = getattr(self.model, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None) if gen is not None else None
        if eos is None:
            eos = getattr(self.tokenizer, "eos_token_id", None)
        if eos is None:
            return ()
        return tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)

    # ------------------------------------------------------------------ requests
    def _prepare(self, prompt, params) -> tuple[str | None, list[int], SamplingParams]:
        """Validate one request without touching the engine state."""
        cfg = self.config
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling_params must be a SamplingParams, got {type(params).__name__}")
        if isinstance(prompt, dict):  # vLLM's {"prompt": ...} / {"prompt_token_ids": [...]}
            prompt = prompt.get("prompt_token_ids", prompt.get("prompt"))
        if isinstance(prompt, str):
            text, ids = prompt, list(self.tokenizer(prompt).input_ids)
        elif isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            text, ids = None, list(prompt)
        elif isinstance(prompt, torch.Tensor) and prompt.dim() == 1:
            text, ids = None, prompt.tolist()
        else:
            raise TypeError(f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        if not ids:
            raise ValueError("the prompt is empty (no tokens): give at least one token")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids must be in [0, {self.vocab_size}) for this model, got {bad[:5]}")
        if len(ids) > cfg.max_model_len:
            raise ValueError(f"the prompt has {len(ids)} tokens, more than max_model_len={cfg.max_model_len}; "
                             "shorten it or raise max_model_len")
        capacity = cfg.num_kv_blocks * cfg.block_size
        if len(ids) > capacity:
            raise ValueError(f"the prompt has {len(ids)} tokens but the whole KV cache holds {capacity} "
                             f"({cfg.num_kv_blocks} blocks of {cfg.block_size}); raise num_kv_blocks / "
                             "kv_cache_memory_fraction or shorten the prompt")
        if not cfg.enable_chunked_prefill and len(ids) > cfg.max_num_batched_tokens:
            raise ValueError(f"the prompt has {len(ids)} tokens, more than max_num_batched_tokens="
                             f"{cfg.max_num_batched_tokens}, and chunked prefill is off; enable_chunked_prefill=True")
        if params.n > cfg.max_num_seqs:
            raise ValueError(f"n={params.n} samples cannot run together with max_num_seqs={cfg.max_num_seqs}")
        return text, ids, params

    def add_request(self, prompt: str | list[int], sampling_params: SamplingParams | None = None,
                    request_id: str | None = None, arrival_time: float | None = None) -> str:
        """Queue a request; returns its id. Bad input raises ValueError / TypeError and changes nothing."""
        # NOTE: under the lock: a fast tokenizer must not encode here while step() decodes ("Already borrowed").
        with self._lock:
            text, ids, params = self._prepare(prompt, sampling_params)
            return self._add(text, ids, params, request_id, arrival_time)

    def _add(self, text, ids, params, request_id=None, arrival_time=None) -> str:
        request_id = str(next(self._ids)) if request_id is None else str(request_id)
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already running; use a unique id")
        now = time.perf_counter() if arrival_time is None else arrival_time
        seq = Sequence(request_id, list(ids), params, arrival_time=now)
        seq.prefix_offset, seq.read_offset = max(0, len(ids) - 5), len(ids)
        stop_ids = tuple(params.stop_token_ids) + (() if params.ignore_eos else self.eos_token_ids)
        hold = 0 if params.include_stop_str_in_output else max((len(s) for s in params.stop_list), default=1) - 1
        req = _Request(request_id, text, list(ids), params, [seq],
                       RequestMetrics(arrival_time=now, num_prompt_tokens=len(ids)), stop_ids, hold)
        self.requests[request_id] = req
        self.scheduler.add(seq)
        self.num_prompt_tokens += len(ids)
        return request_id

    def abort(self, request_id: str) -> bool:
        """Stop a request now and free all its blocks; False if it is unknown or already finished."""
        with self._lock:
            req = self.requests.pop(str(request_id), None)
            if req is None:
                return False
            self.scheduler.finish(req.seqs, "abort")
            req.finished = True
            req.metrics.finish()
            return True

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def get_num_unfinished_requests(self) -> int:
        return len(self.requests)

    # ------------------------------------------------------------------ the step
    def step(self) -> list[RequestOutput]:
        """Run one engine step; returns the outputs of the requests that got tokens or finished."""
        with self._lock:
            return self._step()

    @torch.inference_mode()
    def _step(self) -> list[RequestOutput]:
        out = self.scheduler.schedule()
        if out.is_empty:
            # NOTE: cannot happen while sequence lengths are capped at max_seq_len (one sequence alone
            # always fits); fail loudly rather than spin if that promise is ever broken.
            if self.scheduler.waiting and not self.scheduler.running:
                head = self.scheduler.waiting[0]
                raise RuntimeError(f"engine stalled: request {head.request_id!r} ({len(head.token_ids)} tokens) "
                                   f"cannot be scheduled with an empty batch; please report this")
            return []
        if out.blocks_to_copy:
            self.runner.copy_blocks(out.blocks_to_copy)
        logits = self.runner.execute_model(out.scheduled)
        self.scheduler.update(out)
        self.num_steps += 1

        rows: list[int] = []
        seqs: list[Sequence] = []
        for row, (seq, _) in enumerate(out.scheduled):
            if seq.num_computed_tokens < len(seq.token_ids):
                continue  # a prefill chunk: no token to sample yet
            rows.append(row)
            seqs.append(seq)
            p = seq.sampling_params
            if p.n > 1 and seq.index == 0 and seq.num_output_tokens == 0:
                # NOTE: the n samples share the prompt's blocks (fork); a shared block is copied only
                # when one of them writes into it (copy-on-write in BlockManager.append_slots).
                req = self.requests[seq.request_id]
                for i in range(1, p.n):
                    child = Sequence(seq.request_id, list(seq.token_ids), p, index=i, arrival_time=seq.arrival_time,
                                     num_prompt_tokens=seq.num_prompt_tokens,
                                     prefix_offset=seq.prefix_offset, read_offset=seq.read_offset)
                    self.scheduler.fork(seq, child)
                    req.seqs.append(child)
                    rows.append(row)
                    seqs.append(child)
        if not seqs:
            return []
        sample_logits = logits if rows == list(range(len(out.scheduled))) else logits[rows]
        stop_ids = [self.requests[s.request_id].stop_ids for s in seqs]
        result = self.sampler(sample_logits, seqs, stop_ids)

        now = time.perf_counter()
        touched: dict[str, _Request] = {}
        done: dict[str, list[Sequence]] = {}  # finish reason -> sequences (freed together below)
        for i, seq in enumerate(seqs):
            req = self.requests[seq.request_id]
            touched[req.request_id] = req
            if not result.ok[i]:  # NaN / inf logits: this sequence ends, the others go on
                done.setdefault("error", []).append(seq)
                continue
            seq.append_token(result.token_ids[i], now, result.logprobs[i])
            seq.cumulative_logprob += result.sampled_logprobs[i]
            req.metrics.record_token(now)
            self.num_generated_tokens += 1
            reason = self._check_stop(seq, req)
            if reason is not None:
                done.setdefault(reason, []).append(seq)
        for reason, finished in done.items():
            self.scheduler.finish(finished, reason)
        outputs = []
        for req in touched.values():
            if all(s.is_finished for s in req.seqs) and len(req.seqs) == req.params.n:
                req.finished = True
                req.metrics.finish(now)
                del self.requests[req.request_id]
            outputs.append(self._output(req))
        return outputs

    def _check_stop(self, seq: Sequence, req: _Request) -> str | None:
        """Detokenize the new token and decide whether seq stops (sets seq.stop_reason)."""
        p, token = req.params, seq.token_ids[-1]
        new_text = self._detokenize(seq, p.skip_special_tokens)
        if seq.num_output_tokens >= p.min_tokens:
            if not p.ignore_eos and token in self.eos_token_ids:
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
        if len(seq.token_ids) >= self.max_seq_len:
            return "length"
        return None

    def _detokenize(self, seq: Sequence, skip_special_tokens: bool) -> str:
        """Incremental detokenization (as vLLM): decode a small window around the new token and keep
        only complete characters; a token that ends mid-character waits for the next one."""
        ids, decode = seq.token_ids, self.tokenizer.decode
        prefix = decode(ids[seq.prefix_offset:seq.read_offset], skip_special_tokens=skip_special_tokens)
        full = decode(ids[seq.prefix_offset:], skip_special_tokens=skip_special_tokens)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            delta = full[len(prefix):]
            seq.output_text += delta
            seq.prefix_offset, seq.read_offset = seq.read_offset, len(ids)
            return delta
        return ""

    def _output(self, req: _Request) -> RequestOutput:
        outs = []
        for seq in sorted(req.seqs, key=lambda s: s.index):
            text = seq.output_text
            if req.stop_hold and not seq.is_finished:  # do not show what may become a stop string
                text = text[: max(0, len(text) - req.stop_hold)]
            want_lp = req.params.logprobs is not None
            outs.append(CompletionOutput(
                index=seq.index, text=text, token_ids=seq.output_token_ids,
                cumulative_logprob=seq.cumulative_logprob if want_lp else None,
                logprobs=list(seq.output_logprobs) if want_lp else None,
                finish_reason=seq.finish_reason, stop_reason=seq.stop_reason))
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, outs, req.finished, req.metrics,
                             num_cached_tokens=req.seqs[0].num_cached_tokens)

    # ------------------------------------------------------------------ offline API
    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate for one prompt or a list (strings or token-id lists); outputs in input order.

        Every prompt is checked before any is queued. Requests added earlier with add_request run
        along, but their outputs are not returned here (a server should use add_request / step)."""
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, (list, tuple)) and prompts
                                                 and all(isinstance(t, int) for t in prompts)):
            prompts = [prompts]
        prompts = list(prompts)
        if isinstance(sampling_params, (list, tuple)):
            if len(sampling_params) != len(prompts):
                raise ValueError(f"got {len(sampling_params)} sampling_params for {len(prompts)} prompts; "
                                 "give one SamplingParams or one per prompt")
            params = list(sampling_params)
        else:
            params = [sampling_params] * len(prompts)
        with self._lock:  # all checked before any is queued
            prepared = [self._prepare(p, sp) for p, sp in zip(prompts, params)]
        return self._run(prepared, use_tqdm)

    def chat(self, messages, sampling_params: SamplingParams | list[SamplingParams] | None = None,
             use_tqdm: bool = True, **template_kwargs) -> list[RequestOutput]:
        """Generate replies to one conversation ([{"role", "content"}, ...]) or a list of them."""
        from ..chat import apply_chat_template, render_chat_template

        single = isinstance(messages, (list, tuple)) and (not messages or isinstance(messages[0], dict))
        conversations = [messages] if single else list(messages)
        params = sampling_params if isinstance(sampling_params, (list, tuple)) else [sampling_params] * len(conversations)
        if len(params) != len(conversations):
            raise ValueError(f"got {len(params)} sampling_params for {len(conversations)} conversations")
        prepared = []
        with self._lock:  # the tokenizer is shared with step()
            for c, sp in zip(conversations, params):
                ids = apply_chat_template(self.tokenizer, c, **template_kwargs)
                _, ids, sp = self._prepare(ids, sp)
                prepared.append((render_chat_template(self.tokenizer, c, **template_kwargs), ids, sp))
        return self._run(prepared, use_tqdm)

    def _run(self, prepared, use_tqdm: bool) -> list[RequestOutput]:
        with self._lock:
            ids = [self._add(text, ids, params) for text, ids, params in prepared]
            reqs = [self.requests[rid] for rid in ids]
        final: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(ids), desc="Processed prompts", dynamic_ncols=True)
        try:
            pending = set(ids)
            while pending:
                progressed = self.step()
                for o in progressed:
                    if o.finished and o.request_id in pending:
                        final[o.request_id] = o
                        pending.discard(o.request_id)
                        if bar is not None:
                            bar.update(1)
                if not progressed and not self.scheduler.has_unfinished():
                    break  # the rest were aborted (e.g. by another thread)
        except BaseException:
            for rid in ids:  # e.g. KeyboardInterrupt in a notebook: leave the engine clean
                self.abort(rid)
            raise
        finally:
            if bar is not None:
                bar.close()
        return [final[req.request_id] if req.request_id in final else self._output(req) for req in reqs]

    def stream(self, prompt, sampling_params: SamplingParams | None = None) -> Iterator[str]:
        """Yield the text of one request (n=1) piece by piece as it is generated."""
        params = sampling_params or SamplingParams()
        if params.n != 1:
            raise ValueError(f"stream() streams one sample; got n={params.n}")
        rid = self.add_request(prompt, params)
        sent = 0
        try:
            while True:
                done = False
                for o in self.step():
                    if o.request_id == rid:
                        text = o.outputs[0].text
                        if len(text) > sent:
                            yield text[sent:]
                            sent = len(text)
                        done = o.finished
                if done or rid not in self.requests:
                    return
        finally:
            self.abort(rid)  # closed early (break, exception): free its blocks; no-op when finished

    # ------------------------------------------------------------------ stats
    def stats(self) -> EngineStats:
        with self._lock:
            bm, bs = self.block_manager, self.config.block_size
            filled: dict[int, int] = {}
            for seq in self.scheduler.running:
                for i, block_id in enumerate(seq.block_table):
                    n = min(bs, max(0, seq.num_computed_tokens - i * bs))
                    filled[block_id] = max(filled.get(block_id, 0), n)
            used = bm.num_used_blocks
            return EngineStats(
                num_blocks_total=bm.num_blocks, num_blocks_used=used, num_blocks_free=bm.num_free_blocks,
                num_blocks_cached=len(bm.cached_block_ids), block_size=bs,
                kv_cache_usage=used / bm.num_blocks,
                kv_utilization=sum(filled.values()) / (used * bs) if used else 0.0,
                prefix_cache_hit_rate=bm.prefix_cache_hit_rate,
                num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
                num_preemptions=self.scheduler.num_preemptions, num_steps=self.num_steps,
                num_prompt_tokens=self.num_prompt_tokens, num_generated_tokens=self.num_generated_tokens)

    def reset_prefix_cache(self) -> None:
        with self._lock:
            self.block_manager.reset_prefix_cache()

    def __repr__(self) -> str:
        c = self.config
        return (f"LLM({type(self.model).__name__}, block_size={c.block_size}, num_kv_blocks={c.num_kv_blocks}, "
                f"max_num_seqs={c.max_num_seqs}, max_num_batched_tokens={c.max_num_batched_tokens}, "
                f"max_model_len={c.max_model_len})")
