"""LLM: the user-facing engine, shaped like `vllm.LLM` (offline) plus the `add_request / step / abort`
loop that `vllm.LLMEngine` offers to servers.

One step is three calls (as nano-vllm's `LLMEngine.step`):

    batch = scheduler.schedule()                  # which sequences compute how many tokens (scheduler.py)
    executed = self._execute(batch)               # runner forward + sampler; changes no sequence
    outputs = self._process_outputs(batch, executed)  # commit, then detokenize / stop / outputs (output.py)

Everything a step touches is O(number of scheduled sequences).

    llm = LLM("smollm2-135m-instruct")
    outs = llm.generate(["Hello", "Paris is"], SamplingParams(temperature=0, max_tokens=32))
    print(outs[0].outputs[0].text, outs[0].metrics.ttft, llm.stats())
"""
from __future__ import annotations

import itertools
import logging
import math
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from ..samples import DEFAULT_MODEL
from .block_manager import BlockManager
from .config import EngineConfig, engine_fields
from .output import CompletionOutput, OutputProcessor, RequestOutput, RequestState, SampledToken
from .sampling import Sampler, SamplerOutput
from .sampling_params import SamplingParams
from .scheduler import Scheduler, SchedulerOutput
from .sequence import Sequence

__all__ = ["LLM", "EngineStats", "StepTiming", "RequestOutput", "CompletionOutput"]
_log = logging.getLogger(__name__)


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
    graph: Any = None             # graph mode: the runner's GraphStats (npukit.engine.graph); None when eager


@dataclass
class StepTiming:
    """One step that ran the model, as the step hooks see it (see LLM.step_hooks). Seconds."""

    seconds: float          # the whole step: schedule + execute + process outputs
    execute_seconds: float  # the model forward (index building included)
    prepare_seconds: float  # index building (runner.prepare_inputs), inside execute_seconds
    num_entries: int        # scheduled sequences
    num_decodes: int        # of which computed one token
    num_tokens: int         # tokens computed
    capture_size: int | None = None  # graph mode: the capture size the step ran at (None: eager)
    padded_rows: int = 0              # graph mode: rows added to reach it


@dataclass
class Executed:
    """What _execute hands to _process_outputs: the rows it sampled and the sequences that failed."""

    failed: list[Sequence]  # scheduled sequences whose forward failed alone
    execute_seconds: float
    prepare_seconds: float
    seqs: list[Sequence] = field(default_factory=list)      # one per sampled row (new n > 1 samples too)
    children: list[Sequence] = field(default_factory=list)  # the new samples (not forked yet)
    samples: SamplerOutput | None = None                    # aligned with seqs


