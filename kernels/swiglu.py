"""SwiGLU ``silu(gate) * up`` fused forward and backward, plus the plumbing GeGLU shares.

Forward reads gate and up once and writes h (fp32 math, one rounding). Backward recomputes the
activation from gate/up instead of saving it, and, when that is safe, writes dgate and dup
straight into the gate/up buffers (as Liger-Kernel does): the MLP's two largest activations are
then reused for their own gradients and backward allocates nothing.

"Safe" means: gate/up are intermediate results (not leaves, not user data without grad) that do
not overlap each other. After overwriting, their autograd version counters are bumped, so any
other node that had saved them (or a second backward with ``retain_graph``) fails loudly rather
than reading gradients as activations. Pass ``inplace_backward=False`` to opt out.
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from slothnb.errors import ConfigError

from ._utils import as_rows, cdiv, fast_launch, next_power_of_2, use_triton

# Columns per program: a 2-D grid (rows, column blocks) keeps row strides free. 4096 columns with
# 16 warps was the fastest of 512-4096 x 2-16 warps on an H100 at 8192 x 14336 bf16
# (bench/sweep_glu.py, docs/benchmarks.md): 0.99 of the copy floor against 0.976 for 1024 x 4.
BLOCK = 4096


def glu_warps(block: int) -> int:
    """16 warps for a 4096-column block, scaled down with it (256 columns a warp)."""
    return max(1, min(16, block // 256))


@fast_launch
@triton.jit
def _swiglu_fwd(G, U, H, g_stride, u_stride, h_stride, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(G + row * g_stride + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * u_stride + cols, mask=mask, other=0.0).to(tl.float32)
    h = g * tl.sigmoid(g) * u
    tl.store(H + row * h_stride + cols, h.to(H.dtype.element_ty), mask=mask)


@fast_launch
@triton.jit
def _swiglu_bwd(DH, G, U, DG, DU, dh_stride, g_stride, u_stride, dg_stride, du_stride, n_cols,
                BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    dh = tl.load(DH + row * dh_stride + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + row * g_stride + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * u_stride + cols, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    # d silu(g) / dg = sig * (1 + g * (1 - sig))
    dg = dh * u * sig * (1.0 + g * (1.0 - sig))
    du = dh * g * sig
    tl.store(DG + row * dg_stride + cols, dg.to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + row * du_stride + cols, du.to(DU.dtype.element_ty), mask=mask)


def check_glu_inputs(gate, up, name):
    if gate.shape != up.shape:
        raise ConfigError(f"{name}: gate {tuple(gate.shape)} and up {tuple(up.shape)} must have the same shape "
                          "(the outputs of gate_proj and up_proj for the same tokens)")
    if gate.device != up.device:
        raise ConfigError(f"{name}: gate is on {gate.device} but up is on {up.device}: move both to one device")


def _grid(n_rows, n_cols):
    block = min(BLOCK, next_power_of_2(n_cols))
    return (n_rows, cdiv(n_cols, block)), block


def glu_forward(kernel, gate, up, **meta):
    """Runs a fused GLU forward kernel on any-shaped gate/up; returns h shaped like gate."""
    g2, u2 = as_rows(gate), as_rows(up)
    h = torch.empty(g2.shape, dtype=torch.promote_types(gate.dtype, up.dtype), device=gate.device)
    if h.numel():
        grid, block = _grid(*g2.shape)
        kernel[grid](g2, u2, h, g2.stride(0), u2.stride(0), h.stride(0), g2.shape[1], BLOCK=block,
                     num_warps=glu_warps(block), **meta)
    return h.view(gate.shape)


def _overlap(a, b):
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False
    def span(t):
        start = t.storage_offset()
        return start, start + sum((n - 1) * st for n, st in zip(t.shape, t.stride())) + 1
    (a0, a1), (b0, b1) = span(a), span(b)
    return a0 < b1 and b0 < a1


def may_overwrite(gate, up, inplace_backward):
    """Whether backward may write dgate/dup into the gate/up buffers (see the module docstring)."""
    return (inplace_backward and gate.grad_fn is not None and up.grad_fn is not None
            and not _overlap(gate, up))


def glu_backward(kernel, dh, gate, up, overwrite, **meta):
    """Runs a fused GLU backward kernel; returns (dgate, dup) shaped like gate/up.
    With ``overwrite`` the gradients are written into gate/up's own storage."""
    g2, u2, dh2 = as_rows(gate), as_rows(up), as_rows(dh)
    if overwrite:
        dg2, du2 = g2, u2
    else:
        dg2, du2 = torch.empty_like(g2, memory_format=torch.contiguous_format), torch.empty_like(u2, memory_format=torch.contiguous_format)
    if g2.numel():
        grid, block = _grid(*g2.shape)
        kernel[grid](dh2, g2, u2, dg2, du2, dh2.stride(0), g2.stride(0), u2.stride(0), dg2.stride(0),
                     du2.stride(0), g2.shape[1], BLOCK=block, num_warps=glu_warps(block), **meta)
    if overwrite:
        for t in (gate, up):
            increment = getattr(torch.autograd.graph, "increment_version", None)
            if increment is not None:
                increment(t)
    dg = dg2.view(gate.shape) if dg2.is_contiguous() else gate
    du = du2.view(up.shape) if du2.is_contiguous() else up
    return dg, du


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, inplace_backward=True):
        ctx.overwrite = may_overwrite(gate, up, inplace_backward)
        ctx.save_for_backward(gate, up)
        return glu_forward(_swiglu_fwd, gate, up)

    @staticmethod
    def backward(ctx, dh):
        gate, up = ctx.saved_tensors
        dg, du = glu_backward(_swiglu_bwd, dh, gate, up, ctx.overwrite)
        return dg, du, None


def swiglu_reference(gate, up):
    """``silu(gate) * up`` in plain PyTorch (float64-able)."""
    return F.silu(gate) * up


def swiglu(gate: torch.Tensor, up: torch.Tensor, inplace_backward: bool = True) -> torch.Tensor:
    """``silu(gate) * up``, fused; gate/up may be any shape (same for both), 2-D or 3-D."""
    check_glu_inputs(gate, up, "swiglu")
    if use_triton(gate):
        return SwiGLUFunction.apply(gate, up, inplace_backward)
    return swiglu_reference(gate, up)
