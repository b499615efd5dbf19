"""The engine under faults: a step is transactional (a step that raises leaves every sequence as it was),
a failure one request causes fails that request only, and generate / stream in several threads each see
their own requests' outputs whoever runs the step."""
import random
import threading

import pytest

from npukit.engine import LLM, SamplingParams

GREEDY = dict(temperature=0.0, ignore_eos=True)
NEW = 8


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def prompts():
    rng = random.Random(1)
    return [[rng.randrange(3, 512) for _ in range(n)] for n in (3, 9, 17, 30)]


@pytest.fixture(scope="module")
def alone(tiny, prompts):
    """Each prompt's fp32 greedy tokens when it runs alone in a fresh engine."""
    return [make(tiny).generate(p, SamplingParams(max_tokens=NEW, **GREEDY), use_tqdm=False)[0].outputs[0].token_ids
            for p in prompts]


def make(tiny, **kw):
    return LLM(*tiny, **{"num_kv_blocks": 128, "block_size": 4, **kw})


def run_all(llm):
    done = {}
    while llm.has_unfinished_requests():
        done.update({o.request_id: o for o in llm.step() if o.finished})
    return done


def check_clean_and_usable(llm, prompts, alone):
    assert llm.stats().num_blocks_used == 0 and not llm.has_unfinished_requests()
    again = llm.generate(prompts, SamplingParams(max_tokens=NEW, **GREEDY), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in again] == alone


def add_good(llm, prompts):
    return [llm.add_request(p, SamplingParams(max_tokens=NEW, **GREEDY)) for p in prompts]


def test_a_row_the_sampler_cannot_sample_fails_alone(tiny, prompts, alone):
    """A seed too big for a generator and a stop token beyond the vocabulary with min_tokens > 0 (both past
    request validation, as a bug elsewhere would let them) make the batched sampler raise."""
    llm = make(tiny)
    ids = add_good(llm, prompts[:2])
    llm.step()
    bad_seed = SamplingParams(max_tokens=NEW, temperature=1.0)
    bad_seed.seed = 2**70  # bypasses SamplingParams' checks
    bad_stop = SamplingParams(max_tokens=NEW, min_tokens=3, **GREEDY)
    bad_stop.stop_token_ids = [10**6]
    # NOTE: _add skips LLM._prepare's request validation on purpose: the engine must hold even so.
    bad = [llm._add(None, prompts[1], bad_seed), llm._add(None, prompts[2], bad_stop)]
    ids += add_good(llm, prompts[2:])
    done = run_all(llm)
    for rid in bad:
        c = done[rid].outputs[0]
        assert done[rid].finished and c.finish_reason == "error" and c.token_ids == []
    assert [done[rid].outputs[0].token_ids for rid in ids] == alone
    check_clean_and_usable(llm, prompts, alone)


def test_a_sampler_error_on_one_row_fails_that_row_only(tiny, prompts, alone, monkeypatch):
    llm = make(tiny)
    ids = add_good(llm, prompts)
    victim = ids[2]
    real = llm.sampler.__class__.__call__
    calls = {"n": 0}

    def flaky(self, logits, seqs, stop_ids=None):
        calls["n"] += 1
        if calls["n"] >= 3 and any(s.request_id == victim for s in seqs):
            raise OverflowError("injected")
        return real(self, logits, seqs, stop_ids)

    monkeypatch.setattr(type(llm.sampler), "__call__", flaky)
    done = run_all(llm)
    assert done[victim].outputs[0].finish_reason == "error"
    assert done[victim].outputs[0].token_ids == alone[2][:len(done[victim].outputs[0].token_ids)]
    assert [done[rid].outputs[0].token_ids for rid in ids if rid != victim] == alone[:2] + alone[3:]
    monkeypatch.undo()
    check_clean_and_usable(llm, prompts, alone)


def poison_forward(llm, should_fail):
    real = llm.runner.execute_model

    def execute_model(batch, all_logits=False):
        if should_fail(batch):
            raise RuntimeError("injected forward failure")
        return real(batch, all_logits)

    llm.runner.execute_model = execute_model
    return lambda: vars(llm.runner).pop("execute_model")


