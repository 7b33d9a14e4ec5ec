"""kernels/thin_matmul.py: the rank-r products in one Triton matmul (Triton's interpreter on the CPU)."""
import pytest
import torch

from slothnb.kernels import thin_matmul


@pytest.fixture
def on(monkeypatch):
    monkeypatch.setattr(thin_matmul, "THIN_MM", "cpu")


def _operands(M, K, N, dtype=torch.bfloat16, a_t=False, b_t=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(K, M, generator=g).to(dtype).t() if a_t else torch.randn(M, K, generator=g).to(dtype)
    b = torch.randn(N, K, generator=g).to(dtype).t() if b_t else torch.randn(K, N, generator=g).to(dtype)
    return a, b


@pytest.mark.parametrize("M,K,N", [(37, 70, 16), (130, 200, 48), (50, 16, 90), (9, 48, 300)])
@pytest.mark.parametrize("a_t,b_t", [(False, False), (True, False), (False, True)])
def test_thin_products_match_an_fp32_matmul(on, M, K, N, a_t, b_t):
    """N or K thin, operands as given or transposed views (x Aᵀ, dYᵀ xa): the fp32 product rounded once."""
    a, b = _operands(M, K, N, a_t=a_t, b_t=b_t)
    assert thin_matmul.applies(a, b)
    got = thin_matmul.mm(a, b)
    ref = (a.double() @ b.double()).to(torch.bfloat16)
    assert got.dtype == torch.bfloat16 and got.shape == (M, N)
    torch.testing.assert_close(got.float(), ref.float(), rtol=8e-3, atol=1e-2)
    assert torch.equal(thin_matmul.mm(a, b), got)  # the same bits again


def test_writes_into_strided_out_and_in_fp32(on):
    """``out`` a transposed view (``dY B`` into rows of ``[dY B]ᵀ``) or a column slice; an fp32 out_dtype
    gives the accumulator itself (an adapter's gradient)."""
    a, b = _operands(64, 96, 16)
    rows = torch.full((20, 64), 7.0, dtype=torch.bfloat16)
    thin_matmul.mm(a, b, out=rows[2:18].t())
    ref = a.double() @ b.double()
    torch.testing.assert_close(rows[2:18].t().float(), ref.to(torch.bfloat16).float(), rtol=8e-3, atol=1e-2)
    assert torch.all(rows[:2] == 7.0) and torch.all(rows[18:] == 7.0)  # nothing outside out written
    wide = torch.zeros(64, 40, dtype=torch.bfloat16)
    thin_matmul.mm(a, b, out=wide[:, 8:24])
    assert torch.equal(wide[:, 8:24], rows[2:18].t()) and torch.all(wide[:, :8] == 0) and torch.all(wide[:, 24:] == 0)
    got32 = thin_matmul.mm(a, b, out_dtype=torch.float32)
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.double(), ref, rtol=1e-5, atol=1e-4)


def test_what_it_does_not_take_goes_to_torch(monkeypatch):
    """Off (the default), wide on both sides, or fp32 operands: ``torch.mm``'s result, bit for bit."""
    a, b = _operands(32, 96, 16)
    assert not thin_matmul.applies(a, b)  # off by default
    assert torch.equal(thin_matmul.mm(a, b), torch.mm(a, b))
    monkeypatch.setattr(thin_matmul, "THIN_MM", "cpu")
    wide_a, wide_b = _operands(32, 96, 80)
    assert not thin_matmul.applies(wide_a, wide_b)
    assert torch.equal(thin_matmul.mm(wide_a, wide_b), torch.mm(wide_a, wide_b))
    assert not thin_matmul.applies(a.float(), b.float())
    leaf = a.clone().requires_grad_()
    assert not thin_matmul.applies(leaf, b)  # autograd must record this one: torch's
    assert thin_matmul.mm(leaf, b).grad_fn is not None
    with torch.no_grad():
        assert thin_matmul.applies(leaf, b)
    assert torch.equal(thin_matmul.mm(wide_a, wide_b, out_dtype=torch.float32), torch.mm(wide_a, wide_b).float())


