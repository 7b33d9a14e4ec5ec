"""The gated activations inside ``lora_mlp``: ``h = act(g) * u`` and its in-place fused backward.

Forward goes through the shared faces (``swiglu.swiglu``, ``geglu.geglu``). Backward needs more than
their ``(dg, du)``: the down projection's ``dA`` needs h again. ``gated_backward`` therefore runs one
kernel that reads ``dh, g, u`` once and writes h over dh, dg over g and du over u (Unsloth's
trick): the MLP backward allocates no ``[N, intermediate]`` buffer besides dh. The activation math
is geglu.py's ``_gelu_and_grad`` (erf / tanh) and silu'(g) = s (1 + g (1 - s)), s = sigmoid(g),
all in fp32. float64 inputs (the tests' references) and the no-Triton path use exact PyTorch.
"""
import math

import torch
import triton
import triton.language as tl

from ._utils import cdiv, fast_launch, next_power_of_2, use_triton
from .geglu import _gelu_and_grad, geglu
from .swiglu import swiglu

ACTIVATIONS = ("swiglu", "geglu", "geglu_tanh")
BLOCK = 1024


@fast_launch
@triton.jit
def _gated_backward_inplace(DH, G, U, n_cols, ACT: tl.constexpr, BLOCK: tl.constexpr):
    """ACT 0: silu, 1: gelu (erf), 2: gelu (tanh). Writes h -> DH, dg -> G, du -> U."""
    row = tl.program_id(0).to(tl.int64)
    offs = row * n_cols + tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK) < n_cols
    dh = tl.load(DH + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    if ACT == 0:
        sig = tl.sigmoid(g)
        act = g * sig
        dact = sig * (1.0 + g * (1.0 - sig))
    else:
        act, dact = _gelu_and_grad(g, ACT == 2)
    tl.store(DH + offs, (act * u).to(DH.dtype.element_ty), mask=mask)
    tl.store(G + offs, (dh * u * dact).to(G.dtype.element_ty), mask=mask)
    tl.store(U + offs, (dh * act).to(U.dtype.element_ty), mask=mask)


def _act_and_grad_torch(activation, g):
    """(act(g), act'(g)) in PyTorch, fp32 for 16-bit g (float64 stays float64)."""
    g = g.float() if g.dtype in (torch.float16, torch.bfloat16) else g
    if activation == "swiglu":
        s = torch.sigmoid(g)
        return g * s, s * (1.0 + g * (1.0 - s))
    if activation == "geglu":
        cdf = 0.5 * (1.0 + torch.erf(g * (1.0 / math.sqrt(2.0))))
        return g * cdf, cdf + g * torch.exp(-0.5 * g * g) * (1.0 / math.sqrt(2.0 * math.pi))
    c, k = math.sqrt(2.0 / math.pi), 0.044715  # Hendrycks & Gimpel (2016), tanh approximation
    t = torch.tanh(c * (g + k * g * g * g))
    return 0.5 * g * (1.0 + t), 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * c * (1.0 + 3.0 * k * g * g)


def _fused(t):
    return use_triton(t) and t.dtype != torch.float64


def gated_forward(activation: str, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    if _fused(g):
        if activation == "swiglu":
            return swiglu(g, u)
        return geglu(g, u, approximate="tanh" if activation == "geglu_tanh" else "none")
    act, _ = _act_and_grad_torch(activation, g)
    return (act * u.to(act.dtype)).to(g.dtype)


def gated_backward(activation: str, dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor):
    """(h, dg, du) for ``h = act(g) * u``. On the fused path they are dh, g, u themselves, overwritten
    (scratch of the caller; a non-contiguous one is copied first); g's and u's autograd versions are
    bumped so a retained graph that reuses them fails loudly instead of reading gradients."""
    if not _fused(g):
        act, dact = _act_and_grad_torch(activation, g)
        u32, dh32 = u.to(act.dtype), dh.to(act.dtype)
        return (act * u32).to(g.dtype), (dh32 * u32 * dact).to(g.dtype), (dh32 * act).to(g.dtype)
    dh, g_buf, u_buf = dh.contiguous(), g.contiguous(), u.contiguous()  # no-ops for the caller's buffers
    n_cols = g.shape[-1]
    n_rows = g.numel() // max(n_cols, 1)
    if g.numel():
        block = min(BLOCK, next_power_of_2(n_cols))
        grid = (n_rows, cdiv(n_cols, block))
        _gated_backward_inplace[grid](dh, g_buf, u_buf, n_cols, ACT=ACTIVATIONS.index(activation), BLOCK=block)
    for t in (g, u):
        torch.autograd.graph.increment_version(t)
    return dh, g_buf, u_buf


__all__ = ["ACTIVATIONS", "gated_forward", "gated_backward"]
