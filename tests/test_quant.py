"""npukit.quant: int8 kernels against a float64 reference, quantize_model's state_dict and errors, smoothing
that leaves outputs unchanged, and the engine running quantised layers (greedy equal to HF on the same
quantised model, and the same whatever the batch)."""
import logging

import pytest
import torch

import npukit
from npukit.engine import LLM, SamplingParams, cpu_gemm
from npukit.engine.config import EngineConfig, add_engine_args, engine_args
from npukit.engine.cpu_gemm import FusedLinear
from npukit.quant import (
    Bf16Linear,
    QuantizationError,
    QuantLinear,
    apply_quant_recipe,
    choose_kernels,
    linear_weight_bytes,
    quantize_model,
    quantize_per_channel,
    quantize_per_token,
    state_dict_bytes,
)
from npukit.quant import kernels as K
from npukit.quant import linear as linear_mod
from npukit.quant.linear import W8A8Group
from npukit.quant.smooth import (
    ALPHAS,
    CALIBRATION_TEXT,
    activation_absmax,
    search_alpha,
    smooth_model,
    smoothing_factors,
)

GREEDY = dict(temperature=0.0, ignore_eos=False)


pytestmark = pytest.mark.usefixtures("one_thread")


def fresh_tiny():
    return npukit.load_model("tiny-llama", device="cpu", dtype="float32")


