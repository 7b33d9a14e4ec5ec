"""RMSNorm (Llama and Gemma forms) as one Triton row kernel forward and one backward.

Llama: ``w * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)``: the normalised row is rounded to the
input dtype *before* the weight multiply, and the result has ``promote(x, w)`` dtype (HF's
LlamaRMSNorm). Gemma (``offset=1.0``): ``(xhat * (1 + w.float())).to(x.dtype)``, the multiply in
fp32 and one rounding at the end (HF's GemmaRMSNorm). Statistics are always fp32.

Only the per-row ``rstd`` (4 bytes a row) is saved for backward; ``xhat`` is recomputed from x.
The weight gradient is reduced as in Liger-Kernel: each program walks a run of rows (~16, several
programs per SM: see ``row_programs``), accumulates its partial dW in fp32 registers, and the
partial rows are summed afterwards. A frozen weight (LoRA) needs no dW: then one program per row.
"""
import torch
import triton
import triton.language as tl

from slothnb.errors import ConfigError

from ._utils import as_rows, fast_launch, round_fp32_for_bf16, row_block, row_split, use_triton


@fast_launch
@triton.jit
def _rms_norm_fwd(X, W, Y, RSTD, ADD, H, x_stride, y_stride, add_stride, n_cols, eps, offset,
                  GEMMA: tl.constexpr, ADD_IN: tl.constexpr, H_BF16: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x_in = tl.load(X + row * x_stride + cols, mask=mask, other=0.0)
    if ADD_IN:  # the norm of h = x + add, h rounded to its dtype once (as PyTorch adds) and stored
        h = x_in.to(tl.float32) + tl.load(ADD + row * add_stride + cols, mask=mask, other=0.0).to(tl.float32)
        if H_BF16:
            h = round_fp32_for_bf16(h)
        x_in = h.to(H.dtype.element_ty)
        tl.store(H + row * n_cols + cols, x_in, mask=mask)
    x = x_in.to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    tl.store(RSTD + row, rstd)
    xhat = x * rstd
    if GEMMA:
        y = xhat * (w + offset)
    else:
        y = xhat.to(x_in.dtype).to(tl.float32) * w
    tl.store(Y + row * y_stride + cols, y.to(Y.dtype.element_ty), mask=mask)


@fast_launch
@triton.jit
def _rms_norm_bwd(DY, X, W, RSTD, DX, DW_PART, DRES, dy_stride, x_stride, dx_stride, dres_stride, n_rows, n_cols,
                  offset, rows_per_program, GEMMA: tl.constexpr, COMPUTE_DW: tl.constexpr,
                  RESIDUAL: tl.constexpr, BF16: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) + offset
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    for row in range(row_start, row_end):
        x_in = tl.load(X + row * x_stride + cols, mask=mask, other=0.0)
        dy = tl.load(DY + row * dy_stride + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        xhat = x_in.to(tl.float32) * rstd
        if COMPUTE_DW:
            if GEMMA:
                dw += dy * xhat
            else:  # Llama multiplies the weight by the *rounded* xhat
                dw += dy * xhat.to(x_in.dtype).to(tl.float32)
        dxhat = dy * w
        dx = rstd * (dxhat - xhat * (tl.sum(dxhat * xhat, axis=0) / n_cols))
        if RESIDUAL:  # dx rounded as stored alone, then + the residual's gradient, rounded once (PyTorch's add)
            dx = dx.to(DX.dtype.element_ty).to(tl.float32)
            dx = dx + tl.load(DRES + row * dres_stride + cols, mask=mask, other=0.0).to(tl.float32)
            if BF16:
                dx = round_fp32_for_bf16(dx)
        tl.store(DX + row * dx_stride + cols, dx.to(DX.dtype.element_ty), mask=mask)
    if COMPUTE_DW:
        tl.store(DW_PART + pid * n_cols + cols, dw, mask=mask)


def _check(x: torch.Tensor, weight: torch.Tensor) -> None:
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ConfigError(
            f"norm weight has shape {tuple(weight.shape)} but the input's last dimension is {x.shape[-1]}: "
            "pass the weight of the norm that matches this hidden size")
    if x.device != weight.device:
        raise ConfigError(f"input is on {x.device} but the norm weight is on {weight.device}: move both to one device")


def _out_dtype(x: torch.Tensor, weight: torch.Tensor, offset: float) -> torch.dtype:
    return x.dtype if offset != 0.0 else torch.promote_types(x.dtype, weight.dtype)


def rms_norm_forward(x2: torch.Tensor, weight: torch.Tensor, eps: float, offset: float, out_shape=None, out=None,
                     add=None):
    """Triton forward on ``[rows, n]`` (unit column stride): returns ``(y [rows, n], rstd [rows] fp32)``.

    ``out_shape``: allocate y in that (contiguous) shape instead, so that it is not a view (a later
    in-place op under autograd, e.g. RoPE on Qwen3's normed q/k, is then allowed). ``out``: write y
    there instead (``[rows, n]``, unit column stride, any row stride: the first columns of a
    widened LoRA input, ``lora_widened.widened_buffer``).

    ``add``: a ``[rows, n]`` tensor of x's dtype (unit column stride): the norm is then of
    ``h = x2 + add``, computed in the same launch (a pre-norm block's residual sum, which would
    otherwise read x and add and write h in a launch of its own), and ``(y, rstd, h)`` is returned,
    h ``[rows, n]`` contiguous with PyTorch's bits for ``x2 + add``."""
    if add is not None:
        if tuple(add.shape) != tuple(x2.shape) or add.dtype != x2.dtype or add.stride(-1) != 1 or add.device != x2.device:
            raise ConfigError(f"rms_norm_forward add= must be a {tuple(x2.shape)} {x2.dtype} tensor with unit column "
                              f"stride on {x2.device}, got {tuple(add.shape)} {add.dtype} on {add.device}")
        h = torch.empty(x2.shape, dtype=x2.dtype, device=x2.device)
        y, rstd = _forward(x2, weight, eps, offset, out_shape, out, add, h)
        return y, rstd, h
    return _forward(x2, weight, eps, offset, out_shape, out, None, None)


def _forward(x2, weight, eps, offset, out_shape, out, add, h):
    n_rows, n_cols = x2.shape
    if out is not None:
        if (tuple(out.shape) != (n_rows, n_cols) or out.stride(-1) != 1 or out.device != x2.device
                or out.dtype != _out_dtype(x2, weight, offset)):
            raise ConfigError(f"rms_norm_forward out= must be [{n_rows}, {n_cols}] {_out_dtype(x2, weight, offset)} "
                              f"with unit column stride on {x2.device}, got {tuple(out.shape)} {out.dtype}")
        y = out
    else:
        y = torch.empty(out_shape or (n_rows, n_cols), dtype=_out_dtype(x2, weight, offset), device=x2.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x2.device)
    if n_rows:
        block, warps = row_block(n_cols)
        y_stride = y.stride(0) if out is not None else n_cols
        _rms_norm_fwd[(n_rows,)](x2, weight, y, rstd, x2 if add is None else add, y if h is None else h,
                                 x2.stride(0), y_stride, 0 if add is None else add.stride(0), n_cols, eps, offset,
                                 GEMMA=offset != 0.0, ADD_IN=add is not None, H_BF16=x2.dtype == torch.bfloat16,
                                 BLOCK=block, num_warps=warps)
    return y, rstd


def rms_norm_backward(dy2, x2, weight, rstd, offset: float, compute_dw: bool = True, programs=None, residual=None):
    """Triton backward: returns ``(dx [rows, n] in x's dtype, dw in weight's dtype or None)``.

    ``programs`` overrides :func:`row_programs` via :func:`row_split` (tests: any split of the rows gives the same result).
    ``residual``: a ``[rows, n]`` gradient in x's dtype reaching x by another path (a pre-norm block's
    residual sum): dx is then ``residual + dx`` as PyTorch adds the two, in the same launch. 16-bit x
    only: dx is rounded to x's dtype before the add, which keeps the compiler from fusing the add into
    the last multiply (an fp32 sum could come out of one FMA, not two roundings)."""
    n_rows, n_cols = x2.shape
    dx = torch.empty((n_rows, n_cols), dtype=x2.dtype, device=x2.device)
    if residual is not None and (tuple(residual.shape) != (n_rows, n_cols) or residual.dtype != x2.dtype
                                 or residual.stride(-1) != 1 or x2.dtype not in (torch.bfloat16, torch.float16)):
        raise ConfigError(f"rms_norm_backward residual= must be [{n_rows}, {n_cols}] {x2.dtype} with unit column "
                          f"stride, x 16-bit; got {tuple(residual.shape)} {residual.dtype} for {x2.dtype} x")
    n_prog, rows_per_program = row_split(x2.device, n_rows, compute_dw, programs)
    part = torch.empty((n_prog, n_cols) if compute_dw else (1,), dtype=torch.float32, device=x2.device)
    if n_rows:
        block, warps = row_block(n_cols)
        res = residual if residual is not None else dx
        _rms_norm_bwd[(n_prog,)](dy2, x2, weight, rstd, dx, part, res, dy2.stride(0), x2.stride(0), dx.stride(0),
                                 res.stride(0), n_rows, n_cols, offset, rows_per_program, GEMMA=offset != 0.0,
                                 COMPUTE_DW=compute_dw, RESIDUAL=residual is not None,
                                 BF16=x2.dtype == torch.bfloat16, BLOCK=block, num_warps=warps)
    if not compute_dw:
        return dx, None
    dw = part.sum(0) if n_rows else torch.zeros(n_cols, dtype=torch.float32, device=x2.device)
    return dx, dw.to(weight.dtype)


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, offset):
        x2 = as_rows(x)
        y, rstd = rms_norm_forward(x2, weight, eps, offset, out_shape=x.shape)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.offset = offset
        return y

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        dx, dw = rms_norm_backward(as_rows(dy), x2, weight, rstd, ctx.offset, ctx.needs_input_grad[1])
        return dx.view(dy.shape), dw, None, None


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, offset: float = 0.0):
    """HF's LlamaRMSNorm (``offset=0``) / GemmaRMSNorm (``offset=1``) in plain PyTorch (float64-able)."""
    compute = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(compute)
    xhat = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if offset == 0.0:
        return weight * xhat.to(x.dtype)
    return (xhat * (offset + weight.to(compute))).to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, offset: float = 0.0) -> torch.Tensor:
    """RMSNorm over the last dimension; ``offset=1.0`` is Gemma's ``(1 + w)`` form computed in fp32."""
    _check(x, weight)
    if use_triton(x):
        return RMSNormFunction.apply(x, weight, float(eps), float(offset))
    return rms_norm_reference(x, weight, eps, offset)
