"""Graph mode (enforce_eager=False, npukit.engine.graph): greedy tokens equal eager (fp32) whatever the batch,
padding to capture sizes is counted, larger batches and prefills run eager, no recompiles as contexts grow,
and every failure falls back to eager with a warning. On CPU both backends: the replay of bound kernel calls
(npukit.engine.cpu_graph, fp32 / bf16: the eager step's bits) and torch.compile (inductor, NPUKIT_CPU_GRAPHS=inductor).
Device: $NPUKIT_TEST_DEVICE (default cpu, see conftest)."""
import copy
import logging
import random

import pytest
import torch

from conftest import TEST_DEVICE
from npukit.engine import LLM, SamplingParams, cpu_graph
from npukit.engine import graph as graph_mod
from npukit.engine.config import EngineConfig
from npukit.engine.graph import CPU_BACKEND_ENV, GraphRunner, GraphStats, padded_size
from npukit.engine.runner import ModelRunner

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py
SIZES = [1, 2, 4]  # few sizes: each costs a compilation on CPU (shared by every engine of the tiny model here)
cpu_only = pytest.mark.skipif(TEST_DEVICE != "cpu", reason="the CPU backends (replay, inductor)")
# the backend graph mode picks on the test device for the fp32 tiny model
BACKEND = {"cpu": "cpu-replay", "cuda": "cuda-graph"}.get(TEST_DEVICE)


@pytest.fixture(scope="module")
def prompts():
    rng = random.Random(1)
    shared = [rng.randrange(3, 512) for _ in range(12)]
    lengths = [1, 3, 5, 8, 13, 17, 24, 31]
    out = [[rng.randrange(3, 512) for _ in range(n)] for n in lengths]
    out[5:8] = [shared + [rng.randrange(3, 512) for _ in range(k)] for k in (0, 2, 9)]  # a shared prefix
    return out


def params(n: int, base: int = 6) -> list[SamplingParams]:
    """Different lengths, so the decode batch shrinks step by step (4 -> 3 -> 2 -> 1: padded sizes 4, 4, 2, 1)."""
    return [SamplingParams(temperature=0.0, max_tokens=base + 2 * (i % 4)) for i in range(n)]


def engine(tiny, **kw):
    return LLM(*tiny, **{"num_kv_blocks": 128, "block_size": 4, **kw})


def generate(llm, prompts):
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params(len(prompts)), use_tqdm=False)]


@pytest.fixture(scope="module")
def graphs(tiny):
    """A graph-mode engine of the tiny model (compiles SIZES once for the module)."""
    return engine(tiny, enforce_eager=False, compile_sizes=SIZES, max_num_seqs=4)


def graph_engine(tiny, backend: str | None, **kw):
    """A graph-mode engine; backend "inductor": torch.compile on CPU even where the replay runs."""
    with pytest.MonkeyPatch.context() as mp:
        if backend == "inductor":
            mp.setenv(CPU_BACKEND_ENV, "inductor")
        return engine(tiny, enforce_eager=False, **kw)


def test_padded_size():
    assert [padded_size(n, SIZES) for n in (1, 2, 3, 4, 5)] == [1, 2, 4, 4, None]


@pytest.mark.parametrize("backend", [None, pytest.param("inductor", marks=cpu_only)])
@pytest.mark.parametrize("case, kw", [
    ("decode batches of 4, 3, 2, 1", {"max_num_seqs": 4}),
    ("prefix caching + chunked prefill", {"max_num_seqs": 4, "max_num_batched_tokens": 7}),
    ("more decodes than the largest size", {"max_num_seqs": 8}),
])
def test_greedy_tokens_equal_eager(tiny, prompts, case, kw, backend):
    eager = generate(engine(tiny, **kw), prompts)
    llm = graph_engine(tiny, backend, compile_sizes=SIZES, **kw)
    assert generate(llm, prompts) == eager
    s = llm.graph_stats
    assert s.backend == (backend or BACKEND or s.backend) and s.fallback_reason is None and s.num_graph_steps > 0
    if kw["max_num_seqs"] == 8:  # 8 decodes > 4: eager until the batch shrinks to 4
        assert s.num_eager_steps > len(prompts) // 4
    if "max_num_batched_tokens" in kw:
        assert llm.stats().prefix_cache_hit_rate > 0