def test_a_wrong_out_is_refused(on):
    a, b = _operands(32, 96, 16)
    with pytest.raises(ValueError, match="out is"):
        thin_matmul.mm(a, b, out=torch.empty(16, 32, dtype=torch.bfloat16))


@pytest.mark.gpu
def test_thin_products_on_gpu_bound_launches_and_the_same_bits(monkeypatch):
    """On CUDA the second call of a shape is a bound launch: fresh buffers, the same bits as the first."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (run on the GPU machine)")
    monkeypatch.setattr(thin_matmul, "THIN_MM", "1")
    monkeypatch.setattr(thin_matmul, "_BOUND", {})
    for M, K, N in [(4096, 4096, 48), (4096, 16, 14336), (14336, 4096, 16)]:
        a, b = [t.cuda() for t in _operands(M, K, N)]
        first = thin_matmul.mm(a, b)
        again = thin_matmul.mm(a.clone(), b.clone())
        assert torch.equal(first, again)
        torch.testing.assert_close(first.float(), (a.float() @ b.float()), rtol=1e-2, atol=5e-2)
    assert len(thin_matmul._BOUND) == 3


@pytest.fixture
def thin_products(monkeypatch):
    """The thin kernel on (interpreter), and a count of the products it ran."""
    monkeypatch.setattr(thin_matmul, "THIN_MM", "cpu")
    ran = []
    real = thin_matmul._thin_mm_kernel.launch
    monkeypatch.setattr(thin_matmul._thin_mm_kernel, "launch", lambda grid, args, kwargs: ran.append(1) or real(grid, args, kwargs))
    return ran


@pytest.mark.parametrize("base", ["16bit", "nf4"])
def test_the_lora_ops_through_it_match_float64(thin_products, base):
    """q/k/v and the MLP in bf16, their rank-r products in the thin kernel: outputs and every gradient
    within bf16's tolerance of float64, as through cuBLAS."""
    from test_lora import compare, make_x, mlp_case, pair, ref_proj

    from slothnb.kernels.lora import lora_qkv

    dtype = torch.bfloat16
    (q, rq), (k, rk), (v, rv) = (pair(o, 64, base, dtype, seed=s) for o, s in ((128, 0), (64, 1), (64, 2)))
    x, x64 = make_x("3d", 64, dtype)
    compare(lora_qkv(x, q, k, v), [ref_proj(x64, r) for r in (rq, rk, rv)],
            [x, q.A, q.B, k.A, k.B, v.A, v.B], [x64, rq.A, rq.B, rk.A, rk.B, rv.A, rv.B], dtype)
    qkv_products = len(thin_products)
    assert qkv_products >= 4  # x Aᵀ, the expansions, dY B, dYᵀ xa, [dY B] A
    y, ref, leaves, ref_leaves = mlp_case(base, dtype, "swiglu")
    compare([y], [ref], leaves, ref_leaves, dtype)
    assert len(thin_products) - qkv_products >= 8


@pytest.mark.parametrize("programs,block_m", [(1, 64), (4, 32), (128, 16)])
def test_row_blocks_shrink_until_the_programs_fill_the_gpu(on, monkeypatch, programs, block_m):
    """A thin-N product takes 64-row blocks, or 32 or 16 where that leaves too few programs: each gives
    the same product."""
    monkeypatch.setattr(thin_matmul, "PROGRAMS", programs)
    a, b = _operands(150, 80, 24)
    assert thin_matmul._tiles(150, 24, 80)[0] == block_m
    torch.testing.assert_close(thin_matmul.mm(a, b).float(), (a.double() @ b.double()).to(torch.bfloat16).float(),
                               rtol=8e-3, atol=1e-2)