def test_per_channel_and_per_token_quantisation_round_within_half_a_step():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 40, generator=g) * torch.linspace(0.01, 3, 48)[:, None]
    q, s = quantize_per_channel(w)
    assert q.dtype == torch.int8 and s.shape == (48,) and q.abs().max() <= 127
    assert ((q.float() * s[:, None] - w).abs() <= s[:, None] / 2 + 1e-6).all()
    assert (q.abs().amax(1) == 127).all()  # every row uses the full range
    x = torch.randn(5, 40, generator=g)
    qx, sx = quantize_per_token(x)
    assert sx.shape == (5, 1) and ((qx.float() * sx - x).abs() <= sx / 2 + 1e-6).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_per_token_quantisation_in_c_gives_torchs_bits(monkeypatch, dtype):
    """csrc/quant_rows.c (fp32 and bf16 rows on CPU) against the torch ops it replaces: the same int8 values and
    scales, bit for bit, over magnitudes from 1e-6 to 1e4, a row of zeros and rows further apart than K; the int32
    -> fp32 / bf16 epilogue too (rows longer than its 256-column chunks)."""
    if K._quant_rows() is None:
        pytest.skip("no C compiler here")
    g = torch.Generator().manual_seed(0)
    for i, (m, k) in enumerate([(1, 1), (1, 576), (7, 33), (64, 1536), (300, 576)]):
        x = (torch.randn(m, k + 3, generator=g) * 10.0 ** torch.randint(-6, 5, (m, 1), generator=g)).to(dtype)[:, :k]
        x[0, :k // 2] = 0 if i % 2 else x[0, :k // 2]
        x[-1] = 0 if m > 1 else x[-1]
        assert x.stride(0) == k + 3 or m == 1
        q, scale = K.quantize_per_token(x)
        q_ref, scale_ref = K._quantize_per_token_torch(x)
        assert torch.equal(q, q_ref) and torch.equal(scale, scale_ref)
        n = (50, 300, 1000)[i % 3]
        acc = torch.randint(-2**20, 2**20, (m, n), generator=g, dtype=torch.int32)
        w_scale = torch.rand(n, generator=g)
        y = K._scale_rows(acc, scale, w_scale, dtype)
        assert y.dtype == dtype and torch.equal(y, (acc.float() * scale * w_scale).to(dtype))
    monkeypatch.setattr(K, "_quant_rows", lambda: None)  # no compiler: the torch ops
    assert torch.equal(K.quantize_per_token(x)[0], q)
    assert torch.equal(K._scale_rows(acc, scale, w_scale, dtype), y)


@pytest.mark.parametrize("method,kernel", [(m, k) for m in K.METHODS for k in K.KERNELS[m] if k != "npu"])
@pytest.mark.parametrize("rows", [1, 7, 64])
def test_kernels_match_a_float64_reference(method, kernel, rows):
    if kernel == "panel" and cpu_gemm._panel_gemm() is None:
        pytest.skip("no C compiler here")
    g = torch.Generator().manual_seed(rows)
    w, w_scale = quantize_per_channel(torch.randn(96, 64, generator=g))
    x = torch.randn(rows, 64, generator=g) * 3
    if method == "w8a16":  # exact math: x @ dequant(w).T in float64
        ref = x.double() @ (w.double() * w_scale.double()[:, None]).T
        tol = 1e-2 if kernel.endswith("bf16") else 1e-5  # bf16 activations: 8 bits of mantissa
    else:  # the int8 activations the kernel sees, then exact math
        qx, sx = quantize_per_token(x)
        ref = (qx.double() * sx.double()) @ (w.double() * w_scale.double()[:, None]).T
        tol = 1e-5
    y = K.KERNELS[method][kernel](x, w, w_scale)
    assert y.dtype == x.dtype and y.shape == (rows, 96) and y.is_contiguous()
    assert ((y.double() - ref).norm() / ref.norm()).item() < tol


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_panel_kernel_takes_16_bit_rows(dtype):
    """A bf16 / fp16 model's W8A16 rows go through the panel kernel widened to fp32 (a probe candidate there too):
    the fp32 result of the widened rows, rounded once to the model's dtype."""
    if cpu_gemm._panel_gemm() is None:
        pytest.skip("no C compiler here")
    g = torch.Generator().manual_seed(3)
    w, w_scale = quantize_per_channel(torch.randn(96, 64, generator=g))
    x = (torch.randn(3, 64, generator=g) * 3).to(dtype)
    y = K.w8a16_panel(x, w, w_scale)
    assert y.dtype == dtype and torch.equal(y, K.w8a16_panel(x.float(), w, w_scale).to(dtype))
    assert "panel" in K.candidates("w8a16", "cpu", dtype)


@pytest.mark.parametrize("rows", [1, K.CPU_SWAPPED_INT_MM_ROWS, K.CPU_SWAPPED_INT_MM_ROWS + 1])
def test_int_mm_gives_the_same_bits_in_either_operand_order(monkeypatch, rows):
    """Decode-sized W8A8 rows run as W @ x.T on CPU (faster there): integer sums, so not one bit changes."""
    g = torch.Generator().manual_seed(rows)
    w, w_scale = quantize_per_channel(torch.randn(96, 64, generator=g))
    x = torch.randn(rows, 64, generator=g)
    y = K.KERNELS["w8a8"]["int_mm"](x, w, w_scale)
    monkeypatch.setattr(K, "CPU_SWAPPED_INT_MM_ROWS", 0 if rows <= K.CPU_SWAPPED_INT_MM_ROWS else rows)
    assert torch.equal(y, K.KERNELS["w8a8"]["int_mm"](x, w, w_scale))


def test_the_panel_kernel_runs_on_the_copy_its_layer_made(monkeypatch):
    """A QuantLinear whose plan takes the C panel kernel packs its int8 weight once, at construction; calls
    find that copy by the weight (nothing is packed per call) and it stays out of the state_dict."""
    if cpu_gemm._panel_gemm() is None:
        pytest.skip("no C compiler here")
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(48, 70, bias=True)
    layer = QuantLinear.from_linear(lin, K.KernelPlan("w8a16", "panel", "panel"))
    assert layer.copies["panel"].shape == (3, 48, 32) and layer.copies["panel"].dtype == torch.int8
    assert set(layer.state_dict()) == {"weight", "weight_scale", "bias"}
    packs = []
    monkeypatch.setattr(cpu_gemm, "pack_panels", lambda w: packs.append(w) or torch.zeros(0))
    x = torch.randn(2, 5, 48, generator=g)
    ref = K.w8a16_dequant(x.reshape(10, 48), layer.weight, layer.weight_scale) + lin.bias
    torch.testing.assert_close(layer(x), ref.view(2, 5, 70).detach(), atol=1e-4, rtol=1e-5)
    assert packs == []


@pytest.mark.parametrize("method", K.METHODS)
def test_without_a_c_compiler_the_panel_kernel_is_no_candidate(monkeypatch, method):
    assert ("panel" in K.candidates(method, "cpu", torch.float32)) == (cpu_gemm._panel_gemm() is not None)
    monkeypatch.setattr(cpu_gemm, "_panel_gemm", lambda: None)
    assert "panel" not in K.candidates(method, "cpu", torch.float32)


def test_quantize_model_puts_int8_weights_and_scales_in_the_state_dict(tiny):
    model, tok = fresh_tiny()
    before_linear, before_all = linear_weight_bytes(model), state_dict_bytes(model)
    report = quantize_model(model, "w8a16", tokenizer=tok)
    sd = model.state_dict()
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, QuantLinear) and sd["model.layers.0.self_attn.q_proj.weight"].dtype == torch.int8
    assert sd["model.layers.0.mlp.down_proj.weight_scale"].dtype == torch.float32
    assert model.model.embed_tokens.weight.dtype == torch.float32  # embeddings / lm_head stay float
    n = sum(1 for k, v in sd.items() if v.dtype == torch.int8)
    assert n == report.num_linears == 7 * len(model.model.layers)
    assert report.linear_bytes_before == before_linear and report.model_bytes_before == before_all
    # fp32 -> int8 + one fp32 scale per output row: 4K/(K+4) smaller (3.76x at hidden 64, 3.97x at SmolLM2's 576)
    shapes = [m.weight.shape for _, m in npukit.quant.named_linears(model)]
    assert linear_weight_bytes(model) == sum(n * k + 4 * n for n, k in shapes) == before_linear // 4 + 4 * sum(
        n for n, _ in shapes)
    assert state_dict_bytes(model) == report.model_bytes_after < before_all
    assert model.quantization == "w8a16" and model.quant_report is report and "w8a16" in str(report)