def test_one_at_a_time_equals_eager_and_logits_match(tiny, prompts, graphs):
    eager = engine(tiny)
    assert [generate(graphs, [p]) for p in prompts[:3]] == [generate(eager, [p]) for p in prompts[:3]]
    sp = SamplingParams(temperature=0.0, max_tokens=4, logprobs=3)
    a = graphs.generate([prompts[4]], sp, use_tqdm=False)[0].outputs[0].logprobs
    b = eager.generate([prompts[4]], sp, use_tqdm=False)[0].outputs[0].logprobs
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        assert all(x[t] == pytest.approx(y[t], abs=1e-4) for t in x)


def test_padding_is_counted_per_step(graphs, prompts):
    steps = []
    graphs.step_hooks.append(steps.append)
    before = GraphStats(**{k: v for k, v in vars(graphs.graph_stats).items() if k != "steps_per_size"})
    try:
        generate(graphs, prompts[:4])
    finally:
        graphs.step_hooks.clear()
    s = graphs.graph_stats
    graph_steps = [t for t in steps if t.capture_size is not None]
    assert graph_steps and all(t.num_decodes == t.num_entries for t in graph_steps)
    assert all(t.capture_size == padded_size(t.num_decodes, SIZES) for t in graph_steps)
    assert all(t.padded_rows == t.capture_size - t.num_decodes for t in graph_steps)
    assert {t.num_decodes for t in graph_steps} == {4, 3, 2, 1}  # max_tokens 6, 8, 10, 12
    assert any(t.padded_rows == 1 for t in graph_steps)  # 3 decodes ran at size 4
    assert s.num_padded_rows - before.num_padded_rows == sum(t.padded_rows for t in graph_steps)
    assert s.num_graph_steps - before.num_graph_steps == len(graph_steps)
    assert all(t.capture_size is None for t in steps if t.num_decodes < t.num_entries)  # prefill steps: eager
    assert 0 < s.padding_waste < 0.5 and graphs.stats().graph is s


@cpu_only
def test_no_recompilation_as_contexts_grow(tiny, prompts):
    from torch._dynamo.utils import counters

    llm = graph_engine(tiny, "inductor", compile_sizes=SIZES, max_num_seqs=4)
    generate(llm, prompts[:2])  # every size used once already (compiled at start-up)
    before = counters["stats"]["unique_graphs"]
    long = [p * 3 for p in prompts[4:8]]  # longer contexts, more blocks per sequence
    generate(llm, long)
    assert counters["stats"]["unique_graphs"] == before
    assert llm.graph_stats.compile_seconds > 0 and llm.graph_stats.backend == "inductor"


def test_compile_seconds_and_backend(graphs):
    s = graphs.graph_stats
    assert s.capture_sizes == SIZES and s.compile_seconds > 0
    assert s.backend == (BACKEND or s.backend)


def test_sizes_above_max_num_seqs_are_skipped(tiny):
    llm = engine(tiny, enforce_eager=False, compile_sizes=SIZES, max_num_seqs=2)
    assert llm.graph_stats.capture_sizes == [1, 2]