def test_a_forward_that_fails_for_one_request_fails_that_request_only(tiny, prompts, alone):
    llm = make(tiny)
    ids = add_good(llm, prompts)
    victim = ids[1]
    llm.step()
    llm.step()  # the victim has tokens and blocks when its forward starts failing
    restore = poison_forward(llm, lambda batch: any(s.request_id == victim for s, _ in batch))
    done = run_all(llm)
    restore()
    c = done[victim].outputs[0]
    assert c.finish_reason == "error" and c.token_ids == alone[1][:len(c.token_ids)]
    assert [done[rid].outputs[0].token_ids for rid in ids if rid != victim] == [alone[0]] + alone[2:]
    check_clean_and_usable(llm, prompts, alone)


def test_a_lone_request_whose_forward_fails_gets_an_error(tiny, prompts, alone):
    llm = make(tiny)
    restore = poison_forward(llm, lambda batch: True)
    out = llm.generate(prompts[0], SamplingParams(max_tokens=NEW, **GREEDY), use_tqdm=False)[0]
    restore()
    assert out.finished and out.outputs[0].finish_reason == "error" and out.outputs[0].token_ids == []
    check_clean_and_usable(llm, prompts, alone)


def test_a_step_that_raises_changes_nothing(tiny, prompts, alone):
    """A forward that fails for every sequence re-raises; no sequence advanced, so the engine goes on
    exactly where it was (this used to leave 'cannot compute 0 tokens from position ...' behind)."""
    llm = make(tiny)
    ids = add_good(llm, prompts)
    llm.step()
    before = [(s.request_id, s.num_computed_tokens, len(s.token_ids)) for s in llm.scheduler.running]
    restore = poison_forward(llm, lambda batch: True)
    for _ in range(2):
        with pytest.raises(RuntimeError, match="injected forward failure"):
            llm.step()
    restore()
    assert [(s.request_id, s.num_computed_tokens, len(s.token_ids)) for s in llm.scheduler.running] == before
    done = run_all(llm)
    assert [done[rid].outputs[0].token_ids for rid in ids] == alone
    # a sampler that always raises also fails only its rows, and the engine stays usable
    llm2 = make(tiny)
    rid = add_good(llm2, prompts[:1])[0]
    llm2.sampler = lambda *a, **k: (_ for _ in ()).throw(ValueError("broken sampler"))
    assert run_all(llm2)[rid].outputs[0].finish_reason == "error"
    llm2.sampler = llm.sampler
    check_clean_and_usable(llm2, prompts, alone)


def test_generate_and_stream_in_two_threads_see_their_own_outputs(tiny, prompts, alone):
    llm = make(tiny)
    _, tok = tiny
    full = tok.decode(alone[3], skip_special_tokens=True)
    params = SamplingParams(max_tokens=NEW, **GREEDY)
    got, errors = {}, []

    def generate(k):
        try:
            got[f"gen{k}"] = [o.outputs[0].token_ids for o in llm.generate(prompts[:3], params, use_tqdm=False)]
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    def stream(k):
        try:
            got[f"stream{k}"] = "".join(llm.stream(prompts[3], params))
        except Exception as e:  # pragma: no cover
            errors.append(e)

    for k in range(3):
        threads = [threading.Thread(target=generate, args=(k,)), threading.Thread(target=stream, args=(k,))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not errors, errors
        assert got[f"gen{k}"] == alone[:3] and got[f"stream{k}"] == full
    assert llm.stats().num_blocks_used == 0


def test_a_bad_request_in_one_thread_does_not_fail_generate_in_another(tiny, prompts, alone):
    llm = make(tiny)
    restore = poison_forward(llm, lambda batch: any(len(s.prompt_token_ids) == 5 for s, _ in batch))
    results, errors = {}, []

    def good():
        try:
            results["good"] = [o.outputs[0].token_ids
                               for o in llm.generate(prompts, SamplingParams(max_tokens=NEW, **GREEDY), use_tqdm=False)]
        except Exception as e:  # pragma: no cover
            errors.append(e)

    def bad():
        results["bad"] = llm.generate([[7] * 5], SamplingParams(max_tokens=NEW, **GREEDY), use_tqdm=False)[0]

    threads = [threading.Thread(target=good), threading.Thread(target=bad)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    restore()
    assert not errors, errors
    assert results["good"] == alone and results["bad"].outputs[0].finish_reason == "error"
    assert llm.stats().num_blocks_used == 0
