"""The fused element-wise ops of a decoder layer (npukit.engine.cpu_ops): RMSNorm with its residual add and RoPE
in C (fp32, bf16) against torch's ops and a float64 reference, row by row the same whatever the batch, strided
inputs, the inputs left alone, and the torch path where C does not apply."""
from __future__ import annotations

import pytest
import torch

from npukit.engine import cpu_ops

needs_cc = pytest.mark.skipif(cpu_ops._ops() is None, reason="no C compiler to build the kernels")
TORCH_RMS_NORM = cpu_ops._torch_rms_norm


def _rows(m, n, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, n, generator=g) * scale


@pytest.fixture
def c_only(monkeypatch):
    """Fail a test that should run the C pass but fell back to torch's ops."""
    def no_torch(*args):
        raise AssertionError("the torch fallback ran")
    monkeypatch.setattr(cpu_ops, "_torch_rms_norm", no_torch)


def _rms_reference(x, w, eps):
    x64 = x.double()
    return (w.double() * x64 / torch.sqrt(x64.pow(2).mean(-1, keepdim=True) + eps)).float()


@needs_cc
@pytest.mark.parametrize("m,n,scale", [(1, 576, 1.0), (3, 7, 1e-3), (200, 576, 30.0), (5, 1, 1.0)])
def test_add_rms_norm_in_c_equals_the_reference_and_torch(m, n, scale, c_only):
    x, delta, w = _rows(m, n, 1, scale), _rows(m, n, 2, scale), _rows(1, n, 3)[0]
    x0, d0 = x.clone(), delta.clone()
    h, s = cpu_ops.add_rms_norm(x, delta, w, 1e-5)
    assert torch.equal(s, x + delta)  # the residual sum has torch's bits
    assert torch.equal(x, x0) and torch.equal(delta, d0)  # inputs left alone
    torch.testing.assert_close(h, _rms_reference(x + delta, w, 1e-5), rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(h, TORCH_RMS_NORM(x + delta, w, 1e-5), rtol=2e-6, atol=1e-6)
    plain = cpu_ops.rms_norm(x, w, 1e-5)
    torch.testing.assert_close(plain, _rms_reference(x, w, 1e-5), rtol=2e-6, atol=1e-6)


@needs_cc
def test_rms_norm_of_strided_rows_and_of_heads(c_only):
    wide = _rows(9, 80)
    x = wide[:, 8:72]  # rows 80 apart
    w = _rows(1, 64, 4)[0]
    torch.testing.assert_close(cpu_ops.rms_norm(x, w, 1e-6), _rms_reference(x, w, 1e-6), rtol=2e-6, atol=1e-6)
    q = _rows(5, 3 * 16, 5).view(5, 3, 16)  # Qwen3's q_norm: one norm per head
    wq = _rows(1, 16, 6)[0]
    out = cpu_ops.rms_norm(q, wq, 1e-6)
    assert out.shape == q.shape
    torch.testing.assert_close(out, _rms_reference(q, wq, 1e-6), rtol=2e-6, atol=1e-6)


@needs_cc
@pytest.mark.parametrize("op", ["norm", "rope"])
def test_a_rows_result_does_not_depend_on_the_batch(op, c_only):
    """300 rows go through OpenMP's threads, one row through one: each row must come out the same bits."""
    m, n = 300, 576
    x, y = _rows(m, n, 7), _rows(m, n, 8)
    if op == "norm":
        full, one = cpu_ops.add_rms_norm(x, y, y[0], 1e-5)[0], cpu_ops.add_rms_norm(x[4:5], y[4:5], y[0], 1e-5)[0]
    else:
        cos, sin = _rows(m, 64, 9).view(m, 1, 64), _rows(m, 64, 10).view(m, 1, 64)
        q = x.view(m, 9, 64)
        full = cpu_ops.rope(q.clone(), q[:, :3].clone(), cos, sin)[0]
        one = cpu_ops.rope(q[4:5].clone(), q[4:5, :3].clone(), cos[4:5], sin[4:5])[0]
    assert torch.equal(full[4:5], one)


def _torch_rope(x, cos, sin):
    return x * cos + torch.cat((-x[..., x.shape[-1] // 2:], x[..., :x.shape[-1] // 2]), dim=-1) * sin


@needs_cc
def test_rope_in_c_has_torchs_bits_in_place_on_strided_rows():
    t, hq, hk, d = 6, 9, 3, 64
    qkv = _rows(t, (hq + 2 * hk) * d, 11)  # q, k, v side by side in one row, as a merged projection gives them
    q = qkv[:, :hq * d].view(t, hq, d)
    k = qkv[:, hq * d:(hq + hk) * d].view(t, hk, d)
    cos, sin = _rows(t, d, 12).view(t, 1, d), _rows(t, d, 13).view(t, 1, d)
    want_q, want_k, v0 = _torch_rope(q, cos, sin), _torch_rope(k, cos, sin), qkv[:, (hq + hk) * d:].clone()
    got_q, got_k = cpu_ops.rope(q, k, cos, sin)
    assert got_q.data_ptr() == q.data_ptr() and got_k.data_ptr() == k.data_ptr()
    assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)
    assert torch.equal(qkv[:, (hq + hk) * d:], v0)  # v untouched


@needs_cc
@pytest.mark.parametrize("m", [1, 300])
def test_bf16_in_c_rounds_where_torchs_bf16_ops_round(m, c_only):
    """A bf16 model's norms and RoPE: the residual sum and RoPE have torch's bits (each product exact in fp32, then
    rounded as torch rounds it); the norm's x * rsqrt(mean(x^2)), rounded to bf16, is within one bf16 step of
    torch's (its sum of squares runs in another order), and so within two after the weight's product."""
    n = 576
    x, delta, w = (_rows(m, n, 30, 4).bfloat16(), _rows(m, n, 31, 4).bfloat16(), _rows(1, n, 32)[0].bfloat16())
    h, s = cpu_ops.add_rms_norm(x, delta, w, 1e-5)
    assert h.dtype == s.dtype == torch.bfloat16 and torch.equal(s, x + delta)
    torch.testing.assert_close(h.float(), TORCH_RMS_NORM(x + delta, w, 1e-5).float(), rtol=2 ** -6, atol=0)
    ones = torch.ones(n, dtype=torch.bfloat16)  # the normalised rows themselves
    want = TORCH_RMS_NORM(x + delta, ones, 1e-5).float()
    step = 2.0 ** (torch.floor(torch.log2(want.abs().clamp_min(1e-30))) - 7)  # a bf16 step at each value
    normed = cpu_ops.add_rms_norm(x, delta, ones, 1e-5)[0].float()
    assert ((normed - want).abs() <= step).all()
    assert ((normed - _rms_reference((x + delta).float(), ones.float(), 1e-5)).abs() <= step).all()
    t, hq, hk, d = m, 9, 3, 64
    q, k = _rows(t, hq * d, 33).bfloat16().view(t, hq, d), _rows(t, hk * d, 34).bfloat16().view(t, hk, d)
    cos, sin = _rows(t, d, 35).bfloat16().view(t, 1, d), _rows(t, d, 36).bfloat16().view(t, 1, d)
    want_q, want_k = _torch_rope(q, cos, sin), _torch_rope(k, cos, sin)
    got_q, got_k = cpu_ops.rope(q, k, cos, sin)
    assert got_q.data_ptr() == q.data_ptr() and torch.equal(got_q, want_q) and torch.equal(got_k, want_k)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_other_dtypes_take_torchs_ops(dtype):
    x, w = _rows(3, 32, 16).to(dtype), _rows(1, 32, 17)[0].to(dtype)
    assert torch.equal(cpu_ops.rms_norm(x, w, 1e-6), cpu_ops._torch_rms_norm(x, w, 1e-6))
    q, k = x.view(3, 2, 16), x[:, :16].reshape(3, 1, 16)
    cos, sin = _rows(3, 16, 18).to(dtype).view(3, 1, 16), _rows(3, 16, 19).to(dtype).view(3, 1, 16)
    got_q, got_k = cpu_ops.rope(q, k, cos, sin)
    assert torch.equal(got_q, _torch_rope(q, cos, sin)) and torch.equal(got_k, _torch_rope(k, cos, sin))


def test_switched_off_the_ops_are_torchs(monkeypatch):
    monkeypatch.setattr(cpu_ops, "_ops", lambda: None)
    x, d, w = _rows(2, 16, 20), _rows(2, 16, 21), _rows(1, 16, 22)[0]
    h, s = cpu_ops.add_rms_norm(x, d, w, 1e-6)
    assert torch.equal(s, x + d) and torch.equal(h, cpu_ops._torch_rms_norm(x + d, w, 1e-6))


@needs_cc
def test_bound_calls_write_what_the_ops_return():
    """bind_add_rms_norm / bind_rope (graph mode's CPU replay): the C call with its arguments bound, into the given
    buffers, the same bits as the op; None where the op would not take the C path."""
    x, d, w = _rows(3, 40, 23), _rows(3, 40, 24), _rows(1, 40, 25)[0]
    out, s = torch.empty(3, 40), torch.empty(3, 40)
    cpu_ops.bind_add_rms_norm(x, d, w, 1e-6, out, s)()
    h, want_s = cpu_ops.add_rms_norm(x, d, w, 1e-6)
    assert torch.equal(out, h) and torch.equal(s, want_s)
    assert cpu_ops.bind_add_rms_norm(x.t(), None, w[:3], 1e-6, out, None) is None  # strided columns: torch's path
    q, k = _rows(3, 64, 26).view(3, 2, 32), _rows(3, 32, 27).view(3, 1, 32)
    cos, sin = _rows(3, 32, 28).view(3, 1, 32), _rows(3, 32, 29).view(3, 1, 32)
    want_q, want_k = _torch_rope(q, cos, sin), _torch_rope(k, cos, sin)
    cpu_ops.bind_rope(q, k, cos, sin)()
    assert torch.equal(q, want_q) and torch.equal(k, want_k)
    assert cpu_ops.bind_rope(q.double(), k.double(), cos, sin) is None
