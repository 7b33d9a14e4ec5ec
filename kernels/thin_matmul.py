"""The LoRA ops' rank-r products as one Triton matmul, launched in C: less host time a product than cuBLAS's.

A LoRA layer's three passes issue ~43 products with a rank-r side (``bench/layer_ops.py``): ``x Aᵀ``
(N = r), ``(x Aᵀ) Bᵀ`` (K = r), ``dY B`` and ``dYᵀ (x Aᵀ)`` (N = r), ``[dY B] A`` (K = r). An 8B step
issues ~1,300 of them. Each is memory-bound on its large side, and through ``torch.mm`` each costs the host
14-19 µs on the H100 machines (docs/perf-notes.md, section 13), where a bound Triton launch costs ~5
(``FastLaunch.bind``). ``mm`` takes the products with N or K of at most ``THIN`` and leaves the rest
to ``torch.mm``.

One kernel: C = A B with any strides (a transposed operand is a view), fp32 accumulation, C in its own
dtype (an fp32 C gives an adapter's gradient straight from the accumulator, as ``mm(out_dtype=)`` does).
Tiles by the thin side: for N <= THIN, one program covers all N columns of ``BLOCK_M`` rows and walks K;
for K <= THIN, one dot a tile. Products with a long reduction and a short output (``dYᵀ xa`` for k/v)
get few programs this way; whether each shape holds cuBLAS's device time on a GPU is not yet measured,
so it is opt-in: ``SLOTHNB_THIN_MM=1`` (docs/benchmarks.md, "Next GPU session").

In Triton's interpreter ``tl.dot`` on 16-bit tiles is wrong, so there the tiles are widened to fp32 first.
"""
import os

import torch
import triton
import triton.language as tl

from ._utils import INTERPRET, cdiv, fast_launch, next_power_of_2, switched_on, use_triton

# "1": the LoRA ops' thin products through ``mm``'s kernel; "0" (default): torch.mm; "cpu": in the
# interpreter only (tests).
THIN_MM = os.environ.get("SLOTHNB_THIN_MM", "0")
THIN = 64  # the widest thin side ``mm`` takes (q/k/v's three rank-16 adapters side by side: 48)
_16BIT = (torch.bfloat16, torch.float16)
_OUT = (torch.bfloat16, torch.float16, torch.float32)
_SLOTS = (0, 1, 2)  # A, B and C: the pointers a bound launch is given at each call
MAX_BOUND = 256  # launch shapes kept bound (an 8B step makes a few dozen)
_BOUND: dict = {}


@fast_launch
@triton.jit
def _thin_mm_kernel(A, B, C, M, N, K, s_am, s_ak, s_bk, s_bn, s_cm, s_cn,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_F32: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    ks = tl.arange(0, BLOCK_K).to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + ks
        a = tl.load(A + rows[:, None] * s_am + k[None, :] * s_ak, mask=(rows[:, None] < M) & (k[None, :] < K), other=0.0)
        b = tl.load(B + k[:, None] * s_bk + cols[None, :] * s_bn, mask=(k[:, None] < K) & (cols[None, :] < N), other=0.0)
        if DOT_F32:
            acc += tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(a, b)
    tl.store(C + rows[:, None] * s_cm + cols[None, :] * s_cn, acc.to(C.dtype.element_ty),
             mask=(rows[:, None] < M) & (cols[None, :] < N))


PROGRAMS = 128  # a thin-N product takes row blocks of 64 down to 16 until it has about this many programs


def _tiles(M, N, K):
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps) for a product whose N or K is thin."""
    if N <= THIN:  # x Aᵀ, dY B, dYᵀ xa: all N columns a program, the long K walked; enough programs to fill the SMs
        block_m = 64
        while block_m > 16 and cdiv(M, block_m) < PROGRAMS:
            block_m //= 2
        return block_m, max(16, next_power_of_2(N)), 64, 4
    return 128, 128, max(16, next_power_of_2(K)), 8  # (x Aᵀ) Bᵀ, [dY B] A: one dot a tile


def applies(a: torch.Tensor, b: torch.Tensor, out_dtype=None) -> bool:
    """Whether ``mm`` runs ``a @ b`` in its kernel (switched on, 2-D 16-bit operands of one dtype on a
    Triton device, a thin N or K, nothing for autograd to record), else it is ``torch.mm``'s."""
    if not switched_on(THIN_MM, a) or not use_triton(a):
        return False
    if a.dim() != 2 or b.dim() != 2 or a.dtype not in _16BIT or b.dtype != a.dtype or b.device != a.device:
        return False
    if (out_dtype or a.dtype) not in _OUT or (torch.is_grad_enabled() and (a.requires_grad or b.requires_grad)):
        return False  # (the kernel records no autograd graph: the Functions call it with grad off)
    return min(b.shape[1], a.shape[1]) <= THIN and a.shape[0] > 0 and b.shape[1] > 0


def mm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None, out_dtype=None) -> torch.Tensor:
    """``a @ b`` (into ``out`` when given; in ``out_dtype`` when given, else a's), through the thin kernel
    where it applies (``applies``), else ``torch.mm``. ``out``: a 2-D ``[M, N]`` tensor of any strides
    (a transposed view, a column slice), written in place."""
    if THIN_MM == "0" and out_dtype is None:  # the default: torch's, with no more Python than it needs
        return torch.mm(a, b, out=out) if out is not None else torch.mm(a, b)
    dtype = out.dtype if out is not None else (out_dtype or a.dtype)
    if not applies(a, b, dtype):
        if dtype == a.dtype:  # (with neither out nor out_dtype given, it is)
            return torch.mm(a, b, out=out) if out is not None else torch.mm(a, b)
        product = torch.mm(a, b).to(dtype)
        return product if out is None else out.copy_(product)
    M, K = a.shape
    N = b.shape[1]
    if out is None:
        out = torch.empty(M, N, dtype=dtype, device=a.device)
    elif out.shape != (M, N) or out.device != a.device:
        raise ValueError(f"thin_matmul.mm: out is {tuple(out.shape)} on {out.device}, the product {(M, N)} on {a.device}")
    if K == 0:
        return out.zero_()
    key = (M, N, K, a.stride(), b.stride(), out.stride(), a.dtype, dtype, a.device, PROGRAMS,
           a.data_ptr() % 16 == 0, b.data_ptr() % 16 == 0, out.data_ptr() % 16 == 0)
    bound = _BOUND.get(key)
    if bound is not None and bound(a, b, out):
        return out
    bm, bn, bk, warps = _tiles(M, N, K)
    grid = (cdiv(M, bm), cdiv(N, bn))
    args = (a, b, out, M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1))
    meta = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, DOT_F32=INTERPRET, num_warps=warps)
    if len(_BOUND) >= MAX_BOUND:
        _thin_mm_kernel[grid](*args, **meta)
        return out
    bound = _thin_mm_kernel.bind(grid, args, meta, _SLOTS)
    if bound is not None:
        _BOUND[key] = bound
    return out
