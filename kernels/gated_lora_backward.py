"""The LoRA MLP's gated backward with the adapters' thin products of dG, dU and h in the same pass.

``lora.LoraMLPFunction.backward`` runs the gated backward (``lora_activations.gated_backward``: reads dh,
g, u; writes h, dg, du over them), then five rank-r matmuls that each read one of those
``[tokens, intermediate]`` tensors again: ``dB_g = dG^T xa_g``, ``dG B_g``, the same two for up, and
``dA_d = (dY B_d)^T h``. At 8B shapes and 2 x 2,048 tokens each tensor is 117 MB, so those five passes are
~0.6 GB of traffic a layer for a few MFLOP. Here one kernel computes them from the tiles it has just
written, still in registers: the same h, dg, du (bits included), and the five products with fp32
accumulation, as partial sums that a fixed-order reduction adds up (deterministic: no atomics). Given
``A_d``, it also adds the down adapter's share of dh, ``s_d (dY B_d) A_d``, to each tile itself: the MLP
backward then has its base matmul write ``dY W_d`` alone, and no ``[tokens, intermediate]`` tensor is
written for that share and read back (dh's bits then differ from the two-matmul form's by rounding).

A program owns a group of ``ROW_BLOCKS * BM`` rows and one split of the columns. It walks the split ``BN``
columns at a time and, for each, the group's row blocks: products reduced over rows (``dG^T xa_g``,
``dU^T xa_u``, ``h^T dyb_d``) accumulate in registers over the group and leave one partial per group, stored
once; products reduced over columns (``dG B_g``, ``dU B_u``) are added tile by tile into the program's own
rows of one partial per split (a few KB, in cache). The splits are chosen so that groups x splits makes
~``TARGET_PROGRAMS`` programs. At 8B shapes (2 x 2,048 tokens) the partials are ~50 MB against the ~0.6 GB
of reads saved. Ranks are padded to a power of two >= 16 (what ``tl.dot`` takes) with zeros.

Opt-in (``SLOTHNB_FUSED_MLP_THIN=1``): built and checked in Triton's interpreter in session 26, not yet
timed on a GPU. By traffic it should save ~150-200 us a layer at 8B shapes (~5-6 ms a step).
"""
import os
from types import SimpleNamespace

import torch
import triton
import triton.language as tl

from ._utils import INTERPRET, cdiv, fast_launch, next_power_of_2, use_triton
from .lora_activations import ACTIVATIONS, act_and_grad

FUSED = os.environ.get("SLOTHNB_FUSED_MLP_THIN", "0") == "1"
# A program: ROW_BLOCKS blocks of BM rows (a row group) and its split's columns, BN at a time. Not yet timed
# on a GPU. Compiled for sm_90a on the development machine (Triton 3.9, its ptxas -v), this is one of the
# few shapes without register spills: 255 registers, so one program of 8 warps per SM. 64 x 32 spilled
# 168 bytes (8 warps) to 616 (4 warps), 256 x 32 ~2.6 KB. The five small dots' operand layouts take the
# registers: the gated math alone takes 128 at 64 x 32 (the two-pass gated kernel: 61).
BM, ROW_BLOCKS, BN, NUM_WARPS = 64, 4, 16, 8
TARGET_PROGRAMS = 128  # column splits are chosen so that groups x splits reaches about this many programs
MAX_RANK = 128  # larger adapters keep the matmuls (the accumulators would not fit in registers)
_16BIT = (torch.bfloat16, torch.float16)


