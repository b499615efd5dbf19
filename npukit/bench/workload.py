"""A seeded workload and how it runs: every request through the engine, or through HF ``generate`` in static
batches, with a log of every step.

    workload = make_workload(tokenizer, num_requests=16, prompt_len=(16, 64), output_len=(8, 32))
    result = run_workload(llm, workload)          # WorkloadRun: per-request metrics + a log of every step
    static = run_static_batches(model, tokenizer, workload, batch_size=8)   # the same, HF generate batches
    static_schedule([10, 100, 5], batch_size=3)   # the step log static batching would produce

One workload for everyone: the engine-tuning dashboard, notebooks 05-07 and the throughput benchmark
(``npukit bench throughput``) all build theirs with ``make_workload``. Every request is greedy with
``ignore_eos``, so it produces exactly its ``max_tokens`` tokens: the number of steps, the preemptions and the
block counts depend only on the engine's knobs and the workload, not on timing.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from npukit.engine.config import engine_fields
from npukit.metrics import RequestMetrics, RequestsSummary, summarize_requests

# the engine settings a run records: every EngineConfig field that is a command-line flag
KNOBS = tuple(f.name for f in engine_fields() if f.metadata.get("cli", True))


# ------------------------------------------------------------------------------------------------
# Workloads
# ------------------------------------------------------------------------------------------------


@dataclass
class Workload:
    """Requests as token ids with their output lengths (all arrive at once)."""

    prompts: list[list[int]]
    max_tokens: list[int]

    def __post_init__(self) -> None:
        if not self.prompts:
            raise ValueError("a workload needs at least one request")
        if len(self.prompts) != len(self.max_tokens):
            raise ValueError(f"got {len(self.prompts)} prompts but {len(self.max_tokens)} output lengths")
        if any(len(p) == 0 for p in self.prompts) or any(m < 1 for m in self.max_tokens):
            raise ValueError("every prompt needs at least one token and every max_tokens must be >= 1")

    @property
    def num_requests(self) -> int:
        return len(self.prompts)

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def num_output_tokens(self) -> int:
        return sum(self.max_tokens)

    def __str__(self) -> str:
        lens = [len(p) for p in self.prompts]
        return (f"{self.num_requests} requests: prompts {min(lens)}-{max(lens)} tokens, outputs "
                f"{min(self.max_tokens)}-{max(self.max_tokens)} tokens ({self.num_prompt_tokens} prompt + "
                f"{self.num_output_tokens} output tokens)")


def _length_range(value, name: str) -> tuple[int, int]:
    lo, hi = (value, value) if isinstance(value, int) else tuple(value)
    if not 1 <= lo <= hi:
        raise ValueError(f"{name} must be a positive int or a (min, max) pair with 1 <= min <= max, got {value!r}")
    return int(lo), int(hi)


def make_workload(tokenizer_or_vocab_size, num_requests: int = 16, prompt_len=(16, 64), output_len=(8, 32),
                  shared_prefix_len: int = 0, seed: int = 0) -> Workload:
    """Seeded random prompts (token ids, no special tokens) and output lengths, uniform in the ranges.

    ``shared_prefix_len`` tokens at the start are the same in every prompt (a shared system prompt: what
    prefix caching reuses); they count in ``prompt_len``.
    """
    if num_requests < 1:
        raise ValueError(f"num_requests must be >= 1, got {num_requests}")
    p_lo, p_hi = _length_range(prompt_len, "prompt_len")
    o_lo, o_hi = _length_range(output_len, "output_len")
    if not 0 <= shared_prefix_len < p_lo:
        raise ValueError(f"shared_prefix_len ({shared_prefix_len}) must be >= 0 and shorter than the shortest "
                         f"prompt ({p_lo} tokens): each prompt needs a token of its own")
    if isinstance(tokenizer_or_vocab_size, int):
        vocab, special = tokenizer_or_vocab_size, set()
    else:
        vocab = len(tokenizer_or_vocab_size)
        special = set(getattr(tokenizer_or_vocab_size, "all_special_ids", None) or [])
    allowed = torch.tensor([i for i in range(vocab) if i not in special])
    g = torch.Generator().manual_seed(seed)

    def ids(n: int) -> list[int]:
        return allowed[torch.randint(len(allowed), (n,), generator=g)].tolist()

    prefix = ids(shared_prefix_len)
    lens = torch.randint(p_lo, p_hi + 1, (num_requests,), generator=g).tolist()
    outs = torch.randint(o_lo, o_hi + 1, (num_requests,), generator=g).tolist()
    return Workload([prefix + ids(n - shared_prefix_len) for n in lens], outs)


# ------------------------------------------------------------------------------------------------
# Runs and their step logs
# ------------------------------------------------------------------------------------------------


@dataclass
class StepRecord:
    """One engine step (or one forward of a static batch)."""

    step: int                  # 0, 1, 2, ...
    time: float                # seconds since the run started, when the step ended
    request_ids: list[str]     # requests that got an output token in this step
    slot_ids: list[str]        # requests holding a place in the batch (got a token, prefilled, or wait for the batch)
    num_waiting: int = 0
    kv_cache_usage: float = 0.0    # used blocks / all blocks
    kv_utilization: float = 0.0    # tokens stored / slots of the used blocks
    num_preemptions: int = 0       # so far


@dataclass
class WorkloadRun:
    """A workload's run: per-request metrics (in workload order), the step log, and the wall time."""

    label: str
    metrics: list[RequestMetrics]
    steps: list[StepRecord]
    wall_time: float
    config: dict[str, Any] = field(default_factory=dict)
    outputs: list | None = None          # engine runs: the RequestOutputs
    stats: Any = None                    # engine runs: llm.stats() at the end
    preempted: dict[str, int] = field(default_factory=dict)  # request id -> times preempted
    batch_size: int | None = None        # the batch slots (max_num_seqs, or the static batch size)

    @property
    def request_ids(self) -> list[str]:
        return [str(i) for i in range(len(self.metrics))]

    @property
    def num_output_tokens(self) -> int:
        return sum(m.num_output_tokens for m in self.metrics)

    @property
    def output_throughput(self) -> float:
        """Output tokens per second of wall time."""
        return self.num_output_tokens / self.wall_time

    @property
    def num_steps(self) -> int:
        return len(self.steps)

    @property
    def num_preemptions(self) -> int:
        return self.steps[-1].num_preemptions if self.steps else 0

    @property
    def peak_batch(self) -> int:
        """Most requests that got a token in one step."""
        return max((len(s.request_ids) for s in self.steps), default=0)

    @property
    def slot_utilization(self) -> float:
        """Share of the batch slots that produced a token, over all steps (1.0 = never an idle slot)."""
        slots = self.batch_size or self.peak_batch
        return sum(len(s.request_ids) for s in self.steps) / (slots * len(self.steps)) if self.steps else 0.0

    def summary(self) -> RequestsSummary:
        return summarize_requests(self.metrics)

    def token_steps(self) -> dict[str, list[int]]:
        """Request id -> the steps in which it got a token."""
        out: dict[str, list[int]] = {rid: [] for rid in self.request_ids}
        for s in self.steps:
            for rid in s.request_ids:
                out.setdefault(rid, []).append(s.step)
        return out

    def __str__(self) -> str:
        return (f"{self.label}: {len(self.metrics)} requests, {self.num_output_tokens} output tokens in "
                f"{self.num_steps} steps, {self.wall_time:.2f} s -> {self.output_throughput:.1f} tok/s"
                + (f", {self.num_preemptions} preemptions" if self.num_preemptions else ""))