def test_a_forced_kernel_that_runs_wrong_or_not_at_all_here_is_refused_at_load(monkeypatch):
    """A kernel can run and be wrong (torch._int_mm under ONEDNN_MAX_CPU_ISA=AVX2 on a VNNI CPU gave ~5 %
    error): forcing one is checked against the reference first, as the probe checks every candidate."""
    model, _ = fresh_tiny()
    monkeypatch.setitem(K.KERNELS["w8a8"], "int_mm", lambda x, w, s: K.KERNELS["w8a8"]["dequant"](x, w, s) * 1.1)
    with pytest.raises(QuantizationError, match="forced w8a8 kernel 'int_mm' does not work on cpu.*relative error"):
        quantize_model(model, "w8a8", smooth=False, kernel="int_mm")
    with pytest.raises(QuantizationError, match="forced w8a16 kernel 'npu' does not work on cpu.*leave kernel unset"):
        quantize_model(model, "w8a16", smooth=False, kernel="npu")  # torch_npu: not here
    assert not any(isinstance(m, QuantLinear) for m in model.modules())  # refused before any layer changed


def test_bad_settings_say_what_to_do(tiny):
    model, tok = fresh_tiny()
    with pytest.raises(QuantizationError, match="use one of w8a16, w8a8"):
        quantize_model(model, "int4")
    with pytest.raises(QuantizationError, match="tokenizer="):
        quantize_model(model, "w8a8")  # smoothing needs calibration text
    with pytest.raises(QuantizationError, match="kernels are"):
        quantize_model(model, "w8a8", smooth=False, kernel="nope")
    quantize_model(model, "w8a8", smooth=False, kernel="dequant")
    with pytest.raises(QuantizationError, match="already quantised"):
        quantize_model(model, "w8a16")
    with pytest.raises(ValueError, match="quantization must be None or one of"):
        EngineConfig(quantization="int4")
    with pytest.raises(QuantizationError, match="already quantised"):
        LLM(model, tok, quantization="w8a16", num_kv_blocks=16)


