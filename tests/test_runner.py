"""The paged runner against Hugging Face: same logits (fp32, 2.5e-4), same greedy tokens."""
from __future__ import annotations

import copy
import dataclasses
import random

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from npukit.engine import cpu_gemm
from npukit.engine.cpu_gemm import CpuLinear, FusedLinear
from npukit.engine.kv_cache import kv_bytes_per_block
from npukit.engine.runner import ModelRunner, UnsupportedModelError, _linear, _row_parallel
from npukit.engine.sequence import Sequence
from npukit.quant import QuantLinear, quantize_model
from npukit.quant.kernels import KernelPlan

BLOCK = 4  # small blocks so every prompt spans several, non-contiguous ones
# NOTE: both sides are fp32 and each is ~1e-4 off float64 on SmolLM2's logits (HF 1.1e-4, the runner with oneDNN's
# packed matmul 1.5e-4: npukit.engine.cpu_gemm), so they may differ by the sum.
ATOL = 2.5e-4


def _tiny_config_model(cls_cfg, cls_model, **extra):
    torch.manual_seed(0)
    cfg = cls_cfg(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, **extra)
    return cls_model(cfg).eval()


@pytest.fixture(scope="module")
def arch_models():
    return tiny_arch_models()


def tiny_arch_models() -> dict:
    """Random tiny models of each supported family, built from configs in well under a second."""
    return {
        "qwen2": _tiny_config_model(Qwen2Config, Qwen2ForCausalLM),  # q/k/v bias
        "qwen3": _tiny_config_model(Qwen3Config, Qwen3ForCausalLM, head_dim=16),  # q_norm / k_norm
        "mistral": _tiny_config_model(MistralConfig, MistralForCausalLM, sliding_window=6),
        "llama3-rope": _tiny_config_model(LlamaConfig, LlamaForCausalLM, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    }


class _Blocks:
    """Hands out shuffled block ids, so tables are never contiguous (proves the paging)."""

    def __init__(self, num_blocks: int, seed: int = 0):
        self.free = list(range(num_blocks))
        random.Random(seed).shuffle(self.free)

    def seq(self, token_ids: list[int], max_len: int) -> Sequence:
        s = Sequence(request_id=f"r{len(self.free)}", token_ids=list(token_ids), sampling_params=None)
        s.block_table = [self.free.pop() for _ in range((max_len + BLOCK - 1) // BLOCK)]
        return s


def _prompts(vocab: int, lengths, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def _hf_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0].float()


def _greedy(runner: ModelRunner, seqs: list[Sequence], steps: int) -> list[list[int]]:
    """Prefill all, then decode all together; the test plays the engine (advances num_computed_tokens)."""
    logits = runner.execute_model([(s, len(s.token_ids)) for s in seqs])
    for _ in range(steps):
        for s, row in zip(seqs, logits):
            s.num_computed_tokens = len(s.token_ids)
            s.token_ids.append(int(row.argmax()))
        logits = runner.execute_model([(s, 1) for s in seqs])
    return [s.token_ids[s.num_prompt_tokens:] for s in seqs]


def _hf_greedy(model, ids: list[int], steps: int) -> list[int]:
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=steps, min_new_tokens=steps, do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


def _check_prefill(model, lengths, num_blocks=128, sdpa=False):
    """sdpa: prefill attention by SDPA per chunk, what runs without the CPU prefill kernel (other devices)."""
    runner = ModelRunner(model, block_size=BLOCK, num_kv_blocks=num_blocks)
    if sdpa:
        runner.prefill_kernel = None
    blocks = _Blocks(num_blocks)
    prompts = _prompts(model.config.vocab_size, lengths)
    seqs = [blocks.seq(p, len(p)) for p in prompts]
    logits = runner.execute_model([(s, len(s.token_ids)) for s in seqs], all_logits=True)
    assert logits.dtype == torch.float32 and logits.shape == (sum(lengths), model.config.vocab_size)
    ref = torch.cat([_hf_logits(model, p) for p in prompts])
    torch.testing.assert_close(logits, ref, atol=ATOL, rtol=0)
    last = runner.execute_model([(s, len(s.token_ids)) for s in seqs])
    ends = torch.tensor(lengths).cumsum(0) - 1
    torch.testing.assert_close(last, ref[ends], atol=ATOL, rtol=0)


def test_prefill_logits_match_hf_tiny(tiny):
    _check_prefill(tiny[0], [1, 7, 30, 13])


@pytest.mark.slow
def test_prefill_logits_match_hf_smollm2(smol):
    _check_prefill(smol[0], [5, 40, 17])


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "mistral", "llama3-rope"])
@pytest.mark.parametrize("sdpa", [False, True])
def test_prefill_logits_match_hf_other_architectures(arch_models, arch, sdpa):
    _check_prefill(arch_models[arch], [3, 20, 11], sdpa=sdpa)


def _check_chunked(model, length=29, chunks=(1, 8, 5, 15), sdpa=False):
    assert sum(chunks) == length
    blocks = _Blocks(64)
    (prompt,) = _prompts(model.config.vocab_size, [length], seed=1)
    runner = ModelRunner(model, block_size=BLOCK, num_kv_blocks=64)
    if sdpa:  # see _check_prefill
        runner.prefill_kernel = None
    whole = runner.execute_model([(blocks.seq(prompt, length), length)], all_logits=True)
    seq = blocks.seq(prompt, length)
    parts = []
    for n in chunks:
        parts.append(runner.execute_model([(seq, n)], all_logits=True))
        assert seq.num_computed_tokens == sum(p.shape[0] for p in parts) - n, "runner must not mutate seq"
        seq.num_computed_tokens += n
    torch.testing.assert_close(torch.cat(parts), whole, atol=ATOL, rtol=0)
    torch.testing.assert_close(whole, _hf_logits(model, prompt), atol=ATOL, rtol=0)


def test_chunked_prefill_equals_one_prefill(tiny):
    _check_chunked(tiny[0])


@pytest.mark.parametrize("arch", ["qwen3", "mistral"])
@pytest.mark.parametrize("sdpa", [False, True])
def test_chunked_prefill_other_architectures(arch_models, arch, sdpa):
    _check_chunked(arch_models[arch], sdpa=sdpa)  # mistral: the window (6) cuts through chunks


def test_greedy_decode_matches_hf_generate_tiny(tiny):
    model = tiny[0]
    steps = 12
    prompts = _prompts(model.config.vocab_size, [3, 9, 17])
    blocks = _Blocks(64)
    runner = ModelRunner(model, block_size=BLOCK, num_kv_blocks=64)
    got = _greedy(runner, [blocks.seq(p, len(p) + steps) for p in prompts], steps)
    assert got == [_hf_greedy(model, p, steps) for p in prompts]


@pytest.mark.slow
def test_greedy_decode_matches_hf_generate_smollm2(smol):
    model, tok = smol
    steps = 10
    prompts = [tok(t)["input_ids"] for t in ("The capital of France is", "def fibonacci(n):\n   ",
                                              "Once upon a time, in a small village,")]
    blocks = _Blocks(64)
    runner = ModelRunner(model, block_size=BLOCK, num_kv_blocks=64)
    got = _greedy(runner, [blocks.seq(p, len(p) + steps) for p in prompts], steps)
    assert got == [_hf_greedy(model, p, steps) for p in prompts]


@pytest.mark.parametrize("arch", ["qwen2", "mistral"])
def test_greedy_decode_other_architectures(arch_models, arch):
    model = arch_models[arch]
    steps = 8
    prompts = _prompts(model.config.vocab_size, [4, 10], seed=3)
    blocks = _Blocks(64)
    runner = ModelRunner(model, block_size=BLOCK, num_kv_blocks=64)
    got = _greedy(runner, [blocks.seq(p, len(p) + steps) for p in prompts], steps)
    assert got == [_hf_greedy(model, p, steps) for p in prompts]


@pytest.mark.parametrize("sdpa", [False, True])
def test_mixed_batch_equals_separate_calls(tiny, sdpa):
    model = tiny[0]
    runner = ModelRunner(model, block_size=BLOCK, num_kv_blocks=128)
    if sdpa:  # see _check_prefill
        runner.prefill_kernel = None
    blocks = _Blocks(128)
    prompts = _prompts(model.config.vocab_size, [5, 14, 9, 22], seed=2)
    decoding = [blocks.seq(p, len(p)) for p in prompts[:3]]
    for s in decoding:  # prefill all but the last prompt token: those are decoded below
        runner.execute_model([(s, len(s.token_ids) - 1)])
        s.num_computed_tokens = len(s.token_ids) - 1
    fresh = blocks.seq(prompts[3], len(prompts[3]))
    runner.execute_model([(fresh, 6)])  # the first chunk of a chunked prefill; the next one is mixed in
    fresh.num_computed_tokens = 6
    mixed = [(decoding[0], 1), (fresh, 10), (decoding[1], 1), (decoding[2], 1)]
    together = runner.execute_model(mixed, all_logits=True)
    separate = torch.cat([runner.execute_model([entry], all_logits=True) for entry in mixed])
    torch.testing.assert_close(together, separate, atol=ATOL, rtol=0)  # matmul blocking differs with M
    ref = torch.cat([_hf_logits(model, prompts[0])[-1:], _hf_logits(model, prompts[3])[6:16],
                     _hf_logits(model, prompts[1])[-1:], _hf_logits(model, prompts[2])[-1:]])
    torch.testing.assert_close(together, ref, atol=ATOL, rtol=0)


def _force_kernel(runner: ModelRunner, kernel: str) -> None:
    """What the runner does where its CPU probe found a kernel faster than F.linear: here at every row count
    (q/k/v keep F.linear where the kernel gives a transposed view)."""
    def wrap(w, kernels):
        w = w.weight if isinstance(w, CpuLinear) else w
        table = dict.fromkeys(range(1, 1000), kernel) if kernel in kernels else {}
        return CpuLinear(w, table)

    for lw in runner.layers:
        for f in ("q_w", "k_w", "v_w", "o_w", "gate_w", "up_w", "down_w"):
            setattr(lw, f, wrap(getattr(lw, f), cpu_gemm.ROW_KERNELS if f in ("q_w", "k_w", "v_w")
                                else cpu_gemm.KERNELS))
    runner.lm_head_w = wrap(runner.lm_head_w, cpu_gemm.KERNELS)


@pytest.mark.parametrize("chunk_bytes,kernel,sdpa", [(None, None, False), (None, None, True), (1, None, True),
                                                     (None, "swapped", False), (None, "packed", False),
                                                     (None, "panel", False)])
def test_many_decodes_in_length_buckets_match_hf(tiny, chunk_bytes, kernel, sdpa):
    # sdpa: decode attention gathers blocks and runs SDPA in length buckets (what runs without the CPU
    # attention kernel: other devices and dtypes, no C compiler); chunk_bytes=1: every decode sequence gets its
    # own call. kernel: the linears run as (W @ x.T).T or as oneDNN's matmul on packed weights, as the runner
    # does at the row counts where its CPU probe found that faster.
    model = tiny[0]
    lengths = [3, 60, 5, 33, 17, 40, 9, 2, 25, 48, 12, 7]
    assert len(ModelRunner._bucket(sorted((n + BLOCK) // BLOCK for n in lengths)[::-1])) > 1
    runner = ModelRunner(model, block_size=BLOCK, num_kv_blocks=128, decode_chunk_bytes=chunk_bytes)
    if sdpa:
        runner.decode_kernel = None
    if kernel:
        if model.device.type != "cpu" or model.dtype != torch.float32:
            pytest.skip("the CPU kernels are for fp32 linears on the CPU")
        _force_kernel(runner, kernel)
    blocks = _Blocks(128)
    prompts = _prompts(model.config.vocab_size, lengths, seed=4)
    seqs = [blocks.seq(p, len(p)) for p in prompts]
    runner.execute_model([(s, len(s.token_ids) - 1) for s in seqs if len(s.token_ids) > 2])
    runner.execute_model([(s, 1) for s in seqs if len(s.token_ids) == 2])  # 2-token prompts: 1 + 1
    for s in seqs:
        s.num_computed_tokens = len(s.token_ids) - 1
    logits = runner.execute_model([(s, 1) for s in seqs])
    ref = torch.stack([_hf_logits(model, p)[-1] for p in prompts])
    torch.testing.assert_close(logits, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("kernel", ["panel", "swapped", "packed"])
def test_a_bf16_runner_runs_the_cpu_kernels_on_its_own_weights_and_matches_hf(tiny, kernel):
    """bf16 on the CPU the runner's linears are CpuLinears too (the panel kernel reads bf16 panels, its rows widened
    to fp32, one rounding per output as in F.linear), and attention, norms and RoPE npukit's bf16 C kernels: decode
    logits about as close to the fp32 model's as HF's own bf16 forward's, top-1 as often the fp32 model's."""
    if kernel == "panel" and cpu_gemm._panel_gemm() is None:
        pytest.skip("no C compiler here")
    model = copy.deepcopy(tiny[0]).to(torch.bfloat16)
    runner = ModelRunner(model, block_size=BLOCK, num_kv_blocks=128)
    try:
        _force_kernel(runner, kernel)
    except RuntimeError as e:  # oneDNN packs bf16 weights only on AVX512 CPUs
        pytest.skip(str(e).splitlines()[0])
    assert runner.layers[0].o_w.kernel_for(1) == kernel and runner.layers[0].o_w.weight.dtype == torch.bfloat16
    blocks = _Blocks(128)
    prompts = _prompts(model.config.vocab_size, [3, 60, 5, 33, 17, 40, 9, 25], seed=4)
    seqs = [blocks.seq(p, len(p)) for p in prompts]
    runner.execute_model([(s, len(s.token_ids) - 1) for s in seqs])
    for s in seqs:
        s.num_computed_tokens = len(s.token_ids) - 1
    logits = runner.execute_model([(s, 1) for s in seqs]).float()
    hf = torch.stack([_hf_logits(model, p)[-1] for p in prompts]).float()
    fp32 = torch.stack([_hf_logits(tiny[0], p)[-1] for p in prompts])
    ours, hfs = (logits - fp32).abs(), (hf - fp32).abs()
    assert ours.mean() <= 1.5 * hfs.mean() and ours.max() <= 2 * hfs.max()
    top1 = fp32.argmax(-1)
    assert (logits.argmax(-1) == top1).sum() >= (hf.argmax(-1) == top1).sum() - 1  # a near tie may flip either way


def test_bucket_spans_cover_in_order():
    counts = [32, 31, 30, 29, 20, 19, 18, 17, 16, 3, 2, 1]
    spans = ModelRunner._bucket(counts)
    assert spans[0][0] == 0 and spans[-1][1] == len(counts)
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert len(spans) == 3  # 32..29 | 20..16 | 3..1
    assert ModelRunner._bucket([]) == []
    assert ModelRunner._bucket([5]) == [(0, 1)]
    assert ModelRunner._bucket([8, 8, 8, 8, 8], max_blocks_per_call=16) == [(0, 2), (2, 4), (4, 5)]


def test_copy_blocks_copies_every_layer(tiny):
    runner = ModelRunner(tiny[0], block_size=BLOCK, num_kv_blocks=8)
    blocks = _Blocks(8)
    seq = blocks.seq(_prompts(300, [BLOCK])[0], BLOCK)
    runner.execute_model([(seq, BLOCK)])
    src = seq.block_table[0]
    dst = next(b for b in range(8) if b != src)
    cache = runner.kv_cache
    assert all(not torch.equal(k[src], k[dst]) for k in cache.k_caches)
    runner.copy_blocks([(src, dst)])
    for k, v in zip(cache.k_caches, cache.v_caches):
        assert torch.equal(k[src], k[dst]) and torch.equal(v[src], v[dst])
    with pytest.raises(ValueError, match="block ids must be in"):
        runner.copy_blocks([(0, 8)])


def test_weights_are_shared_not_copied(tiny):
    model = tiny[0]
    runner = ModelRunner(model, block_size=BLOCK, num_kv_blocks=4)
    layer = model.model.layers[0]
    tensor = lambda w: w.weight if isinstance(w, CpuLinear) else w  # noqa: E731 - the probe may have wrapped it
    assert tensor(runner.layers[0].q_w).data_ptr() == layer.self_attn.q_proj.weight.data_ptr()
    assert tensor(runner.layers[0].down_w).data_ptr() == layer.mlp.down_proj.weight.data_ptr()
    assert tensor(runner.lm_head_w).data_ptr() == model.lm_head.weight.data_ptr()


def test_kv_cache_shape_and_bytes(tiny):
    model = tiny[0]
    runner = ModelRunner(model, block_size=BLOCK, num_kv_blocks=10)
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    assert runner.kv_cache.k_caches[0].shape == (10, BLOCK, cfg.num_key_value_heads, head_dim)
    assert runner.kv_cache.num_layers == cfg.num_hidden_layers
    assert runner.kv_cache.num_bytes == 10 * kv_bytes_per_block(cfg, BLOCK, model.dtype)
    assert kv_bytes_per_block(cfg, 16, torch.bfloat16) * 2 == kv_bytes_per_block(cfg, 16, torch.float32)


def test_bf16_runs_close_to_hf_bf16(tiny):
    """bf16 roundings happen in another order than HF's (the CPU prefill kernel sums in fp32 and rounds its output
    once): close to HF's bf16 logits, and no further from the fp32 model's than they are."""
    model = LlamaForCausalLM(tiny[0].config).to(torch.bfloat16).eval()
    model.load_state_dict(tiny[0].state_dict())
    runner = ModelRunner(model, block_size=BLOCK, num_kv_blocks=32)
    assert runner.kv_cache.k_caches[0].dtype == torch.bfloat16
    (prompt,) = _prompts(model.config.vocab_size, [19])
    logits = runner.execute_model([(_Blocks(32).seq(prompt, 19), 19)], all_logits=True)
    assert logits.dtype == torch.float32
    hf, fp32 = _hf_logits(model, prompt), _hf_logits(tiny[0], prompt)
    torch.testing.assert_close(logits, hf, atol=0.15, rtol=5e-2)  # a few bf16 steps of these logits at most
    assert (logits - fp32).abs().mean() <= 1.05 * (hf - fp32).abs().mean()


@pytest.mark.parametrize("rows", [1, 5, 12, 64])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("kernel", cpu_gemm.KERNELS)
def test_cpu_linear_kernels_equal_f_linear(rows, bias, kernel):
    """A CpuLinear runs its kernel at the row counts of its table and F.linear at the others: the same
    numbers; only the swapped order gives a transposed view (no copy)."""
    g = torch.Generator().manual_seed(rows)
    x, w = torch.randn(rows, 96, generator=g), torch.randn(40, 96, generator=g)
    b = torch.randn(40, generator=g) if bias else None
    table = dict.fromkeys((5, 12), kernel)
    linear = CpuLinear(w, table)
    y = _linear(x, linear, b)
    ref = x.double() @ w.double().T + (b.double() if bias else 0)
    torch.testing.assert_close(y.double(), ref, atol=1e-4, rtol=0)
    assert y.shape == (rows, 40)
    assert (y.stride() == (1, rows)) == (rows in table and kernel == "swapped")
    assert linear.copies.keys() == ({kernel} & cpu_gemm.COPIES.keys())  # a packed copy only for its kernel


@pytest.mark.parametrize("rows,n,k", [(1, 1, 1), (13, 33, 7), (25, 64, 100), (12, 31, 576)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
def test_the_panel_kernel_equals_a_float64_reference(rows, n, k, dtype):
    """csrc/panel_gemm.c: blocks of 12 rows and a part block, a last panel with fewer than 32 columns, x rows
    further apart than K (a view), with and without bias; fp32 weights, bfloat16 ones (a 16-bit lm_head), and
    int8 ones with a scale per output (W8A16); bf16 rows (widened and rounded back in C) and fp16 ones."""
    if cpu_gemm._panel_gemm() is None:
        pytest.skip("no C compiler here")
    g = torch.Generator().manual_seed(rows * n + k)
    x = torch.randn(rows, k + 5, generator=g)[:, 2:k + 2]
    w, b = torch.randn(n, k, generator=g).to(dtype), torch.randn(n, generator=g)
    scale, int8 = None, dtype is torch.int8
    if int8:
        w, scale = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8), torch.rand(n, generator=g)
    panels = cpu_gemm.pack_panels(w)
    assert panels.shape == (-(-n // 32), k, 32) and panels.dtype == w.dtype
    w64 = w.double() * (1 if scale is None else scale.double()[:, None])
    for bias in (None, b):
        y = cpu_gemm.panel_linear(x, panels, n, bias, scale=scale)
        ref = x.double() @ w64.T + (0 if bias is None else b.double())
        torch.testing.assert_close(y.double(), ref, atol=1e-4 * (1 + 50 * int8), rtol=1e-5)
        for half in (torch.bfloat16, torch.float16):  # 16-bit rows: the fp32 call's outputs, rounded once
            xh = x.to(half)
            want = cpu_gemm.panel_linear(xh.float(), panels, n, bias, scale=scale).to(half)
            assert torch.equal(cpu_gemm.panel_linear(xh, panels, n, bias, scale=scale), want)
    with pytest.raises(ValueError, match="do not fit"):
        cpu_gemm.panel_linear(torch.randn(2, k + 1), panels, n, scale=scale)
    with pytest.raises(ValueError, match="do not fit"):  # int8 panels without their scales, or fp32 with
        cpu_gemm.panel_linear(x, panels, n, scale=None if int8 else torch.ones(n))


def _panel_members(dtype, sizes, k, g):
    """Linears with panel copies, as the runner holds them: CpuLinears (fp32, bf16) or W8A16 QuantLinears (int8)."""
    if dtype is not torch.int8:
        return [CpuLinear(torch.randn(n, k, generator=g).to(dtype), dict.fromkeys(range(1, 17), "panel"))
                for n in sizes]
    plan = KernelPlan("w8a16", "panel", "dequant")  # the panel kernel up to 16 rows, as the CpuLinears
    return [QuantLinear(torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8), torch.rand(n, generator=g),
                        None, plan) for n in sizes]


@pytest.mark.parametrize("rows", [1, 5, 13])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
def test_fused_linears_give_each_part_the_bits_of_its_own_call(rows, dtype):
    """cpu_gemm.FusedLinear (q/k/v or gate/up in one panel-kernel call): widths that are not multiples of 32, a
    bias on some parts, x rows further apart than K (bf16 rows for bf16 weights: a bf16 model's). Each part equals
    its own panel_linear call bit for bit."""
    if cpu_gemm._panel_gemm() is None:
        pytest.skip("no C compiler here")
    g = torch.Generator().manual_seed(rows)
    k, sizes = 48, (40, 8, 72)
    members = _panel_members(dtype, sizes, k, g)
    biases = [torch.randn(40, generator=g), None, torch.randn(72, generator=g)]
    x = torch.randn(rows, k + 3, generator=g).to(torch.bfloat16 if dtype is torch.bfloat16 else torch.float32)
    x = x[:, 1:k + 1]
    fused = FusedLinear.of(members, biases)
    assert fused is not None and fused.takes(x)
    parts = fused(x)
    assert [tuple(t.shape) for t in parts] == [(rows, n) for n in sizes]
    for member, bias, part in zip(members, biases, parts):
        own = cpu_gemm.panel_linear(x, member.copies["panel"], member.weight.shape[0], bias,
                                    scale=getattr(member, "weight_scale", None))
        assert part.dtype == x.dtype and torch.equal(part, own)
    assert not fused.takes(torch.randn(17, k))  # a row count where the members run another kernel
    for bad in (torch.randn(2, k + 1), torch.randn(2, k, dtype=torch.float64)):
        with pytest.raises(ValueError, match="does not fit"):
            fused(bad)
    x = x.contiguous()
    y = torch.full((rows, sum(sizes)), float("nan"), dtype=x.dtype)
    fused.bind(x, y)()  # graph mode's replay: the same call, its arguments bound once
    assert torch.equal(y, torch.cat(parts, 1))
    for wrong in (torch.empty(rows, sum(sizes) + 1, dtype=x.dtype), torch.empty(rows, sum(sizes), dtype=torch.float16)):
        with pytest.raises(ValueError, match="of its dtype"):
            fused.bind(x, wrong)


def test_only_linears_with_panel_copies_of_one_kind_and_width_are_fused():
    if cpu_gemm._panel_gemm() is None:
        pytest.skip("no C compiler here")
    g = torch.Generator().manual_seed(0)
    fp32, int8 = _panel_members(torch.float32, (32, 32), 16, g), _panel_members(torch.int8, (32,), 16, g)
    assert FusedLinear.of(fp32, [None, None]) is not None
    assert FusedLinear.of([torch.randn(32, 16), torch.randn(32, 16)], [None, None]) is None  # plain weights
    assert FusedLinear.of([fp32[0], int8[0]], [None, None]) is None  # fp32 and int8 panels
    assert FusedLinear.of([fp32[0], *_panel_members(torch.float32, (32,), 8, g)], [None, None]) is None  # widths


@pytest.mark.parametrize("arch", ["qwen2", "llama", "llama-biases"])
def test_the_runner_fuses_qkv_and_gate_up_without_changing_a_bit(arch_models, tiny, arch):
    """W8A16 on the panel kernel (Qwen2: q/k/v biases; llama-biases: o_proj and down_proj biases too): the same
    decode logits, bit for bit, with the fused and bound calls (q/k/v, gate/up; o, down alone) and with every
    linear called through _linear."""
    if cpu_gemm._panel_gemm() is None:
        pytest.skip("no C compiler here")
    model = copy.deepcopy(arch_models["qwen2"] if arch == "qwen2" else tiny[0])
    if arch == "llama-biases":
        g = torch.Generator().manual_seed(5)
        for layer in model.model.layers:
            for lin in (layer.self_attn.o_proj, layer.mlp.down_proj):
                lin.bias = torch.nn.Parameter(torch.randn(lin.out_features, generator=g) * 0.1)
    quantize_model(model, "w8a16", smooth=False, kernel="panel")
    runner = ModelRunner(model, block_size=BLOCK, num_kv_blocks=64)
    fused = [(lw.qkv, lw.gate_up, lw.o, lw.down) for lw in runner.layers]
    assert all(f is not None for four in fused for f in four)
    seqs = [_Blocks(64).seq(p, len(p) + 2) for p in _prompts(model.config.vocab_size, [6, 3, 9])]
    _greedy(runner, seqs, 1)  # prefill, one decode: the next step reads a KV cache that both runs share
    for s in seqs:
        s.num_computed_tokens = len(s.token_ids)
        s.token_ids.append(7)
    with_fused = runner.execute_model([(s, 1) for s in seqs])
    for lw in runner.layers:
        lw.qkv = lw.gate_up = lw.o = lw.down = None
    assert torch.equal(runner.execute_model([(s, 1) for s in seqs]), with_fused)
    if arch == "llama-biases":  # and the biases count: without them the logits change
        for layer in runner.layers:
            layer.o_b = layer.down_b = None
        assert not torch.equal(runner.execute_model([(s, 1) for s in seqs]), with_fused)


@pytest.mark.parametrize("dtype", [torch.float32, torch.int8])
def test_a_bound_row_parallel_projection_adds_its_bias_after_the_all_reduce(dtype):
    """o_proj / down_proj as bound 1-part calls (runner: lw.o, lw.down): without tensor parallelism the bias is in
    the call; with it the call has no bias, the partial sum is all-reduced, then the bias is added once. Both equal
    the path through _linear."""
    if cpu_gemm._panel_gemm() is None:
        pytest.skip("no C compiler here")
    g = torch.Generator().manual_seed(3)
    (w,) = _panel_members(dtype, (40,), 24, g)
    b, x = torch.randn(40, generator=g), torch.randn(3, 24, generator=g)
    assert torch.equal(_row_parallel(x, w, b, None, FusedLinear.of([w], [b])), _row_parallel(x, w, b))
    double = lambda y: y.mul_(2)  # noqa: E731 - an all-reduce over two ranks that hold the same partial sum
    got = _row_parallel(x, w, b, double, FusedLinear.of([w], [None]))
    assert torch.equal(got, _row_parallel(x, w, b, double))
    assert torch.equal(got, _linear(x, w) * 2 + b)


def test_without_a_c_compiler_the_probe_leaves_the_panel_kernel_out(monkeypatch):
    monkeypatch.setattr(cpu_gemm, "_panel_gemm", lambda: None)
    monkeypatch.setattr(cpu_gemm, "_cache", {})
    monkeypatch.setattr(cpu_gemm, "_timed", lambda kernel, run, xs: 1.0)
    times = cpu_gemm.probe([torch.randn(40, 96)], 1)
    assert all("panel" not in t and "packed" in t for t in times.values())
    with pytest.raises(ValueError, match="C compiler"):
        CpuLinear(torch.randn(4, 4), {2: "panel"})


def _fake_clock(kernel, run, xs):
    """packed 20 % faster than F.linear at 4-7 rows; swapped 3 % at 8-15 (under MARGIN: not enough); at 16,
    24, .. 64 rows swapped 30 % and packed 10 % faster; at prefill rows packed 20 %, swapped 10 %."""
    m = xs[0].shape[0]
    if m > 64:
        assert kernel != "panel"  # the panel kernel is for decode rows: not timed there
        return {"packed": 0.8, "swapped": 0.9}.get(kernel, 1.0)
    if 4 <= m <= 7:
        return 0.8 if kernel == "packed" else 1.0
    if 8 <= m <= 15:
        return 0.97 if kernel == "swapped" else 1.0
    if m in (16, 32, 48, 64):
        return {"linear": 1.0, "swapped": 0.7, "packed": 0.9}.get(kernel, 1.0)
    return 1.0


@pytest.fixture
def fake_probe(monkeypatch, tiny):
    """The tiny fp32 CPU model, with the kernel probe timing on _fake_clock and remembering nothing yet."""
    model = tiny[0]
    if model.device.type != "cpu" or model.dtype != torch.float32:
        pytest.skip("the probe is for fp32 linears on the CPU")
    monkeypatch.setattr(cpu_gemm, "_timed", _fake_clock)
    monkeypatch.setattr(cpu_gemm, "_cache", {})
    return model


def test_the_kernel_probe_decides_per_bucket_and_the_runner_uses_its_answer(fake_probe):
    model = fake_probe
    threads = torch.get_num_threads()
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(40, 96, generator=g), torch.randn(96, 40, generator=g)]
    times = cpu_gemm.probe(weights, 1)
    assert torch.get_num_threads() == threads  # probed with the given count, then put back
    assert cpu_gemm.probe([w.clone() for w in weights], 1) is times  # once per process, shapes, threads
    every8, prefill = range(16, 65, 8), {cpu_gemm.PREFILL_ROWS: "packed"}
    assert cpu_gemm.choose(times) == {**dict.fromkeys(range(4, 8), "packed"), **dict.fromkeys(every8, "swapped"),
                                      **prefill}
    in_rows = {**dict.fromkeys(range(4, 8), "packed"), **dict.fromkeys(every8, "packed"), **prefill}
    assert cpu_gemm.choose(times, cpu_gemm.ROW_KERNELS) == in_rows

    runner = ModelRunner(model, block_size=BLOCK, num_kv_blocks=8)
    lw = runner.layers[0]
    assert lw.o_w.kernels == cpu_gemm.choose(times) and lw.q_w.kernels == in_rows
    assert lw.o_w.weight is model.model.layers[0].self_attn.o_proj.weight  # the model's tensor, and a packed copy
    assert "packed" in lw.o_w.copies and runner.lm_head_w.kernels == lw.o_w.kernels
    x = torch.randn(300, lw.o_w.weight.shape[1])  # a prefill chunk's rows: the prefill bucket's kernel
    assert lw.o_w.kernel_for(300) == "packed" and lw.o_w.kernel_for(3) == "linear"
    torch.testing.assert_close(lw.o_w(x), x @ lw.o_w.weight.T)
    wrapped = [runner.lm_head_w] + [getattr(lw, f) for lw in runner.layers for f in
                                    ("q_w", "k_w", "v_w", "o_w", "gate_w", "up_w", "down_w")]
    assert all(isinstance(w, CpuLinear) and list(w.copies) == ["packed"] for w in wrapped)
    assert runner.packed_bytes == sum(w.weight.nbytes for w in wrapped)

    bf16 = copy.deepcopy(model).to(torch.bfloat16)  # a bf16 model's weights: probed on bf16 rows, remembered apart
    assert cpu_gemm.probe([w.bfloat16() for w in weights], 1) is not times
    lw = ModelRunner(bf16, block_size=BLOCK, num_kv_blocks=8).layers[0]
    assert isinstance(lw.o_w, CpuLinear) and lw.o_w.weight is bf16.model.layers[0].self_attn.o_proj.weight
    assert all(c.dtype == torch.bfloat16 for c in lw.o_w.copies.values())  # (oneDNN packs bf16 on AVX512 only)


def test_without_memory_for_packed_copies_the_runner_keeps_the_other_kernels(monkeypatch, fake_probe):
    from npukit import device as device_mod

    model = fake_probe
    almost_full = dataclasses.replace(device_mod.memory_stats("cpu"), free=1000)
    monkeypatch.setattr(device_mod, "memory_stats", lambda device: almost_full)
    runner = ModelRunner(model, block_size=BLOCK, num_kv_blocks=8)
    assert runner.packed_bytes == 0 and runner.layers[0].o_w.copies == {}
    swapped = [*range(16, 65, 8), cpu_gemm.PREFILL_ROWS]
    assert runner.layers[0].o_w.kernels == dict.fromkeys(swapped, "swapped")
    assert isinstance(runner.layers[0].q_w, torch.Tensor)  # no row kernel left for q/k/v: plain F.linear


def test_the_kernel_probe_times_a_bounded_slice_of_a_big_weight(monkeypatch):
    monkeypatch.setattr(cpu_gemm, "_timed", lambda kernel, run, xs: 1.0)
    monkeypatch.setattr(cpu_gemm, "_cache", {})
    monkeypatch.setattr(cpu_gemm, "PROBE_BYTES", 1 << 16)
    times = cpu_gemm.probe([torch.zeros(1000, 64), torch.zeros(8, 64)], 1)
    assert cpu_gemm.choose(times) == {}  # nothing beat F.linear
    assert list(cpu_gemm._cache) == [(((256, 64),), torch.float32, 1)]  # 64 KiB of fp32 rows of 64: 256 rows,
    # the second weight not timed


def test_unsupported_architecture_points_to_hf_generate():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50, n_positions=32))
    with pytest.raises(UnsupportedModelError, match=r"gpt2.*model\.generate"):
        ModelRunner(model, block_size=BLOCK, num_kv_blocks=4)


def test_bad_batches_get_clear_errors(tiny):
    runner = ModelRunner(tiny[0], block_size=BLOCK, num_kv_blocks=8)
    seq = Sequence(request_id="a", token_ids=list(range(3, 13)), sampling_params=None)
    seq.block_table = [0, 1]  # 8 slots for 10 tokens
    with pytest.raises(ValueError, match="too few for positions up to 9"):
        runner.execute_model([(seq, 10)])
    with pytest.raises(ValueError, match="cannot compute 11 tokens"):
        runner.execute_model([(seq, 11)])
    with pytest.raises(ValueError, match="at least one"):
        runner.execute_model([])
    with pytest.raises(ValueError, match="block_size must be a positive int"):
        ModelRunner(tiny[0], block_size=0, num_kv_blocks=8)
    with pytest.raises(ValueError, match="needs the model on an Ascend NPU"):
        ModelRunner(tiny[0], block_size=BLOCK, num_kv_blocks=8, use_npu_fused_ops=True)
