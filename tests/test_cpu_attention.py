"""The CPU paged attention kernels (npukit.engine.cpu_attention), decode and prefill: against a float64 reference
over random block tables, ragged contexts, chunks after a cached prefix, sliding windows and head layouts; how
npukit's C kernels are built and cached (npukit.engine.native); the kernels switched off or replaced by gather +
SDPA when they cannot be built; and the runner's use of them."""
from __future__ import annotations

import logging

import pytest
import torch

from npukit.engine import cpu_attention, cpu_gemm, cpu_ops, native
from npukit.engine.runner import ModelRunner
from npukit.engine.sequence import Sequence
from npukit.quant import kernels as quant_kernels

needs_cc = pytest.mark.skipif(cpu_attention.load() is None, reason="no C compiler to build the kernel")


def _reference(q, kc, vc, tables, lens, window, scale):
    """softmax(q K^T * scale) V per sequence in float64, from the blocks gathered the slow, obvious way."""
    b, heads, d = q.shape
    kv = kc.shape[2]
    out = torch.empty(b, heads, d, dtype=torch.float64)
    for i in range(b):
        n = int(lens[i])
        k = kc[tables[i]].reshape(-1, kv, d)[:n].double()
        v = vc[tables[i]].reshape(-1, kv, d)[:n].double()
        lo = 0 if window is None else max(0, n - window)
        k, v = k[lo:].repeat_interleave(heads // kv, 1), v[lo:].repeat_interleave(heads // kv, 1)
        p = torch.softmax(torch.einsum("hd,lhd->hl", q[i].double(), k) * scale, dim=-1)
        out[i] = torch.einsum("hl,lhd->hd", p, v)
    return out


@needs_cc
@pytest.mark.parametrize("b,heads,kv,d,bs,window,threads", [
    (1, 4, 2, 8, 4, None, 2),      # fewer sequences than threads: one KV head per work item
    (5, 6, 2, 8, 4, None, 1),
    (7, 9, 3, 64, 16, None, 2),    # SmolLM2's layout, 16 dims per partial sum exactly
    (6, 4, 4, 20, 8, 6, 2),        # no GQA, a head_dim with a tail after the 16-wide sums, sliding window
    (3, 8, 1, 128, 16, 37, 3),     # one KV head (MQA), a window that starts inside a block
    (9, 16, 2, 64, 16, 21, 2),     # GQA 8:1 (qwen2-1024x8): bf16 on the prefill kernel's tiles with AVX512-BF16
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_equals_a_float64_reference(b, heads, kv, d, bs, window, threads, dtype):
    """fp32, and bf16 (a bf16 model's q and cache: the same fp32 arithmetic, each output rounded once to bf16; on the
    prefill kernel's tiles, the softmax weights rounded to bf16 too, see decode_takes_tiles)."""
    g = torch.Generator().manual_seed(b * 100 + d)
    blocks = 64
    kc = torch.randn(blocks, bs, kv, d, generator=g).to(dtype)
    vc = torch.randn(blocks, bs, kv, d, generator=g).to(dtype)
    lens = torch.randint(1, 6 * bs + 1, (b,), generator=g)
    lens[0] = 1  # a sequence whose only key is its own new token
    width = int((lens.max() + bs - 1) // bs)
    tables = torch.randperm(blocks, generator=g)[:b * width].view(b, width)  # padding entries never read
    q = (torch.randn(b, heads, d, generator=g) * 3).to(dtype)  # peaked softmaxes too
    out = torch.full_like(q, float("nan"))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        cpu_attention.paged_decode_attention(cpu_attention.load(dtype), q, kc, vc, tables, lens, window, d ** -0.5,
                                             out)
    finally:
        torch.set_num_threads(before)
    tol = 2e-6 if dtype is torch.float32 else 2 ** -6 if cpu_attention.decode_takes_tiles(heads, kv, d) else 2 ** -8
    torch.testing.assert_close(out.double(), _reference(q, kc, vc, tables, lens, window, d ** -0.5), atol=tol,
                               rtol=tol)


@needs_cc
@pytest.mark.parametrize("heads,kv", [(9, 3), (8, 2), (4, 4)])
def test_a_sequences_output_has_the_same_bits_however_the_work_is_split(heads, kv):
    """Alone on several threads a sequence is split into one work item per KV head; in a batch on one thread it
    is one work item: every query head's sums run in the same order either way."""
    g = torch.Generator().manual_seed(heads)
    b, d, bs, blocks = 4, 64, 16, 64
    kc, vc = torch.randn(blocks, bs, kv, d, generator=g), torch.randn(blocks, bs, kv, d, generator=g)
    lens = torch.tensor([1, 17, 40, 64])
    tables = torch.randperm(blocks, generator=g)[:b * 4].view(b, 4)
    q = torch.randn(b, heads, d, generator=g)
    before = torch.get_num_threads()

    def attend(i, threads):
        rows = slice(0, b) if i is None else slice(i, i + 1)
        out = torch.empty_like(q[rows])
        torch.set_num_threads(threads)
        cpu_attention.paged_decode_attention(cpu_attention.load(), q[rows].contiguous(), kc, vc,
                                             tables[rows].contiguous(), lens[rows].contiguous(), None, 0.125, out)
        return out

    try:
        whole = attend(None, 1)
        for threads in (2, 3, 4, 16):
            for i in range(b):
                assert torch.equal(attend(i, threads)[0], whole[i]), (i, threads)
    finally:
        torch.set_num_threads(before)


@needs_cc
@pytest.mark.skipif(not cpu_attention.decode_takes_tiles(16, 2, 64),
                    reason="bf16 decode rows take the prefill kernel's tiles only where the CPU has AVX512-BF16")
@pytest.mark.parametrize("heads,kv,d", [(16, 2, 64), (32, 4, 128)])
def test_bf16_decode_on_tiles_has_the_prefill_kernels_bits_alone_or_in_a_batch(heads, kv, d):
    """Where the bf16 decode kernel takes the prefill kernel's tiles (query heads per KV head x head_dim >= 448; not
    SmolLM2's 3 x 64, nor 2 x 128), each decode row's output is the prefill kernel's for a one-token chunk, bit for
    bit, alone (one work item per KV head) or in a batch (one item for all of a sequence's heads)."""
    assert not cpu_attention.decode_takes_tiles(9, 3, 64) and not cpu_attention.decode_takes_tiles(8, 4, 128)
    g = torch.Generator().manual_seed(heads + d)
    b, bs, blocks = 6, 16, 64
    kc = torch.randn(blocks, bs, kv, d, generator=g).bfloat16()
    vc = torch.randn(blocks, bs, kv, d, generator=g).bfloat16()
    lens = torch.tensor([1, 17, 40, 64, 33, 5])
    tables = torch.randperm(blocks, generator=g)[:b * 4].view(b, 4)
    q = (torch.randn(b, heads, d, generator=g) * 3).bfloat16()
    kernel, before = cpu_attention.load(torch.bfloat16), torch.get_num_threads()

    def decode(rows: slice, threads: int) -> torch.Tensor:
        out = torch.empty_like(q[rows])
        torch.set_num_threads(threads)
        cpu_attention.paged_decode_attention(kernel, q[rows].contiguous(), kc, vc, tables[rows].contiguous(),
                                             lens[rows].contiguous(), None, d ** -0.5, out)
        return out

    try:
        batch = decode(slice(0, b), 2)
        assert torch.equal(batch, _prefill(q, kc, vc, tables, torch.arange(b), torch.ones(b, dtype=torch.long),
                                           lens - 1, None))
        for i in range(b):
            for threads in (1, 3):
                assert torch.equal(decode(slice(i, i + 1), threads)[0], batch[i]), (i, threads)
    finally:
        torch.set_num_threads(before)


@needs_cc
def test_bad_tensors_are_refused_before_the_kernel_reads_them():
    kernel = cpu_attention.load()
    q, out = torch.zeros(2, 4, 8), torch.zeros(2, 4, 8)
    kc = torch.zeros(4, 4, 2, 8)
    tables, lens = torch.zeros(2, 1, dtype=torch.long), torch.ones(2, dtype=torch.long)
    with pytest.raises(ValueError, match="of one dtype"):
        cpu_attention.paged_decode_attention(kernel, q.bfloat16(), kc, kc, tables, lens, None, 1.0, out)
    with pytest.raises(ValueError, match="of one dtype"):
        cpu_attention.paged_decode_attention(kernel, q.double(), kc.double(), kc.double(), tables, lens, None, 1.0,
                                             out.double())
    with pytest.raises(ValueError, match=r"pass the kernel for torch.bfloat16 tensors"):  # it would read 2x the bytes
        cpu_attention.paged_decode_attention(kernel, q.bfloat16(), kc.bfloat16(), kc.bfloat16(), tables, lens, None,
                                             1.0, out.bfloat16())
    with pytest.raises(ValueError, match="contiguous CPU tensors"):
        cpu_attention.paged_decode_attention(kernel, q.transpose(0, 1), kc, kc, tables, lens, None, 1.0, out)
    with pytest.raises(ValueError, match="int64"):
        cpu_attention.paged_decode_attention(kernel, q, kc, kc, tables.int(), lens, None, 1.0, out)


def _prefill_case(chunks, heads, kv, d, bs, dtype, seed=0):
    """Random caches and a step of prefill chunks ``[(computed, n), ...]`` after one decode row (row 0: not theirs).
    q is a column view of a q/k/v projection's output (row stride (heads + 2 kv) * d), as the runner passes it."""
    g = torch.Generator().manual_seed(seed)
    need = [(c + n + bs - 1) // bs for c, n in chunks]
    blocks = sum(need) + 3
    kc = torch.randn(blocks, bs, kv, d, generator=g).to(dtype)
    vc = torch.randn(blocks, bs, kv, d, generator=g).to(dtype)
    ids = torch.randperm(blocks, generator=g)
    width = max(need)
    tables = torch.zeros(len(chunks), width, dtype=torch.long)
    for i, m in enumerate(need):
        tables[i, :m], ids = ids[:m], ids[m:]
    lens = torch.tensor([n for _, n in chunks])
    starts, computed = 1 + lens.cumsum(0) - lens, torch.tensor([c for c, _ in chunks])
    rows = 1 + int(lens.sum())
    qkv = (torch.randn(rows, (heads + 2 * kv) * d, generator=g) * 3).to(dtype)  # peaked softmaxes too
    q = qkv[:, :heads * d].view(rows, heads, d)
    return q, kc, vc, tables, starts, lens, computed


def _prefill_reference(q, kc, vc, tables, starts, lens, computed, window, scale):
    """Each chunk's causal attention over its blocks in float64, from the blocks gathered the slow, obvious way."""
    _, heads, d = q.shape
    kv = kc.shape[2]
    out = torch.full(q.shape, float("nan"), dtype=torch.float64)
    for i in range(len(lens)):
        c, n, s = int(computed[i]), int(lens[i]), int(starts[i])
        k = kc[tables[i]].reshape(-1, kv, d)[:c + n].double().repeat_interleave(heads // kv, 1)
        v = vc[tables[i]].reshape(-1, kv, d)[:c + n].double().repeat_interleave(heads // kv, 1)
        q_pos, k_pos = torch.arange(c, c + n)[:, None], torch.arange(c + n)[None, :]
        seen = (k_pos <= q_pos) & ((k_pos > q_pos - window) if window else True)
        scores = torch.einsum("nhd,lhd->hnl", q[s:s + n].double(), k) * scale
        p = scores.masked_fill(~seen, float("-inf")).softmax(-1)
        out[s:s + n] = torch.einsum("hnl,lhd->nhd", p, v)
    return out


def _prefill(q, kc, vc, tables, starts, lens, computed, window, threads=2):
    out = torch.full(q.shape, float("nan"), dtype=q.dtype)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        cpu_attention.paged_prefill_attention(cpu_attention.load(q.dtype, "prefill"), q, kc, vc, tables, starts, lens,
                                              computed, window, q.shape[2] ** -0.5, out)
    finally:
        torch.set_num_threads(before)
    return out


@needs_cc
@pytest.mark.parametrize("chunks,heads,kv,d,bs,window,threads", [
    ([(0, 37), (5, 20), (100, 3)], 9, 3, 64, 16, None, 2),  # SmolLM2's layout: a prompt, chunks after a prefix
    ([(0, 100), (30, 50)], 8, 2, 128, 16, 40, 3),           # head_dim 128, a window shorter than the chunks
    ([(0, 33), (17, 2), (40, 1)], 4, 4, 80, 8, None, 1),    # no GQA, a head_dim of the generic loop, 1-2 tokens
    ([(3, 21)], 8, 1, 16, 4, 6, 2),                          # MQA, the tiny models' head_dim, small blocks
    ([(0, 16), (16, 16), (1, 31)], 6, 2, 64, 16, 17, 2),    # chunks on the work items' 16-position edges
    ([(40, 1), (3, 1), (90, 1), (17, 1), (0, 9)], 16, 2, 64, 16, 21, 2),  # one-token chunks: an item for all heads
    ([(40, 1), (5, 0), (7, 1), (0, 0)], 9, 3, 64, 16, None, 2),  # items of 3 rows (computed 4 at a time); no tokens
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_kernel_equals_a_float64_reference(chunks, heads, kv, d, bs, window, threads, dtype):
    """fp32; bf16 (q and cache in bf16, the output rounded once; with AVX512-BF16 the weights are rounded to bf16
    before they multiply V, as torch's flash attention does: a few bf16 steps of the output)."""
    case = _prefill_case(chunks, heads, kv, d, bs, dtype, seed=d + len(chunks))
    out = _prefill(*case, window, threads)
    assert out[0].isnan().all()  # the decode row is not the kernel's to write
    tol = 1e-5 if dtype is torch.float32 else 2 ** -6  # fp32: SDPA is 5e-6 off on these too
    torch.testing.assert_close(out[1:].double(), _prefill_reference(*case, window, d ** -0.5)[1:], atol=tol,
                               rtol=tol)


@needs_cc
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_chunks_prefill_output_has_the_same_bits_whatever_else_is_in_the_step(dtype):
    """Work items are a chunk's own (16 positions, one KV head) and each sums in one order: the same bits alone or
    beside other chunks, on 1 or 3 threads (so a prompt's tokens never depend on the batch it lands in)."""
    q, kc, vc, tables, starts, lens, computed = _prefill_case([(0, 45), (20, 30), (7, 9)], 9, 3, 64, 16, dtype)
    together = _prefill(q, kc, vc, tables, starts, lens, computed, None, threads=1)
    for i in range(3):
        s, n = int(starts[i]), int(lens[i])
        for threads in (1, 3):
            alone = _prefill(q, kc, vc, tables[i:i + 1], torch.tensor([s]), lens[i:i + 1], computed[i:i + 1], None,
                             threads)
            assert torch.equal(alone[s:s + n], together[s:s + n]), (i, threads)


@needs_cc
def test_bad_prefill_tensors_are_refused_before_the_kernel_reads_them():
    q, kc, vc, tables, starts, lens, computed = _prefill_case([(0, 5)], 4, 2, 16, 4, torch.float32)
    kernel, out = cpu_attention.load(torch.float32, "prefill"), torch.zeros_like(q)

    def call(**change):
        args = dict(kernel=kernel, q=q, k_cache=kc, v_cache=vc, block_tables=tables, starts=starts, lens=lens,
                    computed=computed, window=None, scale=1.0, out=out) | change
        cpu_attention.paged_prefill_attention(**args)

    with pytest.raises(ValueError, match="contiguous heads"):
        call(q=q.transpose(1, 2))
    with pytest.raises(ValueError, match="int64"):
        call(lens=lens.int())
    with pytest.raises(ValueError, match="one sequence count"):
        call(starts=torch.tensor([1, 3]))
    with pytest.raises(ValueError, match="of one dtype"):
        call(k_cache=kc.bfloat16())
    with pytest.raises(ValueError, match=r"cpu_attention.load\(torch.float32, 'prefill'\)"):
        call(kernel=cpu_attention.load(torch.float32))  # the decode kernel: other arguments
    call()
    assert out[1:].abs().sum() > 0


LOADERS = (native.load_library, cpu_attention.load, cpu_gemm._panel_gemm, cpu_gemm._panel_gemm_parts, cpu_ops._ops,
           quant_kernels._quant_rows)


@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """load() with an empty kernel cache in tmp_path, every C loader's memo cleared before and after (a kernel
    found missing here must not stay missing for the tests after), and the matmul probe's timings kept apart."""
    monkeypatch.setenv("NPUKIT_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu_gemm, "_cache", {})
    for loader in LOADERS:
        loader.cache_clear()
    yield tmp_path
    for loader in LOADERS:
        loader.cache_clear()


@needs_cc
def test_the_kernel_is_built_once_into_the_cache_folder(fresh_build, monkeypatch):
    assert native.load_library("paged_attention") is not None
    built = list(fresh_build.glob("paged_attention-*.so"))
    assert len(built) == 1
    native.load_library.cache_clear()
    monkeypatch.setattr(native, "_build", lambda *a: pytest.fail("rebuilt a cached kernel"))
    assert native.load_library("paged_attention") is not None  # another process: loads the cached file
    monkeypatch.setattr(native, "_cpu_id", lambda: "another CPU model")
    native.load_library.cache_clear()
    with pytest.raises(pytest.fail.Exception, match="rebuilt"):
        native.load_library("paged_attention")  # a different CPU never loads a -march=native build from elsewhere


def test_no_compiler_means_gather_and_sdpa_with_a_warning(fresh_build, monkeypatch, caplog, tiny):
    monkeypatch.setenv("CC", str(fresh_build / "no-such-cc"))
    with caplog.at_level(logging.WARNING, logger="npukit.engine.native"):
        assert cpu_attention.load() is None
    assert "'paged_attention' is unavailable" in caplog.text and "no-such-cc" in caplog.text
    runner = ModelRunner(tiny[0], block_size=4, num_kv_blocks=8)
    assert runner.decode_kernel is None
    s = Sequence("a", [5, 6, 7], None)
    s.block_table = [3]
    runner.execute_model([(s, 2)])
    s.num_computed_tokens = 2
    assert runner.execute_model([(s, 1)]).shape == (1, tiny[0].config.vocab_size)


@needs_cc
def test_loading_the_kernel_leaves_subnormal_floats_alone(fresh_build):
    """-ffast-math at link time would add crtfastmath.o, which sets flush-to-zero for the whole process when the
    library loads: torch's float math (and hypothesis' float strategies) would change under everyone."""
    assert cpu_attention.load() is not None
    tiny_value = float("5e-324")  # the smallest subnormal double
    assert tiny_value * 1.5 > 0.0
    assert torch.tensor([1e-40], dtype=torch.float32).mul(1.5).item() > 0.0


def test_switched_off_by_the_environment(fresh_build, monkeypatch):
    monkeypatch.setenv("NPUKIT_CPU_ATTENTION", "0")
    assert cpu_attention.load() is None
    assert not list(fresh_build.iterdir())


@needs_cc
def test_the_runner_refuses_block_ids_outside_its_cache(tiny):
    if tiny[0].device.type != "cpu":
        pytest.skip("the kernel is the CPU path")
    runner = ModelRunner(tiny[0], block_size=4, num_kv_blocks=8)
    assert runner.decode_kernel is not None
    s = Sequence("a", [5, 6, 7, 8, 9], None)
    s.block_table = [1, 2]
    runner.execute_model([(s, 4)])
    s.num_computed_tokens = 4
    s.block_table = [99, 2]  # a corrupt table must never reach the kernels (they read where ids point)
    with pytest.raises(ValueError, match=r"block ids must be in \[0, 8\)"):
        runner.execute_model([(s, 1)])
    assert runner.prefill_kernel is not None
    s.num_computed_tokens = 2
    with pytest.raises(ValueError, match=r"block ids must be in \[0, 8\)"):
        runner.execute_model([(s, 3)])  # a prefill chunk after a cached prefix
    s.num_computed_tokens, s.block_table = 0, [-1, 2]
    with pytest.raises(ValueError, match=r"block ids must be in \[0, 8\)"):
        runner.execute_model([(s, 5)])


def test_the_kernel_builds_where_there_is_a_compiler():
    """Where there is a C compiler (CI; inductor's graph mode needs one too) the kernel builds, so the other
    tests here and the runner's fidelity tests exercise it rather than skip."""
    if native.c_compiler() is None:
        pytest.skip("no C compiler on this machine")
    assert cpu_attention.load() is not None