def test_w8a8_without_an_int8_kernel_falls_back_with_a_warning_or_fails_clearly(monkeypatch, caplog):
    def broken(x, w, s):
        raise RuntimeError("no int8 kernel on this device")

    K._probe.cache_clear()
    monkeypatch.setitem(K.KERNELS["w8a8"], "int_mm", broken)
    monkeypatch.setitem(K.KERNELS["w8a8"], "panel", broken)
    try:
        with caplog.at_level(logging.WARNING, logger="npukit.quant"):
            plan = choose_kernels("w8a8", "cpu", torch.float32, (32, 16))
        assert (plan.small, plan.large) == ("dequant", "dequant")
        assert "dequantise-then-matmul fallback" in caplog.text and "unavailable" in plan.reasons[0]
        K._probe.cache_clear()
        monkeypatch.setitem(K.KERNELS["w8a8"], "dequant", broken)
        with pytest.raises(QuantizationError, match="no w8a8 kernel runs on cpu"):
            choose_kernels("w8a8", "cpu", torch.float32, (32, 16))
    finally:
        K._probe.cache_clear()


def test_the_probe_times_decode_rows_on_one_thread_and_larger_ones_on_the_models_threads(monkeypatch):
    """Kernels scale differently with threads (W8A16's "dequant" widening does not split): larger row counts are
    ranked with the threads the model runs with, and the answer is remembered per thread count; they never round an
    fp32 model's rows to bf16."""
    seen = []

    def spy(x, w, s):
        seen.append((x.shape[0], torch.get_num_threads()))
        return K.w8a16_dequant(x, w, s)

    monkeypatch.setitem(K.KERNELS["w8a16"], "dequant", spy)
    before = torch.get_num_threads()
    K._probe.cache_clear()
    try:
        probe = K._probe("w8a16", "cpu", torch.float32, 48, 32, (1, 64), 3)
        assert {t for m, t in seen if m == 1} == {1} and {t for m, t in seen if m == 64} == {3}
        # bf16-rounded rows only for decode rows: larger batches of an fp32 model keep fp32 activations
        assert "int8pack_bf16" in dict(probe[0][2]) and "int8pack_bf16" not in dict(probe[1][2])
        assert torch.get_num_threads() == before
        seen.clear()
        K._probe("w8a16", "cpu", torch.float32, 48, 32, (1, 64), 2)  # another thread count: measured again
        assert {t for m, t in seen if m == 64} == {2}
    finally:
        K._probe.cache_clear()


def test_smoothing_leaves_the_float_model_unchanged_and_flattens_activation_outliers():
    model, tok = fresh_tiny()
    ids = tok(CALIBRATION_TEXT, return_tensors="pt").input_ids[:, :64]
    with torch.no_grad():
        ref = model(ids).logits
        # make an outlier channel, as real LLMs have: scale one hidden channel's norm weight up 50x
        model.model.layers[0].input_layernorm.weight[3] *= 50
        model.model.layers[0].self_attn.q_proj.weight[:, 3] /= 50
        model.model.layers[0].self_attn.k_proj.weight[:, 3] /= 50
        model.model.layers[0].self_attn.v_proj.weight[:, 3] /= 50
        torch.testing.assert_close(model(ids).logits, ref, rtol=1e-4, atol=1e-4)
        act = activation_absmax(model, ids)["layers.0.self_attn.q_proj"]
        attn = model.model.layers[0].self_attn
        weights = [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]
        s = smoothing_factors(act, weights, 0.5)
        assert s[3] == s.max()  # the outlier channel is divided the most
        alphas = smooth_model(model, ids)  # alpha searched per group
        torch.testing.assert_close(model(ids).logits, ref, rtol=1e-4, atol=1e-4)
        assert model.model.layers[0].input_layernorm.weight[3] < 50 * 0.5  # the outlier was moved to the weights
    assert set(alphas) == {f"layers.{i}.{k}" for i in range(model.config.num_hidden_layers)
                           for k in ("self_attn.q_proj", "mlp.gate_proj", "mlp.down_proj")}
    assert alphas["layers.0.self_attn.q_proj"] > 0 and set(alphas.values()) <= set(ALPHAS)
    with pytest.raises(ValueError, match="alpha"):
        smooth_model(model, ids, alpha=2)