def engine_knobs(llm) -> dict[str, Any]:
    """The engine knobs of an LLM, by their vLLM names."""
    return {k: getattr(llm.config, k) for k in KNOBS}


def greedy_params(max_tokens: int):
    """Greedy, exactly ``max_tokens`` tokens (end-of-sequence ignored): the benchmark setting."""
    from npukit.engine import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def run_workload(llm, workload: Workload, *, label: str = "engine",
                 on_step: Callable[[StepRecord, int], None] | None = None) -> WorkloadRun:
    """Run every request of ``workload`` through ``llm`` step by step and log each step.

    All requests arrive at once. ``on_step(record, num_finished)`` is called after every step (for a
    progress bar). The engine must be idle: requests already in it would mix into the numbers.
    """
    if llm.has_unfinished_requests():
        raise RuntimeError("the engine still has unfinished requests; run the workload on an idle LLM")
    scheduler = llm.scheduler
    base_preemptions = scheduler.num_preemptions
    params = [greedy_params(m) for m in workload.max_tokens]
    start = time.perf_counter()
    ids: list[str] = []
    try:
        for p, sp in zip(workload.prompts, params):
            ids.append(llm.add_request(p, sp, arrival_time=start))
    except Exception:  # NOTE: a bad request (too long for the cache ...): nothing of the workload stays queued
        for rid in ids:
            llm.abort(rid)
        raise
    index = {rid: str(i) for i, rid in enumerate(ids)}
    final: dict[str, Any] = {}
    steps: list[StepRecord] = []
    preempted: dict[str, int] = {}
    try:
        while len(final) < len(ids):
            outs = llm.step()
            now = time.perf_counter()
            got = [index[o.request_id] for o in outs if o.request_id in index]
            for o in outs:
                if o.finished and o.request_id in index:
                    final[o.request_id] = o
            running = {index[s.request_id] for s in scheduler.running if s.request_id in index}
            for seq in scheduler.waiting:
                if seq.num_preemptions and seq.request_id in index:
                    preempted[index[seq.request_id]] = seq.num_preemptions
            stats = llm.stats()
            record = StepRecord(step=len(steps), time=now - start, request_ids=got,
                                slot_ids=sorted(running | set(got), key=int), num_waiting=stats.num_waiting,
                                kv_cache_usage=stats.kv_cache_usage, kv_utilization=stats.kv_utilization,
                                num_preemptions=scheduler.num_preemptions - base_preemptions)
            steps.append(record)
            if on_step is not None:
                on_step(record, len(final))
            if not outs and not llm.has_unfinished_requests():
                break
    except BaseException:
        for rid in ids:  # e.g. KeyboardInterrupt: leave the engine clean
            llm.abort(rid)
        raise
    wall = time.perf_counter() - start
    if len(final) < len(ids):
        missing = [rid for rid in ids if rid not in final]
        raise RuntimeError(f"requests {missing[:5]} stopped without finishing (aborted from elsewhere?); "
                           "run workloads on an engine nobody else uses")
    outputs = [final[rid] for rid in ids]
    return WorkloadRun(label=label, metrics=[o.metrics for o in outputs], steps=steps, wall_time=wall,
                     config=engine_knobs(llm), outputs=outputs, stats=llm.stats(), preempted=preempted,
                     batch_size=llm.config.max_num_seqs)


