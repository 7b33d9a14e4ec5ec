"""LayerNorm over the last dimension as one Triton row kernel forward and one backward.

Matches ``torch.nn.functional.layer_norm``: mean and variance (biased) in fp32, ``xhat * w + b`` in
fp32, one rounding to the input dtype. Saves only the per-row mean and rstd (8 bytes a row);
dW and dB are reduced like RMSNorm's dW: per-program fp32 partial rows, summed afterwards; with
both frozen (LoRA) the backward launches one program per row and writes no partial rows.
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from slothnb.errors import ConfigError

from ._utils import as_rows, fast_launch, row_block, row_split, use_triton


@fast_launch
@triton.jit
def _layer_norm_fwd(X, W, B, Y, MEAN, RSTD, x_stride, y_stride, n_cols, eps,
                    HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / n_cols
    xc = tl.where(mask, x - mean, 0.0)
    rstd = tl.rsqrt(tl.sum(xc * xc, axis=0) / n_cols + eps)
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)
    y = xc * rstd * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * y_stride + cols, y.to(Y.dtype.element_ty), mask=mask)


@fast_launch
@triton.jit
def _layer_norm_bwd(DY, X, W, MEAN, RSTD, DX, DW_PART, DB_PART, dy_stride, x_stride, dx_stride,
                    n_rows, n_cols, rows_per_program, COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr,
                    BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    db = tl.zeros([BLOCK], dtype=tl.float32)
    for row in range(row_start, row_end):
        x = tl.load(X + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * dy_stride + cols, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + row)
        rstd = tl.load(RSTD + row)
        xhat = tl.where(mask, (x - mean) * rstd, 0.0)
        if COMPUTE_DW:
            dw += dy * xhat
        if COMPUTE_DB:
            db += dy
        dxhat = dy * w
        c1 = tl.sum(dxhat * xhat, axis=0) / n_cols
        c2 = tl.sum(dxhat, axis=0) / n_cols
        dx = rstd * (dxhat - c2 - xhat * c1)
        tl.store(DX + row * dx_stride + cols, dx.to(DX.dtype.element_ty), mask=mask)
    if COMPUTE_DW:
        tl.store(DW_PART + pid * n_cols + cols, dw, mask=mask)
    if COMPUTE_DB:
        tl.store(DB_PART + pid * n_cols + cols, db, mask=mask)


def _check(x, weight, bias):
    for name, p in (("weight", weight), ("bias", bias)):
        if p is None:
            continue
        if p.dim() != 1 or p.shape[0] != x.shape[-1]:
            raise ConfigError(f"layer_norm {name} has shape {tuple(p.shape)} but the input's last dimension is "
                              f"{x.shape[-1]}: pass the {name} of the norm that matches this hidden size")
        if p.device != x.device:
            raise ConfigError(f"input is on {x.device} but the layer_norm {name} is on {p.device}: "
                              "move both to one device")


def layer_norm_forward(x2, weight, bias, eps):
    """Triton forward on ``[rows, n]``: returns ``(y, mean, rstd)`` (mean/rstd fp32 ``[rows]``)."""
    n_rows, n_cols = x2.shape
    y = torch.empty((n_rows, n_cols), dtype=x2.dtype, device=x2.device)
    mean = torch.empty(n_rows, dtype=torch.float32, device=x2.device)
    rstd = torch.empty_like(mean)
    if n_rows:
        block, warps = row_block(n_cols)
        _layer_norm_fwd[(n_rows,)](x2, weight, bias if bias is not None else weight, y, mean, rstd,
                                   x2.stride(0), y.stride(0), n_cols, eps, HAS_BIAS=bias is not None,
                                   BLOCK=block, num_warps=warps)
    return y, mean, rstd


def layer_norm_backward(dy2, x2, weight, mean, rstd, compute_dw=True, compute_db=True, bias_dtype=None,
                        programs=None):
    """Triton backward: returns ``(dx, dw or None, db or None)``.

    ``programs`` overrides :func:`row_programs` via :func:`row_split` (tests: any split of the rows gives the same result)."""
    n_rows, n_cols = x2.shape
    dx = torch.empty((n_rows, n_cols), dtype=x2.dtype, device=x2.device)
    n_prog, rows_per_program = row_split(x2.device, n_rows, compute_dw or compute_db, programs)
    dw_part = torch.empty((n_prog, n_cols) if compute_dw else (1,), dtype=torch.float32, device=x2.device)
    db_part = torch.empty((n_prog, n_cols) if compute_db else (1,), dtype=torch.float32, device=x2.device)
    if n_rows:
        block, warps = row_block(n_cols)
        _layer_norm_bwd[(n_prog,)](dy2, x2, weight, mean, rstd, dx, dw_part, db_part, dy2.stride(0),
                                   x2.stride(0), dx.stride(0), n_rows, n_cols, rows_per_program,
                                   COMPUTE_DW=compute_dw, COMPUTE_DB=compute_db, BLOCK=block, num_warps=warps)
    else:
        dw_part.zero_(), db_part.zero_()
    dw = dw_part.sum(0).to(weight.dtype) if compute_dw else None
    db = db_part.sum(0).to(bias_dtype or weight.dtype) if compute_db else None
    return dx, dw, db


class LayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        x2 = as_rows(x)
        y, mean, rstd = layer_norm_forward(x2, weight, bias, eps)
        ctx.save_for_backward(x2, weight, mean, rstd)
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, mean, rstd = ctx.saved_tensors
        need_db = ctx.needs_input_grad[2] and ctx.bias_dtype is not None
        dx, dw, db = layer_norm_backward(as_rows(dy), x2, weight, mean, rstd, ctx.needs_input_grad[1],
                                         need_db, ctx.bias_dtype)
        return dx.view(dy.shape), dw, db, None


def layer_norm_reference(x, weight, bias=None, eps: float = 1e-5):
    """LayerNorm in plain PyTorch, statistics and affine in fp32 (or float64), output in x's dtype."""
    compute = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(compute)
    mean = xf.mean(-1, keepdim=True)
    var = (xf - mean).pow(2).mean(-1, keepdim=True)
    y = (xf - mean) * torch.rsqrt(var + eps) * weight.to(compute)
    if bias is not None:
        y = y + bias.to(compute)
    return y.to(x.dtype)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm over the last dimension with weight (and optional bias) gradients."""
    _check(x, weight, bias)
    if use_triton(x):
        return LayerNormFunction.apply(x, weight, bias, float(eps))
    if weight.dtype == x.dtype and (bias is None or bias.dtype == x.dtype):
        return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    return layer_norm_reference(x, weight, bias, eps)