def test_the_searched_alpha_is_the_one_with_the_smallest_int8_error():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 32, generator=g)
    x[:, 5] *= 40  # an outlier input channel
    w = torch.randn(16, 32, generator=g)
    ref = x @ w.T

    def error(alpha):
        s = smoothing_factors(x.abs().amax(0), [w], alpha)
        qx, sx = quantize_per_token(x / s)
        qw, sw = quantize_per_channel(w * s)
        return float(((qx.float() * sx) @ (qw.float() * sw[:, None]).T - ref).pow(2).mean())

    best = search_alpha(x, [w], per_token_activations=True)
    assert error(best) == min(error(a) for a in ALPHAS) < error(0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kernel", ["int_mm", "panel", "dequant"])
def test_a_w8a8_group_quantises_its_rows_once_and_gives_each_members_bits(monkeypatch, kernel, dtype):
    """q/k/v (with a bias, as Qwen2's) through W8A8Group: each member's output bit for bit, the rows quantised once."""
    if kernel == "panel" and cpu_gemm._panel_gemm() is None:
        pytest.skip("no C compiler here")
    g = torch.Generator().manual_seed(0)
    plan = K.KernelPlan("w8a8", kernel, kernel)
    members = [QuantLinear(*quantize_per_channel(torch.randn(n, 64, generator=g)), None, plan) for n in (64, 32, 32)]
    biases = [torch.randn(64, generator=g).to(dtype), None, torch.randn(32, generator=g).to(dtype)]
    group = W8A8Group.of(members, biases)
    x = (torch.randn(7, 64, generator=g) * 3).to(dtype)
    assert group.takes(x) and group.sizes == [64, 32, 32]
    separate = [m(x) if b is None else m.project(x) + b for m, b in zip(members, biases)]
    calls = []
    monkeypatch.setattr(linear_mod, "quantize_per_token", lambda rows: calls.append(rows) or K.quantize_per_token(rows))
    together = group(x)
    assert len(calls) == 1 and all(torch.equal(a, b) and a.dtype == dtype for a, b in zip(together, separate))
    assert W8A8Group.of(members[:1], biases[:1]) is None  # one member: nothing to share
    assert not W8A8Group(members, biases).takes(x[0])  # rows only


@pytest.mark.parametrize("method,kernel", [("w8a16", "dequant"), ("w8a8", "dequant"), ("w8a8", "int_mm"),
                                           ("w8a16", "panel"), ("w8a8", "panel")])
def test_engine_greedy_equals_hf_on_the_same_quantised_model_and_ignores_the_batch(method, kernel):
    if kernel == "panel" and cpu_gemm._panel_gemm() is None:
        pytest.skip("no C compiler here")
    model, tok = fresh_tiny()
    quantize_model(model, method, tokenizer=tok, kernel=kernel)
    prompts = ["Hello there", "The cat sat on the", "1 2 3 4", "a" * 40, "Once upon a time"]
    ids = [tok(p).input_ids for p in prompts]
    ref = []
    with torch.inference_mode():
        for x in ids:
            x = torch.tensor([x])
            y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=8, do_sample=False,
                               pad_token_id=0)
            ref.append(y[0, x.shape[1]:].tolist())
    llm = LLM(model, tok, num_kv_blocks=64, block_size=8)
    assert llm.config.quantization == method
    qkv = llm.runner.layers[0].qkv  # one panel call (W8A16), or the rows quantised once for q, k and v (W8A8)
    assert isinstance(qkv, W8A8Group if method == "w8a8" else (FusedLinear if kernel == "panel" else type(None)))
    copies = sum(c.nbytes for m in model.modules() if isinstance(m, QuantLinear) for c in m.copies.values())
    assert (copies > 0) == (kernel == "panel") and llm.runner.packed_bytes >= copies  # the panels are counted
    params = SamplingParams(max_tokens=8, **GREEDY)
    alone = [llm.generate([x], params, use_tqdm=False)[0].outputs[0].token_ids for x in ids]
    together = [o.outputs[0].token_ids for o in llm.generate(ids, params, use_tqdm=False)]
    assert alone == ref
    assert together == ref


