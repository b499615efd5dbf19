"""The engine end to end: greedy fidelity against HF `generate` (fp32) under every scheduling regime,
seeded sampling, reliability (preemption storms, abort, bad requests, NaN logits) and the API."""
import random

import pytest
import torch

from npukit.engine import LLM, CompletionOutput, EngineStats, RequestOutput, SamplingParams
from npukit.engine.runner import UnsupportedModelError

GREEDY = dict(temperature=0.0, ignore_eos=False)


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

SMOL_PROMPTS = [
    "Hi",
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea,",
    "1, 2, 3, 4, 5,",
    "Translate to French: I like apples.",
    "The three primary colors are",
    "Q: What is the boiling point of water at sea level?\nA:",
    "Write a haiku about the autumn moon over the mountains and a quiet lake. Use simple words, and make "
    "the last line about the reflection of the moon on the water, which trembles when the wind blows.",
    "import numpy as np\nx = np.arange(10)\nprint(",
    "The quick brown fox",
    "A list of fruits: apple, banana,",
    "In machine learning, a transformer is a neural network architecture that",
    "Dear hiring manager, I am writing to apply for the position of",
    "Python is a programming language that is known for its simplicity and readability. It has a large "
    "standard library, a friendly community and many third-party packages for science, the web and "
    "automation. It was created by",
    "Summer",
]


def hf_greedy(model, prompts_ids, max_new_tokens):
    """The reference: HF generate, one prompt at a time, no padding."""
    out = []
    with torch.inference_mode():
        for ids in prompts_ids:
            x = torch.tensor([ids], device=model.device)
            y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens, do_sample=False,
                               pad_token_id=model.generation_config.pad_token_id or 0)
            out.append(y[0, len(ids):].tolist())
    return out


def token_ids(outputs, index=0):
    return [o.outputs[index].token_ids for o in outputs]


def blocks_held_by_running(llm):
    return len({b for s in llm.scheduler.running for b in s.block_table})


# ---------------------------------------------------------------- SmolLM2 fidelity (a), (b), (c)
SMOL_NEW = 10


@pytest.fixture(scope="module")
def smol_ids(smol):
    _, tok = smol
    return [tok(p).input_ids for p in SMOL_PROMPTS]


@pytest.fixture(scope="module")
def smol_ref(smol, smol_ids):
    return hf_greedy(smol[0], smol_ids, SMOL_NEW)


def test_smol_greedy_equals_hf_one_at_a_time_and_batched(smol, smol_ids, smol_ref):
    llm = LLM(*smol, num_kv_blocks=96, block_size=16)
    params = SamplingParams(max_tokens=SMOL_NEW, **GREEDY)
    one_by_one = [llm.generate([ids], params, use_tqdm=False)[0] for ids in smol_ids]
    assert token_ids(one_by_one) == smol_ref
    together = llm.generate(SMOL_PROMPTS, params, use_tqdm=False)  # strings: tokenized the same way
    assert token_ids(together) == smol_ref
    assert [o.prompt for o in together] == SMOL_PROMPTS and [o.prompt_token_ids for o in together] == smol_ids
    # incremental detokenization gives the same text as decoding the whole output at once
    tok = smol[1]
    assert [o.outputs[0].text for o in together] == [tok.decode(r, skip_special_tokens=True) for r in smol_ref]
    assert llm.block_manager.num_free_blocks == 96