class LLM:
    def __init__(self, model: Any = DEFAULT_MODEL, tokenizer=None, *, device="auto", dtype="auto",
                 **engine_args: Any) -> None:
        """`model`: an embedded name, a folder or hub id (loaded with npukit.load_model), or a loaded HF model
        (then pass its tokenizer). `engine_args`: EngineConfig's fields (block_size, max_num_seqs, ...)."""
        self.config, unknown = EngineConfig.from_kwargs(**engine_args)
        if unknown:
            known = ", ".join(f.name for f in engine_fields())
            raise TypeError(f"LLM() got unknown engine settings {sorted(unknown)}; the settings are EngineConfig's "
                            f"fields: {known}")
        model_path = None  # what tensor-parallel workers load
        if isinstance(model, str) or hasattr(model, "__fspath__"):
            from ..loading import load_model

            model_path = str(model)
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
        self.runner = self._make_runner(model, model_path)
        self.block_manager = BlockManager(cfg.num_kv_blocks, cfg.block_size, cfg.enable_prefix_caching)
        self.scheduler = Scheduler(cfg, self.block_manager)
        self.sampler = Sampler()
        # NOTE: no sequence grows past max_seq_len, so one sequence alone always fits the KV cache
        # (the scheduler can always make progress by preempting the others).
        self.max_seq_len = min(cfg.max_model_len, cfg.num_kv_blocks * cfg.block_size)
        self.vocab_size = model.get_input_embeddings().weight.shape[0]
        self.output_processor = OutputProcessor(tokenizer, self._eos_token_ids(), self.max_seq_len)
        self.requests: dict[str, RequestState] = {}  # unfinished requests
        self._ids = itertools.count()
        self._lock = threading.RLock()  # add_request / abort / step may come from different threads
        self.num_steps = self.num_prompt_tokens = self.num_generated_tokens = 0
        # The one way to observe steps: each hook is called with a StepTiming after every step that ran the
        # model (npukit.bench.throughput.StepRecorder adds one). Empty by default: no cost.
        self.step_hooks: list[Callable[[StepTiming], None]] = []

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """The ids that end a request (unless ignore_eos); the output processor checks them."""
        return self.output_processor.eos_token_ids

    @eos_token_ids.setter
    def eos_token_ids(self, ids: tuple[int, ...]) -> None:
        self.output_processor.eos_token_ids = tuple(ids)

    # ------------------------------------------------------------------ setup helpers
    def _auto_num_blocks(self) -> int:
        from .. import device as device_mod
        from .kv_cache import kv_bytes_per_block

        cfg = self.config
        param = next(self.model.parameters())
        per_block = kv_bytes_per_block(self.model.config, cfg.block_size, param.dtype, cfg.tensor_parallel_size)
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

    def _make_runner(self, model, model_path):
        """The model runner: tensor-parallel workers, or one ModelRunner (with graph mode if enforce_eager=False)."""
        cfg = self.config
        if cfg.tensor_parallel_size > 1:
            from ..parallel.executor import TensorParallelRunner

            report = getattr(model, "load_report", None)
            model_path = model_path or (report.path if report is not None else None)
            if model_path is None:
                raise ValueError("tensor_parallel_size > 1: the workers load the model themselves, so pass a name or "
                                 "folder (or a model from npukit.load_model, which records its path)")
            if not cfg.enforce_eager:
                _log.warning("graph mode (enforce_eager=False) runs at tensor_parallel_size 1 only; running eager")
            return TensorParallelRunner(model, model_path, cfg.block_size, cfg.num_kv_blocks, cfg.tensor_parallel_size)
        from .runner import ModelRunner

        runner = ModelRunner(model, cfg.block_size, cfg.num_kv_blocks)
        if not cfg.enforce_eager:
            from .graph import GraphRunner

            # NOTE: sizes above max_num_seqs are skipped (no decode batch reaches them), as vLLM does.
            sizes = [s for s in cfg.compile_sizes if s <= cfg.max_num_seqs] or cfg.compile_sizes[:1]
            runner.graph = GraphRunner(runner, sizes)
        return runner

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
        # NOTE: every id the sampler will index with must lie in the vocabulary (SamplingParams cannot
        # know it): an out-of-range id would raise inside step() and fail the whole batch.
        bad = [t for t in params.stop_token_ids if t >= self.vocab_size]
        if bad:
            raise ValueError(f"stop_token_ids must be in [0, {self.vocab_size}) for this model, got {bad[:5]}")
        if params.logprobs is not None and params.logprobs > self.vocab_size:
            raise ValueError(f"logprobs={params.logprobs} is more than the vocabulary ({self.vocab_size} tokens)")
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
        seq = Sequence(request_id, list(ids), params)
        req = self.output_processor.new_request(request_id, text, ids, params, seq, now)
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
            self.output_processor.make_output(req)  # its latest output says "abort"
            return True

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def get_num_unfinished_requests(self) -> int:
        return len(self.requests)

    # ------------------------------------------------------------------ the step
    def step(self) -> list[RequestOutput]:
        """One engine step: schedule -> execute (forward + sample) -> process outputs. Returns the outputs
        of the requests that got tokens or finished (each is also kept as its request's latest output).

        NOTE: transactional: schedule() may admit, preempt and allocate, but no sequence advances before
        process_outputs commits the step, so a step that raises leaves every sequence as it was. A failure
        that one request causes fails that request only (finish_reason "error"): see _execute."""
        with self._lock, torch.inference_mode():
            start = time.perf_counter()
            batch = self._schedule()
            if batch.is_empty:
                return []
            executed = self._execute(batch)
            outputs = self._process_outputs(batch, executed)
            self._record_step(batch, executed, start)
            return outputs

    def _schedule(self) -> SchedulerOutput:
        batch = self.scheduler.schedule()
        if batch.is_empty and self.scheduler.waiting and not self.scheduler.running:
            # NOTE: cannot happen while sequence lengths are capped at max_seq_len (one sequence alone
            # always fits); fail loudly rather than spin if that promise is ever broken.
            head = self.scheduler.waiting[0]
            raise RuntimeError(f"engine stalled: request {head.request_id!r} ({len(head.token_ids)} tokens) "
                               f"cannot be scheduled with an empty batch; please report this")
        return batch

    def _execute(self, batch: SchedulerOutput) -> Executed:
        """Forward + sample without changing any sequence's progress. Rows whose forward or sampling fails
        alone are reported in `failed`; a forward that fails for every sequence re-raises."""
        if batch.blocks_to_copy:
            self.runner.copy_blocks(batch.blocks_to_copy)
        t = time.perf_counter()
        prepare_before = self.runner.prepare_seconds
        logits, computed, failed = self._forward(batch.scheduled)
        ex = Executed(failed=failed, execute_seconds=time.perf_counter() - t,
                      prepare_seconds=self.runner.prepare_seconds - prepare_before)
        rows: list[int] = []
        for row, (seq, n) in enumerate(computed):
            if seq.num_computed_tokens + n < len(seq.token_ids):
                continue  # a prefill chunk: no token to sample yet
            ex.seqs.append(seq)
            rows.append(row)
            for child in self._new_samples(seq):  # n > 1: the other samples start from the same logits
                ex.seqs.append(child)
                ex.children.append(child)
                rows.append(row)
        if ex.seqs:
            sample_logits = logits if rows == list(range(len(computed))) else logits[rows]
            ex.samples = self._sample(sample_logits, ex.seqs)
        return ex

    def _forward(self, scheduled: list[tuple[Sequence, int]]):
        """(logits, the entries they belong to, the sequences that failed). If the batch's forward raises,
        each sequence runs alone and those that fail alone fail. If every one of two or more fails alone,
        no request explains the failure: the batch's error is re-raised (nothing has advanced)."""
        try:
            return self.runner.execute_model(scheduled), scheduled, []
        except Exception as batch_error:
            # NOTE: nothing advanced yet, so rerunning writes the same K/V into the same slots.
            logits, ok, failed = [], [], []
            for entry in scheduled:
                try:
                    logits.append(self.runner.execute_model([entry]))
                    ok.append(entry)
                except Exception as e:
                    _log.warning("request %s failed in the model forward: %r", entry[0].request_id, e)
                    failed.append(entry[0])
            if not ok and len(scheduled) > 1:
                raise batch_error
            return (torch.cat(logits) if logits else None), ok, failed

    def _new_samples(self, seq: Sequence) -> list[Sequence]:
        """The samples 1..n-1 of a request with n > 1 at its first token (forked when the step commits)."""
        p = seq.sampling_params
        if p.n == 1 or seq.index != 0 or seq.num_output_tokens != 0:
            return []
        return [Sequence(seq.request_id, list(seq.token_ids), p, index=i, num_prompt_tokens=seq.num_prompt_tokens,
                         prefix_offset=seq.prefix_offset, read_offset=seq.read_offset) for i in range(1, p.n)]

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> SamplerOutput:
        """The sampler's output for every row. If the batched sampler raises, the rows are sampled one by
        one and the rows that raise alone come back with ok=False (like rows with NaN logits)."""
        stop_ids = [self.requests[s.request_id].stop_ids for s in seqs]
        try:
            return self.sampler(logits, seqs, stop_ids)
        except Exception:
            rows: list[SamplerOutput | None] = []
            for i, seq in enumerate(seqs):
                try:
                    rows.append(self.sampler(logits[i:i + 1], [seq], stop_ids[i:i + 1]))
                except Exception as e:
                    _log.warning("request %s failed in the sampler: %r", seq.request_id, e)
                    rows.append(None)
            return SamplerOutput.concat(rows)

    def _process_outputs(self, batch: SchedulerOutput, ex: Executed) -> list[RequestOutput]:
        """Commit the step (advance the sequences), then append the sampled tokens, detokenize, check stops,
        free what finished and build the touched requests' outputs."""
        failed = {s.seq_id for s in ex.failed}
        self.scheduler.update(batch, failed)
        now = time.perf_counter()
        touched: dict[str, RequestState] = {s.request_id: self.requests[s.request_id] for s in ex.failed}
        done: dict[str, list[Sequence]] = {"error": list(ex.failed)}  # finish reason -> sequences
        result, children = ex.samples, {id(c) for c in ex.children}
        for i, seq in enumerate(ex.seqs):
            req = touched.setdefault(seq.request_id, self.requests[seq.request_id])
            if children and id(seq) in children:  # a new sample of an n > 1 request: shares the prompt's blocks
                req.seqs.append(seq)
                self.scheduler.fork(req.seqs[0], seq)
            if not result.ok[i]:  # the sampler failed on this row, or NaN / inf logits: this sequence ends
                done["error"].append(seq)
                continue
            sample = SampledToken(seq, result.token_ids[i], result.logprobs[i], result.sampled_logprobs[i])
            reason = self.output_processor.process(req, sample, now)
            self.num_generated_tokens += 1
            if reason is not None:
                done.setdefault(reason, []).append(seq)
        for reason, finished in done.items():
            self.scheduler.finish(finished, reason)
        self.num_steps += 1
        return [self._request_output(req, now) for req in touched.values()]

    def _request_output(self, req: RequestState, now: float | None = None) -> RequestOutput:
        if not req.finished and req.all_samples_finished:
            req.finished = True
            req.metrics.finish(now)
            del self.requests[req.request_id]
        return self.output_processor.make_output(req)

    def _record_step(self, batch: SchedulerOutput, ex: Executed, start: float) -> None:
        if not self.step_hooks:
            return
        timing = StepTiming(seconds=time.perf_counter() - start, execute_seconds=ex.execute_seconds,
                            prepare_seconds=ex.prepare_seconds, num_entries=len(batch.scheduled),
                            num_decodes=sum(1 for _, n in batch.scheduled if n == 1),
                            num_tokens=batch.num_batched_tokens)
        graph = getattr(self.runner, "graph", None)
        if graph is not None:
            timing.capture_size, timing.padded_rows = graph.stats.last_capture_size, graph.stats.last_padded_rows
        for hook in list(self.step_hooks):
            hook(timing)

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
        params = (sampling_params if isinstance(sampling_params, (list, tuple))
                  else [sampling_params] * len(conversations))
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
            reqs = [self.requests[self._add(text, ids, params)] for text, ids, params in prepared]
        bar = None
        if use_tqdm:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(reqs), desc="Processed prompts", dynamic_ncols=True)
        try:
            # NOTE: read the requests' own state, not step()'s return value: another thread may run the
            # step that finishes them (each request keeps its latest output).
            pending = list(reqs)
            while pending:
                self.step()
                still = [r for r in pending if not r.finished]
                if bar is not None and len(still) < len(pending):
                    bar.update(len(pending) - len(still))
                pending = still
        except BaseException:
            for req in reqs:  # e.g. KeyboardInterrupt in a notebook: leave the engine clean
                self.abort(req.request_id)
            raise
        finally:
            if bar is not None:
                bar.close()
        with self._lock:
            return [req.output or self.output_processor.make_output(req) for req in reqs]

    def stream(self, prompt, sampling_params: SamplingParams | None = None) -> Iterator[str]:
        """Yield the text of one request (n=1) piece by piece as it is generated."""
        params = sampling_params or SamplingParams()
        if params.n != 1:
            raise ValueError(f"stream() streams one sample; got n={params.n}")
        with self._lock:
            rid = self.add_request(prompt, params)
            req = self.requests[rid]
        sent = 0
        try:
            while True:
                self.step()
                out = req.output  # NOTE: its own state: another thread may have run the step
                text = out.outputs[0].text if out is not None else ""
                if len(text) > sent:
                    yield text[sent:]
                    sent = len(text)
                if req.finished:
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
                num_prompt_tokens=self.num_prompt_tokens, num_generated_tokens=self.num_generated_tokens,
                graph=self.graph_stats)

    @property
    def graph_stats(self):
        """Graph mode's GraphStats (compile seconds, capture sizes, padding waste), or None when eager."""
        graph = getattr(self.runner, "graph", None)
        return None if graph is None else graph.stats

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers (also done by `del llm` and at exit); a no-op at TP 1."""
        stop = getattr(self.runner, "shutdown", None)
        if stop is not None:
            stop()

    def reset_prefix_cache(self) -> None:
        with self._lock:
            self.block_manager.reset_prefix_cache()

    def __repr__(self) -> str:
        c = self.config
        return (f"LLM({type(self.model).__name__}, block_size={c.block_size}, num_kv_blocks={c.num_kv_blocks}, "
                f"max_num_seqs={c.max_num_seqs}, max_num_batched_tokens={c.max_num_batched_tokens}, "
                f"max_model_len={c.max_model_len}"
                + (f", tensor_parallel_size={c.tensor_parallel_size})" if c.tensor_parallel_size > 1 else ")"))