@cpu_only
def test_compile_failure_falls_back_to_eager_with_a_warning(tiny, prompts, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("inductor exploded")

    monkeypatch.setattr(graph_mod, "_COMPILED", {})
    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setenv(CPU_BACKEND_ENV, "inductor")
    with caplog.at_level(logging.WARNING, logger="npukit.engine.graph"):
        llm = engine(tiny, enforce_eager=False, compile_sizes=SIZES, max_num_seqs=4)
    assert "inductor exploded" in caplog.text and "eager" in caplog.text
    assert llm.graph_stats.backend == "eager" and "inductor exploded" in llm.graph_stats.fallback_reason
    assert generate(llm, prompts[:4]) == generate(engine(tiny, max_num_seqs=4), prompts[:4])


def test_a_failing_graph_step_reruns_eager_and_stays_eager(tiny, prompts, caplog):
    llm = engine(tiny, enforce_eager=False, compile_sizes=SIZES, max_num_seqs=4)
    calls = []

    def broken(*args):
        calls.append(1)
        raise RuntimeError("graph replay failed")

    llm.runner.graph.steps = {size: broken for size in SIZES}
    with caplog.at_level(logging.WARNING, logger="npukit.engine.graph"):
        out = generate(llm, prompts[:4])
    assert out == generate(engine(tiny, max_num_seqs=4), prompts[:4])
    assert len(calls) == 1 and "graph replay failed" in caplog.text  # tried once, then eager for good
    assert llm.graph_stats.backend == "eager" and llm.graph_stats.num_graph_steps == 0


@cpu_only
def test_no_cpp_compiler_says_how_to_get_one(tiny, monkeypatch, caplog):
    monkeypatch.setattr(graph_mod, "cpp_compiler", lambda: None)
    monkeypatch.setenv(CPU_BACKEND_ENV, "inductor")  # NOTE: without a compiler the replay's C kernels fail too
    with caplog.at_level(logging.WARNING, logger="npukit.engine.graph"):
        llm = engine(tiny, enforce_eager=False, compile_sizes=SIZES)
    assert "apt-get install g++" in caplog.text and llm.graph_stats.backend == "eager"
    assert generate(llm, [[5, 6, 7]])  # still generates


def test_enforce_eager_is_the_default_and_has_no_graphs(tiny):
    llm = engine(tiny)
    assert llm.config.enforce_eager is True and llm.runner.graph is None and llm.stats().graph is None


@pytest.mark.parametrize("kw, words", [
    ({"compile_sizes": [0, 1]}, "positive ints"),
    ({"compile_sizes": [4, 2]}, "sorted and unique"),
    ({"compile_sizes": [1, 1]}, "sorted and unique"),
    ({"compile_sizes": []}, "non-empty"),
    ({"compile_sizes": "1,2"}, "list of positive ints"),
    ({"compile_sizes": [1.5]}, "positive ints"),
    ({"enforce_eager": "no"}, "enforce_eager must be True or False"),
])
def test_bad_settings_raise(kw, words):
    with pytest.raises(ValueError, match=words):
        EngineConfig(**kw)


def test_graduate_maps_graph_mode():
    from npukit.graduate import graduate

    eager = graduate(EngineConfig(), "Qwen/Qwen3-0.6B", device="cuda")
    assert "--enforce-eager" in eager.serve_args and "--compilation-config" not in eager.serve_args
    assert any("--no-enforce-eager" in n for n in eager.notes)
    g = graduate(EngineConfig(enforce_eager=False, compile_sizes=[1, 2, 4, 8]), "Qwen/Qwen3-0.6B", device="cuda")
    i = g.serve_args.index("--compilation-config")
    assert g.serve_args[i + 1] == '{"cudagraph_capture_sizes": [1, 2, 4, 8]}' and "--enforce-eager" not in g.serve_args
    npu = graduate(EngineConfig(enforce_eager=False, compile_sizes=[1, 2]), "Qwen/Qwen3-0.6B", device="npu")
    assert any("ACL graph" in n and "graph_batch_sizes" in n for n in npu.notes)
    duo = graduate(EngineConfig(enforce_eager=False), "Qwen/Qwen3-0.6B", device="npu", chip="310P")
    assert duo.serve_args.count("--enforce-eager") == 1 and "--compilation-config" not in duo.serve_args


@pytest.mark.slow
@pytest.mark.skipif(TEST_DEVICE != "cpu", reason="SmolLM2's weights are a CPU fixture (not on a lent GPU machine)")
def test_smollm2_graph_greedy_equals_eager(smol):
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]
    sp = [SamplingParams(temperature=0.0, max_tokens=n) for n in (6, 8, 10)]
    kw = {"num_kv_blocks": 32, "block_size": 16, "max_num_seqs": 2}
    eager = [o.outputs[0].token_ids for o in LLM(*smol, **kw).generate(prompts, sp, use_tqdm=False)]
    llm = LLM(*smol, enforce_eager=False, compile_sizes=[1, 2], **kw)
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, sp, use_tqdm=False)] == eager
    assert llm.graph_stats.num_graph_steps > 0 and llm.graph_stats.fallback_reason is None