@pytest.mark.parametrize("head_format", [True, "bf16"])
@pytest.mark.parametrize("method", ["w8a16", "w8a8"])
def test_quantize_lm_head_keeps_a_tied_embedding_float_and_the_engine_equals_hf(method, head_format):
    model, tok = fresh_tiny()
    model.lm_head.weight = model.model.embed_tokens.weight  # tied, as in SmolLM2
    table = model.model.embed_tokens.weight.detach().clone()
    before = LLM(model, tok, num_kv_blocks=64, block_size=8).runner.weight_bytes
    report = quantize_model(model, method, tokenizer=tok, quantize_lm_head=head_format)
    head = model.get_output_embeddings()
    dtype = torch.int8 if head_format is True else torch.bfloat16
    assert isinstance(head, QuantLinear if head_format is True else Bf16Linear) and head.weight.dtype == dtype
    assert torch.equal(model.model.embed_tokens.weight, table)  # the lookups still read the float table
    assert report.lm_head and "lm_head" in str(report) and model.state_dict()["lm_head.weight"].dtype == dtype
    if head_format == "bf16":
        assert torch.equal(head.weight, table.to(torch.bfloat16))
    ids = [tok(p).input_ids for p in ["Hello there", "The cat sat on the", "1 2 3 4"]]
    with torch.inference_mode():
        ref = [model.generate(torch.tensor([x]), attention_mask=torch.ones(1, len(x), dtype=torch.long),
                              max_new_tokens=8, do_sample=False, pad_token_id=0)[0, len(x):].tolist() for x in ids]
    llm = LLM(model, tok, num_kv_blocks=64, block_size=8)
    assert [o.outputs[0].token_ids for o in llm.generate(ids, SamplingParams(max_tokens=8, **GREEDY),
                                                         use_tqdm=False)] == ref
    # the int8 (bf16) rows are an extra copy beside the float table, but every linear shrank far more
    assert llm.runner.weight_bytes < before
    with pytest.raises(ValueError, match="needs a quantization method"):
        npukit.load_model("tiny-llama", device="cpu", dtype="float32", quantize_lm_head=head_format)


@pytest.mark.parametrize("bad", ["fp8", 8, ["bf16"]])
def test_an_unknown_lm_head_format_is_refused_before_anything_changes(bad):
    model, tok = fresh_tiny()
    with pytest.raises(QuantizationError, match="quantize_lm_head must be"):
        quantize_model(model, "w8a16", tokenizer=tok, quantize_lm_head=bad)
    assert isinstance(model.lm_head, torch.nn.Linear) and getattr(model, "quantization", None) is None


@pytest.mark.parametrize("compiler", [True, False])
def test_a_bf16_linear_reads_its_weights_exactly_widened_and_shards_by_rows(compiler, monkeypatch):
    if not compiler:
        monkeypatch.setattr(cpu_gemm, "_panel_gemm", lambda: None)
    elif cpu_gemm._panel_gemm() is None:
        pytest.skip("no C compiler here")
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(70, 40, generator=g), torch.randn(3, 40, generator=g)
    lin = Bf16Linear(w)
    assert lin.weight.dtype == torch.bfloat16 and bool(lin.copies) == compiler
    y = lin(x)
    torch.testing.assert_close(y.double(), x.double() @ w.bfloat16().double().T, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lin(x[None]), y[None], rtol=0, atol=0)  # [..., in] as nn.Linear takes it
    half = lin.shard(lambda t: t[35:], row_parallel=False)
    torch.testing.assert_close(half.project(x), y[:, 35:], rtol=1e-6, atol=1e-6)
    assert lin(x.bfloat16()).dtype == torch.bfloat16  # a bf16 model's rows stay bf16