def test_smol_greedy_equals_hf_under_preemption(smol, smol_ids, smol_ref):
    longest = max(len(i) for i in smol_ids) + SMOL_NEW
    llm = LLM(*smol, num_kv_blocks=-(-longest // 8) + 4, block_size=8, max_num_batched_tokens=64)
    outs = llm.generate(smol_ids, SamplingParams(max_tokens=SMOL_NEW, **GREEDY), use_tqdm=False)
    assert llm.stats().num_preemptions > 0
    assert token_ids(outs) == smol_ref


# ---------------------------------------------------------------- tiny model: every regime
TINY_NEW = 16
TINY_LENGTHS = [1, 2, 3, 5, 8, 13, 16, 17, 24, 31, 32, 33, 40, 47, 60, 64]


@pytest.fixture(scope="module")
def tiny_ids():
    rng = random.Random(0)
    shared = [rng.randrange(3, 512) for _ in range(40)]
    prompts = [[rng.randrange(3, 512) for _ in range(n)] for n in TINY_LENGTHS]
    # four prompts that share a 40-token prefix (10 blocks of 4) for the prefix-caching case
    prompts[12:16] = [shared + [rng.randrange(3, 512) for _ in range(k)] for k in (0, 1, 7, 24)]
    return prompts


@pytest.fixture(scope="module")
def tiny_ref(tiny, tiny_ids):
    return hf_greedy(tiny[0], tiny_ids, TINY_NEW)


def tiny_llm(tiny, **kw):
    kw = {"num_kv_blocks": 256, "block_size": 4, **kw}
    return LLM(*tiny, **kw)


@pytest.mark.parametrize("case, engine_kw", [
    ("one_at_a_time", {}),
    ("together", {}),
    ("preemption", {"num_kv_blocks": 24, "max_num_batched_tokens": 128}),
    ("chunked_prefill", {"max_num_batched_tokens": 7}),
    ("no_chunked_prefill", {"max_num_batched_tokens": 96, "enable_chunked_prefill": False}),
    ("prefix_caching", {"max_num_batched_tokens": 48}),
    ("no_prefix_caching", {"enable_prefix_caching": False}),
    ("block_size_1_few_seqs", {"block_size": 1, "max_num_seqs": 3, "num_kv_blocks": 1024}),
])
def test_tiny_greedy_equals_hf(tiny, tiny_ids, tiny_ref, case, engine_kw):
    llm = tiny_llm(tiny, **engine_kw)
    params = SamplingParams(max_tokens=TINY_NEW, **GREEDY)
    if case == "one_at_a_time":
        outs = [llm.generate([ids], params, use_tqdm=False)[0] for ids in tiny_ids]
    elif case == "prefix_caching":
        first = llm.generate([tiny_ids[12]], params, use_tqdm=False)  # cache the shared prefix
        outs = llm.generate(tiny_ids, params, use_tqdm=False)
        assert token_ids(first) == [tiny_ref[12]]
        assert llm.stats().prefix_cache_hit_rate > 0
        assert all(outs[i].num_cached_tokens >= 36 for i in range(12, 16))
    else:
        outs = llm.generate(tiny_ids, params, use_tqdm=False)
    assert token_ids(outs) == tiny_ref
    stats = llm.stats()
    if case == "preemption":
        assert stats.num_preemptions > 0
    if case == "chunked_prefill":
        assert stats.num_steps > len(tiny_ids) + TINY_NEW  # the long prompts really took several steps
    assert stats.num_blocks_used == 0 and stats.num_running == stats.num_waiting == 0


def test_tiny_n2_greedy_samples_share_the_prompt_and_both_equal_hf(tiny, tiny_ids, tiny_ref):
    llm = tiny_llm(tiny, num_kv_blocks=160)
    copies = []
    copy_blocks = llm.runner.copy_blocks
    llm.runner.copy_blocks = lambda pairs: (copies.extend(pairs), copy_blocks(pairs))
    outs = llm.generate(tiny_ids, SamplingParams(n=2, max_tokens=TINY_NEW, **GREEDY), use_tqdm=False)
    assert [len(o.outputs) for o in outs] == [2] * len(tiny_ids)
    assert token_ids(outs, 0) == tiny_ref and token_ids(outs, 1) == tiny_ref
    assert copies  # prompts not a multiple of the block size: the shared last block was copied on write


def test_prefill_logits_match_hf(tiny, tiny_ids):
    model, _ = tiny
    llm = tiny_llm(tiny)
    ids = tiny_ids[9]
    out = llm.generate([ids], SamplingParams(max_tokens=1, logprobs=5, **GREEDY), use_tqdm=False)[0]
    with torch.inference_mode():
        ref = torch.log_softmax(model(torch.tensor([ids], device=model.device)).logits[0, -1].float(), -1)
    lp = out.outputs[0].logprobs[0]
    assert len(lp) == 5 and out.outputs[0].token_ids[0] in lp
    for tok, value in lp.items():
        assert value == pytest.approx(ref[tok].item(), abs=1e-4)
    assert out.outputs[0].cumulative_logprob == pytest.approx(ref.max().item(), abs=1e-4)


# ---------------------------------------------------------------- sampling through the engine
def test_seeded_sampling_does_not_depend_on_the_batch(tiny, tiny_ids):
    target = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=12)
    alone = tiny_llm(tiny).generate([tiny_ids[5]], target, use_tqdm=False)[0].outputs[0].token_ids
    others = [SamplingParams(temperature=0.7, max_tokens=10), SamplingParams(temperature=1.2, seed=7, max_tokens=14),
              SamplingParams(temperature=0, max_tokens=5)]
    prompts = tiny_ids[:5] + [tiny_ids[5]] + tiny_ids[6:9]
    params = [others[i % 3] for i in range(5)] + [target] + [others[i % 3] for i in range(3)]
    for kw in ({}, {"num_kv_blocks": 24, "max_num_batched_tokens": 16}):  # also under preemption + chunking
        outs = tiny_llm(tiny, **kw).generate(prompts, params, use_tqdm=False)
        assert outs[5].outputs[0].token_ids == alone
    unseeded = tiny_llm(tiny).generate([tiny_ids[5]] * 4, SamplingParams(temperature=1.0, max_tokens=12),
                                       use_tqdm=False)
    assert len({tuple(o.outputs[0].token_ids) for o in unseeded}) > 1


def test_stop_token_ids_min_tokens_and_max_tokens(tiny, tiny_ids):
    llm = tiny_llm(tiny)
    ref = llm.generate([tiny_ids[3]], SamplingParams(max_tokens=TINY_NEW, **GREEDY), use_tqdm=False)[0].outputs[0]
    stop_tok = ref.token_ids[4]
    first = ref.token_ids.index(stop_tok)
    out = llm.generate([tiny_ids[3]], SamplingParams(max_tokens=TINY_NEW, stop_token_ids=[stop_tok], **GREEDY),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids == ref.token_ids[: first + 1]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop_tok)
    masked = llm.generate([tiny_ids[3]], SamplingParams(max_tokens=TINY_NEW, min_tokens=first + 3,
                                                        stop_token_ids=[stop_tok], **GREEDY), use_tqdm=False)[0]
    assert stop_tok not in masked.outputs[0].token_ids[: first + 3]
    assert ref.finish_reason == "length" and len(ref.token_ids) == TINY_NEW
    llm.eos_token_ids = (stop_tok,)  # pretend it is EOS: stops there with stop_reason None ...
    eos = llm.generate([tiny_ids[3]], SamplingParams(max_tokens=TINY_NEW, **GREEDY), use_tqdm=False)[0].outputs[0]
    assert eos.token_ids == ref.token_ids[: first + 1] and (eos.finish_reason, eos.stop_reason) == ("stop", None)
    # ... unless ignore_eos
    ign = llm.generate([tiny_ids[3]], SamplingParams(max_tokens=TINY_NEW, temperature=0, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert ign.token_ids == ref.token_ids and ign.finish_reason == "length"


def test_stop_strings_are_cut_from_the_text(smol):
    llm = LLM(*smol, num_kv_blocks=16)
    prompt = "The capital of France is"
    ref = llm.generate(prompt, SamplingParams(max_tokens=12, **GREEDY), use_tqdm=False)[0].outputs[0]
    words = ref.text.split()
    assert len(words) >= 3, ref.text
    stop = words[2]
    out = llm.generate(prompt, SamplingParams(max_tokens=12, stop=[stop, "@@never@@"], **GREEDY), use_tqdm=False)[0]
    c = out.outputs[0]
    assert c.text == ref.text[: ref.text.find(stop)]
    assert (c.finish_reason, c.stop_reason) == ("stop", stop)
    keep = llm.generate(prompt, SamplingParams(max_tokens=12, stop=stop, include_stop_str_in_output=True, **GREEDY),
                        use_tqdm=False)[0].outputs[0]
    assert keep.text == ref.text[: ref.text.find(stop) + len(stop)]


# ---------------------------------------------------------------- reliability
def test_1000_short_requests_under_a_tenth_of_their_kv_demand(tiny):
    rng = random.Random(1)
    prompts = [[rng.randrange(3, 512) for _ in range(rng.randint(1, 12))] for _ in range(1000)]
    params = [SamplingParams(max_tokens=rng.randint(4, 12), **GREEDY) for _ in prompts]
    demand = sum(-(-(len(p) + sp.max_tokens) // 4) for p, sp in zip(prompts, params))
    small = tiny_llm(tiny, num_kv_blocks=demand // 10, max_num_seqs=256, max_num_batched_tokens=1024)
    big = tiny_llm(tiny, num_kv_blocks=demand + 64, max_num_seqs=256, max_num_batched_tokens=4096)
    got = small.generate(prompts, params, use_tqdm=False)
    want = big.generate(prompts, params, use_tqdm=False)
    assert all(o.finished for o in got)
    assert token_ids(got) == token_ids(want)
    stats = small.stats()
    assert stats.num_preemptions > 0 and stats.num_blocks_used == 0 and not small.has_unfinished_requests()


def test_abort_mid_generation_frees_every_block(tiny, tiny_ids):
    llm = tiny_llm(tiny, num_kv_blocks=64)
    ids = [llm.add_request(p, SamplingParams(max_tokens=30, n=n, **GREEDY))
           for p, n in zip(tiny_ids[8:12], (1, 2, 1, 1))]
    for _ in range(4):
        llm.step()
    assert llm.stats().num_blocks_used > 0
    assert llm.abort(ids[1]) and llm.abort(ids[2])  # one with n=2 (forked), one plain
    assert not llm.abort(ids[1]) and not llm.abort("no-such-request")
    assert llm.block_manager.num_used_blocks == blocks_held_by_running(llm)
    finished = {}
    while llm.has_unfinished_requests():
        for o in llm.step():
            finished[o.request_id] = o
    assert set(finished) >= {ids[0], ids[3]} and not {ids[1], ids[2]} & {r for r, o in finished.items() if o.finished}
    assert llm.stats().num_blocks_used == 0 and llm.block_manager.num_free_blocks == 64
    # a request aborted while still waiting holds nothing either
    rid = llm.add_request(tiny_ids[0])
    assert llm.abort(rid) and llm.stats().num_waiting == 0


def test_bad_requests_are_rejected_and_do_not_disturb_running_ones(tiny, tiny_ids):
    params = SamplingParams(max_tokens=12, **GREEDY)
    ref = token_ids(tiny_llm(tiny).generate(tiny_ids[:6], params, use_tqdm=False))
    llm = tiny_llm(tiny, num_kv_blocks=40, max_model_len=200, max_num_seqs=8)
    ids = [llm.add_request(p, params) for p in tiny_ids[:6]]
    llm.step()
    llm.step()
    bad = [
        (dict(prompt=[1] * 201), ValueError, "more than max_model_len=200"),
        (dict(prompt=[1] * 190), ValueError, "the whole KV cache holds 160"),
        (dict(prompt=[5, 512]), ValueError, "prompt token ids must be in [0, 512)"),
        (dict(prompt=[]), ValueError, "the prompt is empty"),
        (dict(prompt=""), ValueError, "the prompt is empty"),
        (dict(prompt=3.5), TypeError, "a prompt must be a string or a list of token ids"),
        (dict(prompt=[1, 2], sampling_params=SamplingParams(n=9)), ValueError, "max_num_seqs=8"),
        (dict(prompt=[1, 2], sampling_params={"temperature": 0}), TypeError,
         "sampling_params must be a SamplingParams"),
        (dict(prompt=[1, 2], request_id=ids[0]), ValueError, "is already running"),
    ]
    for kw, exc, msg in bad:
        with pytest.raises(exc) as e:
            llm.add_request(**kw)
        assert msg in str(e.value), str(e.value)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        llm.generate(tiny_ids[0], SamplingParams(temperature=-1))
    with pytest.raises(ValueError, match="got 2 sampling_params for 1 prompts"):
        llm.generate([tiny_ids[0]], [params, params])
    assert llm.get_num_unfinished_requests() == 6
    done = {}
    while llm.has_unfinished_requests():
        done.update({o.request_id: o for o in llm.step() if o.finished})
    assert [done[i].outputs[0].token_ids for i in ids] == ref


def test_non_finite_logits_end_that_sequence_only(tiny, tiny_ids):
    params = SamplingParams(max_tokens=10, **GREEDY)
    ref = token_ids(tiny_llm(tiny).generate(tiny_ids[:4], params, use_tqdm=False))
    llm = tiny_llm(tiny)
    execute = llm.runner.execute_model
    poisoned = {"1": float("nan"), "2": float("inf")}
    calls = {"n": 0}

    def poison(batch, all_logits=False):
        logits = execute(batch, all_logits)
        calls["n"] += 1
        for row, (seq, _) in enumerate(batch):
            if seq.request_id in poisoned and calls["n"] >= 3:
                logits[row, 7] = poisoned[seq.request_id]
        return logits

    llm.runner.execute_model = poison
    ids = [llm.add_request(p, params) for p in tiny_ids[:4]]
    assert ids == ["0", "1", "2", "3"]
    done = {}
    while llm.has_unfinished_requests():
        done.update({o.request_id: o for o in llm.step() if o.finished})
    for rid in ("1", "2"):
        c = done[rid].outputs[0]
        assert c.finish_reason == "error" and c.token_ids == ref[int(rid)][:2]
    assert [done["0"].outputs[0].token_ids, done["3"].outputs[0].token_ids] == [ref[0], ref[3]]
    assert llm.stats().num_blocks_used == 0


def test_output_stops_at_max_model_len(tiny):
    llm = tiny_llm(tiny, max_model_len=20)
    out = llm.generate([[5] * 15], SamplingParams(max_tokens=50, **GREEDY), use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 5


# ---------------------------------------------------------------- API
def test_generate_accepts_strings_token_lists_and_per_prompt_params(tiny):
    llm = tiny_llm(tiny)
    _, tok = tiny
    a = llm.generate("hello there", SamplingParams(max_tokens=4, **GREEDY), use_tqdm=False)
    b = llm.generate(tok("hello there").input_ids, SamplingParams(max_tokens=4, **GREEDY), use_tqdm=False)
    assert len(a) == len(b) == 1 and a[0].outputs[0].token_ids == b[0].outputs[0].token_ids
    assert a[0].prompt == "hello there" and b[0].prompt is None
    outs = llm.generate(["x", "y y", {"prompt_token_ids": [9, 9, 9]}],
                        [SamplingParams(max_tokens=k, **GREEDY) for k in (1, 2, 3)], use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [1, 2, 3]
    assert isinstance(outs[0], RequestOutput) and isinstance(outs[0].outputs[0], CompletionOutput)
    assert outs[0].outputs[0].text == tok.decode(outs[0].outputs[0].token_ids, skip_special_tokens=True)


def test_request_metrics_and_stats(tiny, tiny_ids):
    llm = tiny_llm(tiny, num_kv_blocks=64)
    ids = [llm.add_request(p, SamplingParams(max_tokens=6, **GREEDY)) for p in tiny_ids[4:8]]
    llm.step()
    s = llm.stats()
    assert isinstance(s, EngineStats) and s.num_running == 4 and s.num_waiting == 0
    assert s.num_blocks_used + s.num_blocks_free == s.num_blocks_total == 64
    assert 0 < s.kv_utilization <= 1 and s.kv_cache_usage == s.num_blocks_used / 64
    final = {}
    while llm.has_unfinished_requests():
        final.update({o.request_id: o for o in llm.step() if o.finished})
    m = final[ids[0]].metrics
    assert m.num_prompt_tokens == len(tiny_ids[4]) and m.num_output_tokens == 6 == len(m.token_times)
    assert m.arrival_time <= m.first_token_time <= m.token_times[-1] <= m.finish_time
    assert m.ttft > 0 and m.tpot > 0 and len(m.itl) == 5
    s = llm.stats()
    assert s.num_generated_tokens == 24 and s.num_steps == 6 and s.num_blocks_used == 0


def test_stream_yields_the_same_text_and_frees_blocks_when_closed(smol):
    llm = LLM(*smol, num_kv_blocks=16)
    params = SamplingParams(max_tokens=10, **GREEDY)
    full = llm.generate("Tell me about Paris.", params, use_tqdm=False)[0].outputs[0].text
    pieces = list(llm.stream("Tell me about Paris.", params))
    assert len(pieces) > 1 and "".join(pieces) == full
    # a stop string is never streamed, not even its first characters
    words = full.split()
    stop_params = SamplingParams(max_tokens=10, stop=words[-2], **GREEDY)
    cut = llm.generate("Tell me about Paris.", stop_params, use_tqdm=False)[0].outputs[0].text
    assert "".join(llm.stream("Tell me about Paris.", stop_params)) == cut == full[: full.find(words[-2])]
    it = llm.stream("Tell me about Paris.", params)
    next(it)
    it.close()
    assert not llm.has_unfinished_requests() and llm.stats().num_blocks_used == 0


def test_chat_uses_the_template(smol):
    llm = LLM(*smol, num_kv_blocks=32)
    msgs = [{"role": "user", "content": "Say hi."}]
    outs = llm.chat([msgs, msgs + [{"role": "assistant", "content": "Hi!"}, {"role": "user", "content": "Again."}]],
                    SamplingParams(max_tokens=6, **GREEDY), use_tqdm=False)
    assert len(outs) == 2 and all(o.outputs[0].text for o in outs)
    assert "Say hi." in outs[0].prompt and outs[0].prompt.rstrip().endswith("assistant")
    from npukit.chat import apply_chat_template
    assert outs[0].prompt_token_ids == apply_chat_template(smol[1], msgs)
    single = llm.chat(msgs, SamplingParams(max_tokens=6, **GREEDY), use_tqdm=False)
    assert token_ids(single) == token_ids(outs[:1])


def test_progress_bar(tiny, capsys):
    tiny_llm(tiny).generate(["a", "b"], SamplingParams(max_tokens=2), use_tqdm=True)
    assert "Processed prompts" in capsys.readouterr().err


def test_errors_surface_from_the_loader_and_the_runner(tiny):
    from transformers import GPT2Config, GPT2LMHeadModel

    from npukit.loading import ModelLoadError

    with pytest.raises(ModelLoadError, match="unknown model 'no-such-model-xyz'"):
        LLM("no-such-model-xyz", device="cpu")
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=64))
    with pytest.raises(UnsupportedModelError, match="model.generate"):
        LLM(gpt2, tiny[1], num_kv_blocks=8)
    with pytest.raises(ValueError, match="also needs its tokenizer"):
        LLM(tiny[0])
    with pytest.raises(ValueError, match="without chunked prefill a whole prompt must fit one step"):
        LLM(*tiny, num_kv_blocks=8, max_model_len=512, max_num_batched_tokens=64, enable_chunked_prefill=False)


def test_kv_cache_is_sized_from_memory_when_num_kv_blocks_is_none(tiny):
    from npukit.engine.kv_cache import kv_bytes_per_block

    llm = LLM(*tiny, block_size=16, max_num_seqs=4, kv_cache_memory_fraction=0.01)
    cfg = llm.config
    assert cfg.max_model_len == tiny[0].config.max_position_embeddings
    # capped at what max_num_seqs sequences of max_model_len tokens can use
    assert 0 < cfg.num_kv_blocks <= 4 * cfg.max_model_len // 16
    assert llm.runner.kv_cache.num_bytes == cfg.num_kv_blocks * kv_bytes_per_block(tiny[0].config, 16, torch.float32)
    assert llm.generate("hi", SamplingParams(max_tokens=3), use_tqdm=False)[0].outputs[0].token_ids


def test_server_style_engine_loop_in_a_thread(tiny, tiny_ids):
    """add_request from one thread, step() in an engine-loop thread (how the OpenAI server drives it)."""
    import queue
    import threading

    params = SamplingParams(max_tokens=8, **GREEDY)
    ref = token_ids(tiny_llm(tiny).generate(tiny_ids[:6], params, use_tqdm=False))
    llm = tiny_llm(tiny, num_kv_blocks=32)
    results: queue.Queue = queue.Queue()
    stop = threading.Event()

    def loop():
        while not stop.is_set():
            for o in llm.step():
                if o.finished:
                    results.put(o)
            if not llm.has_unfinished_requests():
                stop.wait(0.001)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        ids = [llm.add_request(p, params, request_id=f"req-{i}") for i, p in enumerate(tiny_ids[:6])]
        got = {}
        while len(got) < len(ids):
            o = results.get(timeout=60)
            got[o.request_id] = o.outputs[0].token_ids
    finally:
        stop.set()
        thread.join(timeout=10)
    assert [got[i] for i in ids] == ref and llm.stats().num_blocks_used == 0