@cpu_only
@pytest.mark.parametrize("backend", ["cpu-replay", "inductor"])
@pytest.mark.parametrize("method,kernel", [("w8a16", "int8pack"), ("w8a16", "int8pack_bf16"), ("w8a16", "dequant"),
                                           ("w8a16", "panel"), ("w8a8", "int_mm"), ("w8a8", "dequant")])
def test_graph_mode_on_a_quantised_model_equals_eager(prompts, method, kernel, backend):
    """The graphs call the quantised linears (npukit.quant.QuantLinear) like the eager step does, with every CPU
    kernel (each one forced: the probe picks by timing): the replay binds the panel kernel and calls the others
    as eager does; inductor traced int_mm into garbage at batch 1 and did not compile int8pack_bf16, so under
    it they run as one opaque op (npukit.quant.kernels.int8_linear)."""
    import npukit
    from npukit.engine import cpu_gemm
    from npukit.quant import quantize_model

    if kernel == "panel" and cpu_gemm._panel_gemm() is None:
        pytest.skip("no C compiler here")
    model, tok = npukit.load_model("tiny-llama", device="cpu", dtype="float32")  # its own copy: quantised in place
    quantize_model(model, method, tokenizer=tok, kernel=kernel)
    eager = generate(engine((model, tok), max_num_seqs=2), prompts[:4])
    llm = graph_engine((model, tok), backend, compile_sizes=[1, 2], max_num_seqs=2)
    assert generate(llm, prompts[:4]) == eager
    s = llm.graph_stats
    assert s.backend == backend and s.fallback_reason is None and s.num_graph_steps > 0


@cpu_only
@pytest.mark.parametrize("backend", ["cpu-replay", "inductor"])
@pytest.mark.parametrize("kernel", ["packed", "swapped", "panel"])
def test_graphs_run_the_cpu_kernels_the_probe_chose(tiny, prompts, monkeypatch, kernel, backend):
    """fp32 on CPU the runner's linears are CpuLinears (npukit.engine.cpu_gemm); the replay calls each as eager
    does (the panel kernel bound), inside the compiled pieces each runs as the opaque op npukit::cpu_linear (dynamo
    cannot trace oneDNN's packed weight), with the same kernel as eager: the same tokens."""
    from npukit.engine import cpu_gemm

    if tiny[0].dtype != torch.float32:
        pytest.skip("the CPU kernels are for fp32")
    monkeypatch.setattr(cpu_gemm, "_timed", lambda k, run, xs: 0.5 if k == kernel else 1.0)
    monkeypatch.setattr(cpu_gemm, "_cache", {})
    packed_calls = []
    real_packed = cpu_gemm.packed_linear
    monkeypatch.setattr(cpu_gemm, "packed_linear", lambda *a: packed_calls.append(1) or real_packed(*a))
    first = engine(tiny, max_num_seqs=2)
    del packed_calls[:]  # the probe's own
    eager = generate(first, prompts[:4])
    eager_calls = len(packed_calls)
    llm = graph_engine(tiny, backend, compile_sizes=[1, 2], max_num_seqs=2)
    assert llm.runner.layers[0].o_w.kernels[1] == kernel and llm.graph_stats.backend == backend
    del packed_calls[:]
    assert generate(llm, prompts[:4]) == eager
    s = llm.graph_stats
    assert s.fallback_reason is None and s.num_graph_steps > 0
    assert len(packed_calls) == eager_calls and (eager_calls > 0) == (kernel == "packed")  # graph steps too