def _pad_token_id(model, tokenizer) -> int:
    for v in (getattr(tokenizer, "pad_token_id", None), getattr(model.generation_config, "pad_token_id", None),
              getattr(tokenizer, "eos_token_id", None)):
        if isinstance(v, int):
            return v
    return 0


def _step_stamper():
    from transformers.generation.streamers import BaseStreamer

    class StepStamper(BaseStreamer):
        """Stamps perf_counter() once per generate step (the first put() is the prompt: skipped)."""

        def __init__(self) -> None:
            self.times: list[float] = []
            self._prompt_seen = False

        def put(self, value) -> None:
            if self._prompt_seen:
                self.times.append(time.perf_counter())
            self._prompt_seen = True

        def end(self) -> None:
            pass

    return StepStamper()


def run_static_batches(model, tokenizer, workload: Workload, batch_size: int, *, label: str = "HF static batches",
                       on_batch: Callable[[int, int], None] | None = None) -> WorkloadRun:
    """The same workload the pre-vLLM way: HF ``generate`` on fixed batches of ``batch_size`` requests
    (prompts left-padded), each batch running until its longest output before the next one starts.

    Only the tokens a request asked for count; the steps a finished request spends waiting for its batch
    are wasted slots. A request's answer is ready when its batch returns (that is its finish time).
    ``on_batch(done, total)`` is called after each batch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = model.device
    pad = _pad_token_id(model, tokenizer)
    start = time.perf_counter()
    metrics = [RequestMetrics(arrival_time=start, num_prompt_tokens=len(p)) for p in workload.prompts]
    steps: list[StepRecord] = []
    n = workload.num_requests
    batches = [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]
    for b, batch in enumerate(batches):
        width = max(len(workload.prompts[i]) for i in batch)
        new = max(workload.max_tokens[i] for i in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):  # left padding: every prompt ends at the same column
            p = workload.prompts[i]
            ids[row, width - len(p):] = torch.tensor(p)
            mask[row, width - len(p):] = 1
        stamper = _step_stamper()
        with torch.inference_mode():
            # NOTE: min_new_tokens = max_new_tokens: no row stops early, as with ignore_eos in the engine.
            model.generate(ids.to(device), attention_mask=mask.to(device), max_new_tokens=new, min_new_tokens=new,
                           do_sample=False, pad_token_id=pad, streamer=stamper)
        end = time.perf_counter()
        for i in batch:
            m, k = metrics[i], workload.max_tokens[i]
            m.token_times = stamper.times[:k]
            m.first_token_time = m.token_times[0]
            m.num_output_tokens = k
            m.finish_time = end  # NOTE: the caller gets the answer only when the whole batch is done
        slot_ids = [str(i) for i in batch]
        for t, stamp in enumerate(stamper.times):
            got = [str(i) for i in batch if t < workload.max_tokens[i]]
            steps.append(StepRecord(step=len(steps), time=stamp - start, request_ids=got, slot_ids=slot_ids,
                                    num_waiting=n - batch[-1] - 1))
        if on_batch is not None:
            on_batch(b + 1, len(batches))
    wall = time.perf_counter() - start
    return WorkloadRun(label=label, metrics=metrics, steps=steps, wall_time=wall, config={"batch_size": batch_size},
                     batch_size=batch_size)


def static_schedule(output_lens: Sequence[int], batch_size: int) -> list[StepRecord]:
    """The step log static batching produces for these output lengths (no model run): batches of
    ``batch_size`` requests in order, each lasting as many steps as its longest output."""
    if batch_size < 1 or not output_lens or any(n < 1 for n in output_lens):
        raise ValueError("static_schedule needs batch_size >= 1 and output lengths >= 1")
    steps: list[StepRecord] = []
    n = len(output_lens)
    for first in range(0, n, batch_size):
        batch = list(range(first, min(first + batch_size, n)))
        for t in range(max(output_lens[i] for i in batch)):
            steps.append(StepRecord(step=len(steps), time=float(len(steps) + 1),
                                    request_ids=[str(i) for i in batch if t < output_lens[i]],
                                    slot_ids=[str(i) for i in batch], num_waiting=n - batch[-1] - 1))
    return steps


def schedule_result(steps: list[StepRecord], output_lens: Sequence[int], batch_size: int,
                    label: str = "static batching (simulated)") -> WorkloadRun:
    """A WorkloadRun for a step log with one time unit per step (arrivals at 0): compare step counts."""
    metrics = []
    token_steps: dict[str, list[float]] = {str(i): [] for i in range(len(output_lens))}
    last_slot: dict[str, float] = {}
    for s in steps:
        for rid in s.request_ids:
            token_steps[rid].append(s.time)
        for rid in s.slot_ids:
            last_slot[rid] = s.time
    for i, n in enumerate(output_lens):
        times = token_steps[str(i)]
        metrics.append(RequestMetrics(arrival_time=0.0, first_token_time=times[0], token_times=times,
                                      finish_time=last_slot[str(i)], num_output_tokens=n))
    return WorkloadRun(label=label, metrics=metrics, steps=steps, wall_time=steps[-1].time, batch_size=batch_size)