def test_a_recipe_replayed_on_a_fresh_copy_gives_the_same_int8_weights_and_kernels():
    # What a tensor-parallel worker does with rank 0's model.quant_recipe: no smoothing fit, no kernel probe.
    model, tok = fresh_tiny()
    quantize_model(model, "w8a8", tokenizer=tok, quantize_lm_head=True)
    recipe = model.quant_recipe
    assert recipe.smoothing and recipe.head_plan is not None
    copy, _ = fresh_tiny()
    apply_quant_recipe(copy, recipe)
    ours, theirs = model.state_dict(), copy.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert copy.quantization == "w8a8" and copy.model.layers[0].mlp.up_proj.plan is recipe.plan
    assert copy.get_output_embeddings().plan is recipe.head_plan
    with pytest.raises(QuantizationError, match="already quantised"):
        apply_quant_recipe(copy, recipe)


@pytest.mark.parametrize("kernel", ["int8pack", "panel"])
def test_tensor_parallel_w8a16_greedy_equals_tp1_and_the_int8_shards_are_counted(kernel):
    # Column-parallel ranks keep int8 rows + their scales, row-parallel ones int8 columns + every scale:
    # the all-reduced partial sums equal the unsharded product, so greedy tokens match. The workers replay
    # rank 0's model.quant_recipe (smoothing factors, kernels, lm_head), so they hold the same int8 weights
    # and run the same kernels. The kernel is forced to an fp32 one: the probe may pick int8pack_bf16, whose
    # bf16 partial sums round differently from the unsharded sum (true of any bf16 tensor-parallel run). With the
    # panel kernel the ranks run q/k/v, gate/up fused and o_proj / down_proj as bound calls (runner: lw.o, lw.down).
    if kernel == "panel" and cpu_gemm._panel_gemm() is None:
        pytest.skip("no C compiler here")
    prompts = ["Hello there", "The cat sat on the", "1 2 3 4", "Once upon a time"]
    params = SamplingParams(max_tokens=8, **GREEDY)
    model, tok = fresh_tiny()
    quantize_model(model, "w8a16", tokenizer=tok, kernel=kernel, quantize_lm_head=True)
    tp1 = LLM(model, tok, num_kv_blocks=64)
    ref = [o.outputs[0].token_ids for o in tp1.generate(prompts, params, use_tqdm=False)]
    tp2 = LLM(model, tok, num_kv_blocks=64, tensor_parallel_size=2)
    try:
        assert [o.outputs[0].token_ids for o in tp2.generate(prompts, params, use_tqdm=False)] == ref
        bytes_per_rank = [tp2.runner.runner.weight_bytes] + [w for w, _ in tp2.runner.worker_bytes]
        assert len(set(bytes_per_rank)) == 1
        assert bytes_per_rank[0] < tp1.runner.weight_bytes
    finally:
        tp2.shutdown()


def test_llm_and_load_model_take_quantization_and_the_cli_flag_parses():
    llm = LLM("tiny-llama", device="cpu", dtype="float32", quantization="w8a16", num_kv_blocks=16)
    assert isinstance(llm.model.model.layers[0].mlp.up_proj, QuantLinear)
    assert "quantised: w8a16" in "; ".join(llm.model.load_report.reasons)
    out = llm.generate(["Hi"], SamplingParams(max_tokens=4, **GREEDY), use_tqdm=False)
    assert 1 <= len(out[0].outputs[0].token_ids) <= 4
    import argparse

    parser = add_engine_args(argparse.ArgumentParser())
    assert engine_args(parser.parse_args(["--quantization", "w8a8"]))["quantization"] == "w8a8"
    with pytest.raises(SystemExit):
        parser.parse_args(["--quantization", "int4"])


def test_graduate_flags_for_quantization_say_that_vllm_does_not_quantise_at_load():
    from npukit.quant.vllm_flags import vllm_quantization

    assert vllm_quantization(None, "npu") == ([], [])
    flags, notes = vllm_quantization("w8a8", "npu")
    assert flags == ["--quantization", "ascend"] and "msModelSlim (W8A8_DYNAMIC" in notes[0]
    flags, notes = vllm_quantization("w8a16", "cuda")
    assert flags == [] and "LLM-Compressor" in notes[0]
    with pytest.raises(ValueError, match="unknown quantization"):
        vllm_quantization("int4", "npu")
