"""GeGLU ``gelu(gate) * up`` fused forward and backward, exact-erf or tanh GELU.

Same shape as SwiGLU (see swiglu.py for the launch plumbing and when backward may write the
gradients into the gate/up buffers); only the activation and its derivative differ:

- ``approximate="none"``: gelu(g) = g * Phi(g), Phi(g) = (1 + erf(g / sqrt 2)) / 2,
  gelu'(g) = Phi(g) + g * exp(-g^2 / 2) / sqrt(2 pi).
- ``approximate="tanh"`` (Gemma's gelu_pytorch_tanh): t = tanh(sqrt(2/pi) (g + 0.044715 g^3)),
  gelu(g) = g (1 + t) / 2, gelu'(g) = (1 + t) / 2 + g (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 g^2) / 2.
  (Hendrycks & Gimpel, "Gaussian Error Linear Units", 2016.)

tanh is written as ``2 * sigmoid(2x) - 1`` (tl.tanh is not in every Triton release); its absolute
error stays at fp32 rounding, which is all ``1 + t`` and ``1 - t^2`` need.
"""
import torch
import torch.nn.functional as F
import triton.language as tl
import triton

from slothnb.errors import ConfigError

from ._utils import fast_launch, use_triton
from .swiglu import check_glu_inputs, glu_backward, glu_forward, may_overwrite

# constexpr: compiled Triton kernels may only read globals annotated so (the interpreter is laxer).
SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
INV_SQRT_2 = tl.constexpr(0.7071067811865476)
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
APPROXIMATIONS = ("none", "tanh")


@triton.jit
def _gelu_and_grad(g, TANH: tl.constexpr):
    if TANH:
        # |inner| > 15 already gives tanh = +-1 in fp32; clamping keeps exp() finite.
        inner = tl.minimum(tl.maximum(SQRT_2_OVER_PI * (g + 0.044715 * g * g * g), -15.0), 15.0)
        t = 2.0 * tl.sigmoid(2.0 * inner) - 1.0
        gelu = 0.5 * g * (1.0 + t)
        dgelu = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044715 * g * g)
    else:
        cdf = 0.5 * (1.0 + tl.erf(g * INV_SQRT_2))
        gelu = g * cdf
        dgelu = cdf + g * tl.exp(-0.5 * g * g) * INV_SQRT_2PI
    return gelu, dgelu


@fast_launch
@triton.jit
def _geglu_fwd(G, U, H, g_stride, u_stride, h_stride, n_cols, TANH: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(G + row * g_stride + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * u_stride + cols, mask=mask, other=0.0).to(tl.float32)
    gelu, _ = _gelu_and_grad(g, TANH)
    tl.store(H + row * h_stride + cols, (gelu * u).to(H.dtype.element_ty), mask=mask)


@fast_launch
@triton.jit
def _geglu_bwd(DH, G, U, DG, DU, dh_stride, g_stride, u_stride, dg_stride, du_stride, n_cols,
               TANH: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    dh = tl.load(DH + row * dh_stride + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + row * g_stride + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * u_stride + cols, mask=mask, other=0.0).to(tl.float32)
    gelu, dgelu = _gelu_and_grad(g, TANH)
    tl.store(DG + row * dg_stride + cols, (dh * u * dgelu).to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + row * du_stride + cols, (dh * gelu).to(DU.dtype.element_ty), mask=mask)


class GeGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, approximate="none", inplace_backward=True):
        ctx.overwrite = may_overwrite(gate, up, inplace_backward)
        ctx.tanh = approximate == "tanh"
        ctx.save_for_backward(gate, up)
        return glu_forward(_geglu_fwd, gate, up, TANH=ctx.tanh)

    @staticmethod
    def backward(ctx, dh):
        gate, up = ctx.saved_tensors
        dg, du = glu_backward(_geglu_bwd, dh, gate, up, ctx.overwrite, TANH=ctx.tanh)
        return dg, du, None, None


def geglu_reference(gate, up, approximate="none"):
    """``gelu(gate, approximate) * up`` in plain PyTorch (float64-able)."""
    return F.gelu(gate, approximate=approximate) * up


def geglu(gate: torch.Tensor, up: torch.Tensor, approximate: str = "none", inplace_backward: bool = True):
    """``gelu(gate) * up``, fused; ``approximate`` is ``"none"`` (exact erf) or ``"tanh"``."""
    if approximate not in APPROXIMATIONS:
        raise ConfigError(f"geglu approximate={approximate!r} is not supported: use 'none' (exact erf GELU) "
                          "or 'tanh' (gelu_pytorch_tanh, as in Gemma)")
    check_glu_inputs(gate, up, "geglu")
    if use_triton(gate):
        return GeGLUFunction.apply(gate, up, approximate, inplace_backward)
    return geglu_reference(gate, up, approximate)
