"""RMSNorm kernels vs a float64 reference: forward, dX and dW, Llama and Gemma forms.

Tolerances: fp32 inputs (CPU interpreter) 2e-5 abs / 1e-5 rel against float64; bf16/fp16 on GPU
are checked against the float64 reference with a few ulps of the output dtype, and against HF's
own formula run in that dtype (which rounds more often than the kernel).
"""
import pytest
import torch

from slothnb.errors import ConfigError
from slothnb.kernels import _utils as utils
from slothnb.kernels.rms_norm import (RMSNormFunction, rms_norm, rms_norm_backward, rms_norm_forward,
                                      rms_norm_reference)

DW_REL = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}
TOL = {torch.float32: (2e-5, 1e-5), torch.bfloat16: (3e-2, 2e-2), torch.float16: (4e-3, 4e-3)}


def _check(x, w, offset, eps=1e-6, dtype=torch.float32):
    """x, w: fp64 masters. Runs the kernel in ``dtype`` and compares to the fp64 reference."""
    xk = x.to(dtype).requires_grad_()
    wk = w.to(dtype).requires_grad_()
    y = RMSNormFunction.apply(xk, wk, eps, offset)
    x64 = xk.detach().double().requires_grad_()
    w64 = wk.detach().double().requires_grad_()
    ref = rms_norm_reference(x64, w64, eps, offset)
    gen = torch.Generator().manual_seed(7)
    dy = torch.randn(ref.shape, generator=gen, dtype=torch.float64).to(x.device)
    y.backward(dy.to(y.dtype))
    ref.backward(dy.to(dtype).double())
    atol, rtol = TOL[dtype]
    assert y.dtype == dtype and y.shape == x.shape
    torch.testing.assert_close(y.double(), ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(xk.grad.double(), x64.grad, atol=atol, rtol=rtol)
    # dW sums over every row: compare relative to its largest entry (errors add up across rows).
    err = (wk.grad.double() - w64.grad).abs().max().item()
    assert err <= DW_REL[dtype] * w64.grad.abs().max().item(), err


def _inputs(shape, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.3
    w = torch.randn(shape[-1], generator=g, dtype=torch.float64) * 0.5 + 1
    return x.to(device), w.to(device)


@pytest.mark.parametrize("offset", [0.0, 1.0])
@pytest.mark.parametrize("shape", [(3, 4097), (1, 64), (2, 3, 96), (1, 1, 33)])
def test_rms_norm_fp32_vs_float64(shape, offset, device):
    x, w = _inputs(shape, device)
    _check(x, w, offset)


def test_rms_norm_non_contiguous_input(device):
    base, w = _inputs((4, 2 * 80), device)
    x = base[:, ::2]  # last dim strided: must still be exact
    _check(x, w[:80], 0.0)
    x3, w3 = _inputs((2, 5, 130), device, seed=3)
    _check(x3[:, :, :100], w3[:100], 1.0)  # row-strided view, no copy needed
    _check(x3.transpose(0, 1), w3, 0.0)


def test_rms_norm_face_matches_reference_and_frozen_weight(device):
    x, w = _inputs((5, 40), device, seed=1)
    x, w = x.float().requires_grad_(), w.float()  # frozen weight: no dW is computed
    y = rms_norm(x, w, eps=1e-5)
    y.sum().backward()
    x64 = x.detach().double().requires_grad_()
    rms_norm_reference(x64, w.double(), 1e-5).sum().backward()
    torch.testing.assert_close(y.double(), rms_norm_reference(x.detach().double(), w.double(), 1e-5),
                               atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_rms_norm_backward_any_row_split(offset, device):
    """dW partial rows from 1, 3 (uneven: 3+3+1) or 7 programs, and the no-dW launch, all match float64;
    dX is bitwise the same whatever the split (each row's math does not depend on it)."""
    x, w = _inputs((7, 96), device, seed=4)
    xf, wf = x.float(), w.float()
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(device)
    x64, w64 = xf.double().requires_grad_(), wf.double().requires_grad_()
    rms_norm_reference(x64, w64, 1e-6, offset).backward(dy.float().double())
    _, rstd = rms_norm_forward(xf, wf, 1e-6, offset)
    dxs = []
    for programs in (1, 3, 7):
        dx, dw = rms_norm_backward(dy.float(), xf, wf, rstd, offset, True, programs=programs)
        torch.testing.assert_close(dx.double(), x64.grad, atol=2e-5, rtol=1e-5)
        assert (dw.double() - w64.grad).abs().max().item() <= 1e-5 * w64.grad.abs().max().item()
        dxs.append(dx)
    dx_frozen, dw_frozen = rms_norm_backward(dy.float(), xf, wf, rstd, offset, False)
    assert dw_frozen is None
    for dx in dxs[1:] + [dx_frozen]:
        torch.testing.assert_close(dx, dxs[0], atol=0, rtol=0)


def test_row_programs_geometry(monkeypatch):
    """Frozen weight: one program per row; dW: ~16 rows a program, 1 to 8 programs per SM; interpreter: <= 4."""
    monkeypatch.setattr(utils, "_sm_count", lambda index: 132)
    cuda = torch.device("cuda", 0)
    assert utils.row_programs(cuda, 8192, partials=False) == 8192
    assert utils.row_programs(cuda, 8192, partials=True) == 512
    assert utils.row_programs(cuda, 1 << 20, partials=True) == 8 * 132
    assert utils.row_programs(cuda, 1000, partials=True) == 132
    assert utils.row_programs(cuda, 50, partials=True) == 50
    assert utils.row_programs(torch.device("cpu"), 8192, partials=False) == 4


def test_rms_norm_llama_rounds_before_weight():
    # HF Llama: bf16 x -> fp32 stats -> round to bf16 -> times fp32 weight gives fp32 output.
    x, w = _inputs((3, 64), "cpu", seed=2)
    xb = x.bfloat16()
    ref = rms_norm_reference(xb, w.float())
    assert ref.dtype == torch.float32
    assert rms_norm_reference(xb, w.float(), offset=1.0).dtype == torch.bfloat16


def test_rms_norm_bad_weight_raises():
    with pytest.raises(ConfigError, match="last dimension"):
        rms_norm(torch.randn(2, 8), torch.ones(9))


@pytest.mark.gpu
# Each (dtype, offset, shape) is its own Triton compilation: bf16 runs both forms (Gemma is a bf16
# model), fp16 the Llama form; test_rms_norm_gpu_matches_hf_formula covers fp16 with offset 1.0.
@pytest.mark.parametrize("dtype,offset", [(torch.bfloat16, 0.0), (torch.bfloat16, 1.0), (torch.float16, 0.0)])
def test_rms_norm_gpu_real_size(dtype, offset):
    x, w = _inputs((4096, 4096), "cuda", seed=5)
    _check(x, w, offset, dtype=dtype)
    x, w = _inputs((2, 7, 4097), "cuda", seed=6)
    _check(x, w, offset, dtype=dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rms_norm_gpu_matches_hf_formula(dtype):
    x, w = _inputs((512, 4096), "cuda", seed=8)
    x, w = x.to(dtype), w.to(dtype)
    for offset in (0.0, 1.0):
        hf = rms_norm_reference(x, w, 1e-6, offset)  # HF's own dtype-by-dtype rounding
        ours = rms_norm(x, w, 1e-6, offset)
        assert ours.dtype == hf.dtype
        torch.testing.assert_close(ours.float(), hf.float(), atol=TOL[dtype][0], rtol=TOL[dtype][1])


@pytest.mark.gpu
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_rms_norm_gpu_frozen_weight_same_dx(offset):
    """The one-program-per-row launch (no dW) and the partial-dW launch give bitwise the same dX."""
    x, w = _inputs((8192, 4096), "cuda", seed=9)
    x, w = x.bfloat16(), w.bfloat16()
    dy = torch.randn_like(x)
    _, rstd = rms_norm_forward(x, w, 1e-6, offset)
    dx_frozen, _ = rms_norm_backward(dy, x, w, rstd, offset, False)
    dx, _ = rms_norm_backward(dy, x, w, rstd, offset, True)
    torch.testing.assert_close(dx_frozen, dx, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_rms_norm_backward_adds_the_residual_gradient_as_pytorch_does(dtype, offset, device):
    """``residual=`` (a pre-norm block's other gradient for x) gives exactly ``residual + dx``: dx
    rounded as stored alone, the sum rounded once, in the same launch."""
    x, w = _inputs((9, 200), device, seed=6)
    x, w = x.to(dtype), w.to(dtype)
    gen = torch.Generator().manual_seed(8)
    dy, res = ((torch.randn(9, 200, generator=gen, dtype=torch.float64) * 3).to(dtype).to(device) for _ in range(2))
    _, rstd = rms_norm_forward(x, w, 1e-6, offset)
    dx, _ = rms_norm_backward(dy, x, w, rstd, offset, False)
    fused, _ = rms_norm_backward(dy, x, w, rstd, offset, False, residual=res)
    assert torch.equal(fused, res + dx)
    other = torch.float16 if dtype != torch.float16 else torch.bfloat16
    with pytest.raises(ConfigError, match="residual"):
        rms_norm_backward(dy, x, w, rstd, offset, False, residual=res.to(other))
    x32 = x.float()  # fp32: the add could be fused into an FMA on the GPU, so it is refused
    with pytest.raises(ConfigError, match="16-bit"):
        rms_norm_backward(dy.float(), x32, w.float(), rstd, offset, False, residual=res.float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_rms_norm_forward_of_a_residual_sum_is_pytorchs_add_then_the_norm(dtype, offset, device):
    """``add=`` (a pre-norm block's ``h = x + o``): h has PyTorch's bits for the sum, and y and rstd are
    the norm of that h, bit for bit, also when y goes into a wider buffer."""
    x, w = _inputs((7, 300), device, seed=9)
    x, w = x.to(dtype), w.to(dtype)
    o = (torch.randn(7, 300, generator=torch.Generator().manual_seed(10), dtype=torch.float64) * 3).to(dtype).to(device)
    h_ref = x + o
    y_ref, rstd_ref = rms_norm_forward(h_ref, w, 1e-6, offset)
    y, rstd, h = rms_norm_forward(x, w, 1e-6, offset, add=o)
    assert torch.equal(h, h_ref) and torch.equal(y, y_ref) and torch.equal(rstd, rstd_ref)
    wide = torch.zeros(7, 320, dtype=y.dtype, device=device)
    rms_norm_forward(x, w, 1e-6, offset, out=wide[:, :300], add=o)
    assert torch.equal(wide[:, :300], y_ref) and not wide[:, 300:].any()
    with pytest.raises(ConfigError, match="add="):
        rms_norm_forward(x, w, 1e-6, offset, add=o[:, :299])