@fast_launch
@triton.jit
def _gated_lora_bwd(DH, G, U, XG, XU, DYB, BG, BU, AD, PG, PU, PD, QG, QU,
                    n_rows, n_cols, rank_g, rank_u, rank_d, xg_stride, xu_stride, dyb_stride, per_split, ad_scale,
                    ACT: tl.constexpr, BM: tl.constexpr, ROW_BLOCKS: tl.constexpr, BN: tl.constexpr,
                    RG: tl.constexpr, RU: tl.constexpr, RD: tl.constexpr, HAS_AD: tl.constexpr, DOT_F32: tl.constexpr):
    """h -> DH, dg -> G, du -> U (as ``_gated_backward_inplace``); PG[m] / PU[m] / PD[m] ``[n_cols, R]``: row group
    m's dG^T xa_g, dU^T xa_u, h^T dyb; QG[s] / QU[s] ``[n_rows, R]`` (zeroed by the caller): column split s's
    dG B_g, dU B_u. ``HAS_AD``: DH holds only the base term ``dY W_d``, and ``ad_scale * dyb A_d`` is added to
    each tile in fp32. ``DOT_F32``: the products' operands widened to fp32 first (Triton's interpreter
    computes 16-bit ``tl.dot`` wrongly); the same values, so the same sums."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    col_start = pid_s * per_split
    col_end = tl.minimum(col_start + per_split, n_cols)
    row_start = pid_m * (BM * ROW_BLOCKS)
    rg, ru, rd = tl.arange(0, RG), tl.arange(0, RU), tl.arange(0, RD)
    for c0 in range(col_start, col_end, BN):
        cols = c0 + tl.arange(0, BN)
        cmask = cols < col_end
        cols64 = cols.to(tl.int64)
        # this tile's columns of B_g, B_u and A_d: the same for every row block
        bg = tl.load(BG + cols64[:, None] * rank_g + rg[None, :], mask=cmask[:, None] & (rg[None, :] < rank_g), other=0.0)
        bu = tl.load(BU + cols64[:, None] * rank_u + ru[None, :], mask=cmask[:, None] & (ru[None, :] < rank_u), other=0.0)
        ad = tl.load(AD + rd[:, None].to(tl.int64) * n_cols + cols[None, :],
                     mask=HAS_AD & (rd[:, None] < rank_d) & cmask[None, :], other=0.0)
        if DOT_F32:
            bg, bu, ad = bg.to(tl.float32), bu.to(tl.float32), ad.to(tl.float32)
        pg = tl.zeros([BN, RG], dtype=tl.float32)  # reduced over the group's rows here, stored once
        pu = tl.zeros([BN, RU], dtype=tl.float32)
        pd = tl.zeros([BN, RD], dtype=tl.float32)
        for r0 in range(row_start, row_start + BM * ROW_BLOCKS, BM):
            rows = r0 + tl.arange(0, BM)
            rmask = rows < n_rows
            rows64 = rows.to(tl.int64)
            mask = rmask[:, None] & cmask[None, :]
            offs = rows64[:, None] * n_cols + cols[None, :]
            dyb = tl.load(DYB + rows64[:, None] * dyb_stride + rd[None, :],
                          mask=rmask[:, None] & (rd[None, :] < rank_d), other=0.0)
            xg = tl.load(XG + rows64[:, None] * xg_stride + rg[None, :],
                         mask=rmask[:, None] & (rg[None, :] < rank_g), other=0.0)
            xu = tl.load(XU + rows64[:, None] * xu_stride + ru[None, :],
                         mask=rmask[:, None] & (ru[None, :] < rank_u), other=0.0)
            if DOT_F32:
                dyb, xg, xu = dyb.to(tl.float32), xg.to(tl.float32), xu.to(tl.float32)
            dh = tl.load(DH + offs, mask=mask, other=0.0).to(tl.float32)
            if HAS_AD:  # the down adapter's share of dh
                dh += ad_scale * tl.dot(dyb, ad)
            g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
            u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
            act, dact = act_and_grad(g, ACT)
            h = (act * u).to(DH.dtype.element_ty)
            dg = (dh * u * dact).to(G.dtype.element_ty)
            du = (dh * act).to(U.dtype.element_ty)
            tl.store(DH + offs, h, mask=mask)
            tl.store(G + offs, dg, mask=mask)
            tl.store(U + offs, du, mask=mask)
            if DOT_F32:
                h, dg, du = h.to(tl.float32), dg.to(tl.float32), du.to(tl.float32)
            pg = tl.dot(tl.trans(dg), xg, pg)
            pu = tl.dot(tl.trans(du), xu, pu)
            pd = tl.dot(tl.trans(h), dyb, pd)
            # reduced over the split's columns: added tile by tile into this program's own rows of QG / QU
            q = (pid_s * n_rows + rows64)[:, None]
            qg = tl.load(QG + q * RG + rg[None, :], mask=rmask[:, None], other=0.0)
            tl.store(QG + q * RG + rg[None, :], tl.dot(dg, bg, qg), mask=rmask[:, None])
            qu = tl.load(QU + q * RU + ru[None, :], mask=rmask[:, None], other=0.0)
            tl.store(QU + q * RU + ru[None, :], tl.dot(du, bu, qu), mask=rmask[:, None])
        part = (pid_m * n_cols + cols64)[:, None]
        tl.store(PG + part * RG + rg[None, :], pg, mask=cmask[:, None])
        tl.store(PU + part * RU + ru[None, :], pu, mask=cmask[:, None])
        tl.store(PD + part * RD + rd[None, :], pd, mask=cmask[:, None])


def _rank_pad(r: int) -> int:
    return max(16, next_power_of_2(r))


def applies(g, u, xa_g, xa_u, dyb, B_g, B_u, A_d=None) -> bool:
    """Whether ``gated_lora_backward`` takes these: ``FUSED`` on, the Triton path, 16-bit tensors of one dtype
    and device, g/u contiguous ``[tokens, intermediate]``, rows of xa/dyb with unit column stride, B's
    contiguous ``[intermediate, r]``, ``A_d`` (if given) contiguous ``[r_d, intermediate]``, ranks at most
    ``MAX_RANK``."""
    if not (FUSED and use_triton(g) and g.dtype in _16BIT and g.dim() == 2):
        return False
    tensors = (g, u, xa_g, xa_u, dyb, B_g, B_u) + (() if A_d is None else (A_d,))
    if any(t.dtype != g.dtype or t.device != g.device for t in tensors):
        return False
    n, cols = g.shape
    return (g.is_contiguous() and u.is_contiguous() and u.shape == g.shape
            and all(t.dim() == 2 and t.shape[0] == n and t.stride(1) == 1 for t in (xa_g, xa_u, dyb))
            and all(t.shape[0] == cols and t.is_contiguous() for t in (B_g, B_u))
            and B_g.shape[1] == xa_g.shape[1] and B_u.shape[1] == xa_u.shape[1]
            and (A_d is None or (A_d.is_contiguous() and tuple(A_d.shape) == (dyb.shape[1], cols)))
            and max(xa_g.shape[1], xa_u.shape[1], dyb.shape[1]) <= MAX_RANK)


def gated_lora_backward(activation: str, dh, g, u, xa_g, xa_u, dyb, B_g, B_u, A_d=None, scale_d=1.0):
    """(h, dg, du, thin) for ``h = act(g) * u``, as ``lora_activations.gated_backward`` (h over dh, dg over
    g, du over u; g's and u's autograd versions bumped), and ``thin``, fp32 and unscaled. With ``A_d``, dh
    holds only ``dY W_d`` and the kernel adds ``scale_d * dyb A_d`` itself (no ``[tokens, intermediate]``
    matmul output for it, and the base matmul need not read one). ``thin``:
    ``dyb_g = dG B_g``, ``dyb_u = dU B_u`` ``[tokens, r]``; ``dB_g = dG^T xa_g``, ``dB_u = dU^T xa_u``
    ``[intermediate, r]``; ``dA_d = dyb^T h`` ``[r_d, intermediate]``. The caller checked ``applies``."""
    n, cols = g.shape
    dh = dh.contiguous()
    rg, ru, rd = xa_g.shape[1], xa_u.shape[1], dyb.shape[1]
    RG, RU, RD = _rank_pad(rg), _rank_pad(ru), _rank_pad(rd)
    groups = cdiv(n, BM * ROW_BLOCKS)
    splits = max(1, min(cdiv(cols, BN), cdiv(TARGET_PROGRAMS, groups)))
    per_split = cdiv(cdiv(cols, splits), BN) * BN
    splits = cdiv(cols, per_split)
    f32 = dict(dtype=torch.float32, device=g.device)
    PG, PU, PD = (torch.empty(groups, cols, R, **f32) for R in (RG, RU, RD))
    QG, QU = (torch.zeros(splits, n, R, **f32) for R in (RG, RU))  # added into tile by tile
    if g.numel():
        _gated_lora_bwd[(groups, splits)](
            dh, g, u, xa_g, xa_u, dyb, B_g, B_u, B_g if A_d is None else A_d, PG, PU, PD, QG, QU,
            n, cols, rg, ru, rd, xa_g.stride(0), xa_u.stride(0), dyb.stride(0), per_split, float(scale_d),
            ACT=ACTIVATIONS.index(activation), BM=BM, ROW_BLOCKS=ROW_BLOCKS, BN=BN, RG=RG, RU=RU, RD=RD,
            HAS_AD=A_d is not None, DOT_F32=INTERPRET, num_warps=NUM_WARPS)
    for t in (g, u):
        torch.autograd.graph.increment_version(t)

    def total(P, r):  # the partials summed in a fixed order; the rank's padding dropped
        s = P.sum(0)
        return s if s.shape[1] == r else s[:, :r].contiguous()

    thin = SimpleNamespace(dyb_g=total(QG, rg), dyb_u=total(QU, ru), dB_g=total(PG, rg), dB_u=total(PU, ru),
                           dA_d=total(PD, rd).t().contiguous())
    return dh, g, u, thin


__all__ = ["FUSED", "applies", "gated_lora_backward"]