def _decode_steps(model, sizes, steps: int = 3, seed: int = 0) -> list[list[torch.Tensor]]:
    """Logits of `steps` decode steps of batches of each size, from an eager runner and one with graph mode over
    `sizes` (each its own KV cache, the same sequences and block tables): [eager, graph] per step."""
    from test_runner import BLOCK, _Blocks

    rng = random.Random(seed)
    runners = [ModelRunner(model, block_size=BLOCK, num_kv_blocks=256) for _ in range(2)]
    runners[1].graph = GraphRunner(runners[1], list(sizes))
    assert runners[1].graph.stats.backend == "cpu-replay", runners[1].graph.stats.fallback_reason
    blocks, out = _Blocks(256, seed), []
    for b in sizes:
        prompts = [[rng.randrange(3, 300) for _ in range(3 + 5 * i)] for i in range(b)]
        seqs = [blocks.seq(p, len(p) + steps) for p in prompts]
        for r in runners:
            r.execute_model([(s, len(s.token_ids)) for s in seqs])
        for _ in range(steps):
            for s in seqs:
                s.num_computed_tokens = len(s.token_ids)
                s.token_ids.append(rng.randrange(3, 300))
            out.append([r.execute_model([(s, 1) for s in seqs]) for r in runners])
        assert runners[1].graph.stats.last_capture_size == b
    return out


@cpu_only
@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "mistral", "llama3-rope", "gelu"])
@pytest.mark.parametrize("kernel", [None, "packed", "swapped", "linear"])
def test_cpu_replay_gives_the_eager_steps_bits(arch, kernel, monkeypatch):
    """The replay (npukit.engine.cpu_graph) makes the eager step's calls in the eager layout: logits equal bit for
    bit at every capture size, for every supported family (q/k/v biases, Qwen3's q/k norms, sliding windows, a
    non-SiLU MLP) and whichever kernel the probe picks (the panel kernel bound, the others called as eager does:
    oneDNN packed, the transposed result of "swapped", F.linear)."""
    from test_runner import _tiny_config_model, tiny_arch_models
    from transformers import LlamaConfig, LlamaForCausalLM

    from npukit.engine import cpu_gemm

    if kernel is not None:  # every linear on one kernel (the probe picks by timing)
        monkeypatch.setattr(cpu_gemm, "_timed", lambda k, run, xs: 0.5 if k == kernel else 1.0)
        monkeypatch.setattr(cpu_gemm, "_cache", {})
    if arch == "gelu":
        model = _tiny_config_model(LlamaConfig, LlamaForCausalLM, hidden_act="gelu_pytorch_tanh")
    else:
        model = tiny_arch_models()[arch]
    for eager, graph in _decode_steps(model, SIZES):
        assert torch.equal(eager, graph)


@cpu_only
@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "mistral"])
def test_cpu_replay_in_bf16_gives_the_eager_steps_bits(arch):
    """bf16: the replay binds the bf16 C kernels (norms, RoPE, attention) and makes the fused panel calls, which
    widen their rows, as eager makes them: the same bits."""
    from test_runner import tiny_arch_models

    model = copy.deepcopy(tiny_arch_models()[arch]).to(torch.bfloat16)
    for eager, graph in _decode_steps(model, SIZES):
        assert torch.equal(eager, graph)


@cpu_only
def test_cpu_replay_only_where_its_kernels_run(tiny, monkeypatch):
    """The replay needs fp32 or bf16 and npukit's C kernels; elsewhere graph mode on CPU compiles with inductor."""
    from npukit.engine import cpu_ops

    model = tiny[0]
    runner = ModelRunner(model, block_size=4, num_kv_blocks=16)
    assert cpu_graph.supports(runner)
    monkeypatch.setattr(cpu_ops, "_ops", lambda: None)  # NPUKIT_CPU_OPS=0 or no compiler
    assert not cpu_graph.supports(runner)
    with pytest.raises(ValueError, match="float32 or bfloat16 CPU runner"):
        cpu_graph.CpuGraph(runner, 1)
    monkeypatch.undo()
    for dtype, replays in ((torch.bfloat16, True), (torch.float16, False)):
        other = ModelRunner(type(model)(model.config).to(dtype).eval(), block_size=4, num_kv_blocks=16)
        assert cpu_graph.supports(other) == replays
