"""LayerNorm kernels vs a float64 reference: forward, dX, dW and dB.

Tolerances: fp32 (CPU interpreter) 2e-5 abs / 1e-5 rel; bf16 3e-2/2e-2 and fp16 4e-3/4e-3 on GPU.
dW/dB sum over rows, so they are compared relative to their largest entry.
"""
import pytest
import torch
import torch.nn.functional as F

from slothnb.errors import ConfigError
from slothnb.kernels.layer_norm import (LayerNormFunction, layer_norm, layer_norm_backward, layer_norm_forward,
                                        layer_norm_reference)

TOL = {torch.float32: (2e-5, 1e-5), torch.bfloat16: (3e-2, 2e-2), torch.float16: (4e-3, 4e-3)}
SUM_REL = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


def _inputs(shape, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 1.5  # non-zero mean on purpose
    w = torch.randn(shape[-1], generator=g, dtype=torch.float64) * 0.5 + 1
    b = torch.randn(shape[-1], generator=g, dtype=torch.float64) * 0.2
    return x.to(device), w.to(device), b.to(device)


def _check(x, w, b, dtype=torch.float32, eps=1e-5):
    xk = x.to(dtype).requires_grad_()
    wk = w.to(dtype).requires_grad_()
    bk = b.to(dtype).requires_grad_() if b is not None else None
    y = LayerNormFunction.apply(xk, wk, bk, eps)
    x64 = xk.detach().double().requires_grad_()
    w64 = wk.detach().double().requires_grad_()
    b64 = bk.detach().double().requires_grad_() if b is not None else None
    ref = layer_norm_reference(x64, w64, b64, eps)
    dy = torch.randn(ref.shape, generator=torch.Generator().manual_seed(11), dtype=torch.float64).to(x.device)
    y.backward(dy.to(dtype))
    ref.backward(dy.to(dtype).double())
    atol, rtol = TOL[dtype]
    assert y.dtype == dtype and y.shape == x.shape
    torch.testing.assert_close(y.double(), ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(xk.grad.double(), x64.grad, atol=atol, rtol=rtol)
    pairs = [(wk.grad, w64.grad)] + ([(bk.grad, b64.grad)] if b is not None else [])
    for got, want in pairs:
        err = (got.double() - want).abs().max().item()
        assert err <= SUM_REL[dtype] * want.abs().max().item(), err


@pytest.mark.parametrize("shape", [(3, 4097), (1, 64), (2, 3, 96), (1, 1, 33)])
def test_layer_norm_fp32_vs_float64(shape, device):
    x, w, b = _inputs(shape, device)
    _check(x, w, b)


def test_layer_norm_without_bias_and_non_contiguous(device):
    x, w, b = _inputs((2, 5, 120), device, seed=2)
    _check(x, w, None)
    _check(x[:, :, :60], w[:60], b[:60])
    _check(x.transpose(0, 1), w, b)
    _check(x[..., ::2], w[:60], b[:60])


def test_layer_norm_face_matches_torch(device):
    x, w, b = _inputs((4, 50), device, seed=3)
    x, w, b = x.float(), w.float(), b.float()
    torch.testing.assert_close(layer_norm(x, w, b, 1e-5), F.layer_norm(x, (50,), w, b, 1e-5), atol=2e-5, rtol=1e-5)


def test_layer_norm_frozen_params_skip_their_grads(device):
    x, w, b = _inputs((3, 40), device, seed=4)
    x = x.float().requires_grad_()
    y = layer_norm(x, w.float(), b.float())
    y.square().sum().backward()
    x64 = x.detach().double().requires_grad_()
    layer_norm_reference(x64, w, b).square().sum().backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=2e-5, rtol=1e-5)


def test_layer_norm_backward_any_row_split(device):
    """dW/dB partial rows from 1, 3 (uneven: 3+3+1) or 7 programs, dW without dB, and the no-partials
    launch, all match float64; dX is bitwise the same whatever the split."""
    x, w, b = _inputs((7, 96), device, seed=6)
    xf, wf, bf = x.float(), w.float(), b.float()
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(device)
    x64, w64, b64 = (t.double().requires_grad_() for t in (xf, wf, bf))
    layer_norm_reference(x64, w64, b64).backward(dy.float().double())
    _, mean, rstd = layer_norm_forward(xf, wf, bf, 1e-5)
    dxs = []
    for programs, need_db in ((1, True), (3, True), (7, True), (3, False)):
        dx, dw, db = layer_norm_backward(dy.float(), xf, wf, mean, rstd, True, need_db, programs=programs)
        torch.testing.assert_close(dx.double(), x64.grad, atol=2e-5, rtol=1e-5)
        assert (dw.double() - w64.grad).abs().max().item() <= 1e-5 * w64.grad.abs().max().item()
        if need_db:
            assert (db.double() - b64.grad).abs().max().item() <= 1e-5 * b64.grad.abs().max().item()
        else:
            assert db is None
        dxs.append(dx)
    dx_frozen, dw_frozen, db_frozen = layer_norm_backward(dy.float(), xf, wf, mean, rstd, False, False)
    assert dw_frozen is None and db_frozen is None
    for dx in dxs[1:] + [dx_frozen]:
        torch.testing.assert_close(dx, dxs[0], atol=0, rtol=0)


def test_layer_norm_bad_bias_raises():
    with pytest.raises(ConfigError, match="bias"):
        layer_norm(torch.randn(2, 8), torch.ones(8), torch.zeros(7))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_layer_norm_gpu_real_size(dtype):
    x, w, b = _inputs((4096, 4096), "cuda", seed=5)
    _check(x, w, b, dtype=dtype)
    x, w, b = _inputs((2, 7, 4097), "cuda", seed=6)
    _check(x, w, None, dtype=dtype)
    xs = x.to(dtype)
    torch.testing.assert_close(layer_norm(xs, w.to(dtype), b.to(dtype)).float(),
                               F.layer_norm(xs, (4097,), w.to(dtype), b.to(dtype)).float(),
                               atol=TOL[dtype][0], rtol=TOL[dtype][1])


@pytest.mark.gpu
def test_layer_norm_gpu_frozen_params_same_dx():
    """The one-program-per-row launch (no dW/dB) and the partial-row launch give bitwise the same dX."""
    x, w, b = _inputs((8192, 4096), "cuda", seed=9)
    x, w, b = x.bfloat16(), w.bfloat16(), b.bfloat16()
    dy = torch.randn_like(x)
    _, mean, rstd = layer_norm_forward(x, w, b, 1e-5)
    dx_frozen, _, _ = layer_norm_backward(dy, x, w, mean, rstd, False, False)
    dx, _, _ = layer_norm_backward(dy, x, w, mean, rstd, True, True)
    torch.testing.assert_close(dx_frozen, dx, atol=0, rtol=0)
