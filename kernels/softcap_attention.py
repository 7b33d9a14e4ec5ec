"""Flash attention with Gemma-2's logit soft-capping, forward and backward, exact.

    s = scale * q k^T,  z = c * tanh(s / c),  causal (+ optional sliding window) mask,
    P = softmax(z) (fp32),  out = P v

Gemma-2's scores must be soft-capped before the softmax, which SDPA / flash kernels cannot do, so
the eager path builds [B, H, S, S] scores in 16-bit and fp32 per layer. Here the scores are never
materialised (FA2 scheme):

- forward: one program per (query block, batch * query head) walks the visible key blocks with an
  online softmax and saves ``out`` and the per-row log-sum-exp (fp32, natural log).
- backward: ``Delta = rowsum(dO * O)``; P is recomputed from the LSE, ``dS = P * (dP - Delta)`` and
  the cap's chain rule ``d(raw s) = dS * (1 - tanh^2(s / c))``. One kernel gives dK/dV: a program
  owns a key block of one kv head and loops over that head's GQA group of query heads, so the
  group sum needs no atomics. A second kernel gives dQ (one program per query block), again
  without atomics, at the cost of recomputing the scores once more.
- masks: causal = key j <= query i; sliding window = i - j < window (transformers' Gemma-2:
  ``kv_idx > q_idx - sliding_window``). Only key blocks that hold a visible key are visited.

Not supported (the callers must keep the eager path for these): attention dropout, padding masks
or any explicit attention mask, kv length != query length (KV cache decoding). fp32 inputs use
full-fp32 (``input_precision="ieee"``) products, not TF32.

In Triton's interpreter ``tl.dot`` on 16-bit tiles returns garbage, so there (``DOT_F32``) tiles are
cast to fp32 before each dot.
"""
import math

import torch
import triton
import triton.language as tl

from slothnb.errors import ConfigError

from ._utils import INTERPRET, cdiv, tanh, use_triton

HEAD_DIMS = (16, 32, 64, 128, 256)


@triton.jit
def _dot(a, b, DOT_F32: tl.constexpr, IEEE: tl.constexpr):
    if DOT_F32:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if IEEE:  # fp32 inputs: full fp32 products, not TF32
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _visible(rows, cols, seq, window, CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    ok = (rows[:, None] < seq) & (cols[None, :] < seq)
    if CAUSAL:
        ok = ok & (cols[None, :] <= rows[:, None])
    if WINDOW:
        ok = ok & (rows[:, None] - cols[None, :] < window)
    return ok


@triton.jit
def _key_range(start_m, seq, window, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """[lo, hi) of the key positions a query block can see, lo a multiple of BLOCK_N."""
    hi = seq
    if CAUSAL:
        hi = tl.minimum(seq, (start_m + 1) * BLOCK_M)
    lo = 0
    if WINDOW:
        lo = tl.maximum(0, start_m * BLOCK_M - window + 1)
        lo = (lo // BLOCK_N) * BLOCK_N
    return lo, hi


@triton.jit
def _query_range(start_n, seq, window, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """[lo, hi) of the query positions that see a key block, lo a multiple of BLOCK_M."""
    lo = 0
    if CAUSAL:
        lo = ((start_n * BLOCK_N) // BLOCK_M) * BLOCK_M
    hi = seq
    if WINDOW:
        hi = tl.minimum(seq, (start_n + 1) * BLOCK_N + window - 1)
    return lo, hi


@triton.jit
def _fwd(Q, K, V, O, LSE,
         sq_b, sq_h, sq_s, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, so_b, so_h, so_s,
         n_heads, group, seq, scale, softcap, window,
         CAUSAL: tl.constexpr, WINDOW: tl.constexpr, D: tl.constexpr,
         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_F32: tl.constexpr, IEEE: tl.constexpr):
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // n_heads).to(tl.int64)
    h = (bh % n_heads).to(tl.int64)
    hk = h // group
    rows = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    q = tl.load(Q + b * sq_b + h * sq_h + rows[:, None] * sq_s + offs_d[None, :],
                mask=rows[:, None] < seq, other=0.0)
    k_base = K + b * sk_b + hk * sk_h
    v_base = V + b * sv_b + hk * sv_h
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    lo, hi = _key_range(start_m, seq, window, CAUSAL, WINDOW, BLOCK_M, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        kv_mask = cols[:, None] < seq
        k = tl.load(k_base + cols[:, None] * sk_s + offs_d[None, :], mask=kv_mask, other=0.0)
        z = softcap * tanh(_dot(q, tl.trans(k), DOT_F32, IEEE) * (scale / softcap))
        z = tl.where(_visible(rows, cols, seq, window, CAUSAL, WINDOW), z, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(z, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet
        p = tl.exp(z - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + cols[:, None] * sv_s + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_F32, IEEE)
        m_i = m_new
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
    acc = acc / l_safe[:, None]
    tl.store(O + b * so_b + h * so_h + rows[:, None] * so_s + offs_d[None, :],
             acc.to(O.dtype.element_ty), mask=rows[:, None] < seq)
    tl.store(LSE + bh.to(tl.int64) * seq + rows, m_safe + tl.log(l_safe), mask=rows < seq)


@triton.jit
def _bwd_delta(O, DO, DELTA, so_b, so_h, so_s, sdo_b, sdo_h, sdo_s, n_heads, seq,
               D: tl.constexpr, BLOCK_M: tl.constexpr):
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // n_heads).to(tl.int64)
    h = (bh % n_heads).to(tl.int64)
    rows = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    mask = rows[:, None] < seq
    o = tl.load(O + b * so_b + h * so_h + rows[:, None] * so_s + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + b * sdo_b + h * sdo_h + rows[:, None] * sdo_s + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh.to(tl.int64) * seq + rows, delta, mask=rows < seq)


@triton.jit
def _bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV,
              sq_b, sq_h, sq_s, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, sdo_b, sdo_h, sdo_s,
              sdk_b, sdk_h, sdk_s, sdv_b, sdv_h, sdv_s,
              n_heads, n_kv_heads, group, seq, scale, softcap, window,
              CAUSAL: tl.constexpr, WINDOW: tl.constexpr, D: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_F32: tl.constexpr, IEEE: tl.constexpr):
    start_n = tl.program_id(0)
    bhk = tl.program_id(1)
    b = (bhk // n_kv_heads).to(tl.int64)
    hk = (bhk % n_kv_heads).to(tl.int64)
    cols = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    kv_mask = cols[:, None] < seq
    k = tl.load(K + b * sk_b + hk * sk_h + cols[:, None] * sk_s + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + b * sv_b + hk * sv_h + cols[:, None] * sv_s + offs_d[None, :], mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, D], dtype=tl.float32)
    lo, hi = _query_range(start_n, seq, window, CAUSAL, WINDOW, BLOCK_M, BLOCK_N)
    for g in range(0, group):
        h = hk * group + g
        q_base = Q + b * sq_b + h * sq_h
        do_base = DO + b * sdo_b + h * sdo_h
        row_base = (b * n_heads + h) * seq
        for start_m in range(lo, hi, BLOCK_M):
            rows = start_m + offs_m
            q_mask = rows[:, None] < seq
            q = tl.load(q_base + rows[:, None] * sq_s + offs_d[None, :], mask=q_mask, other=0.0)
            do = tl.load(do_base + rows[:, None] * sdo_s + offs_d[None, :], mask=q_mask, other=0.0)
            lse = tl.load(LSE + row_base + rows, mask=rows < seq, other=0.0)
            delta = tl.load(DELTA + row_base + rows, mask=rows < seq, other=0.0)
            t = tanh(_dot(q, tl.trans(k), DOT_F32, IEEE) * (scale / softcap))
            p = tl.exp(softcap * t - lse[:, None])
            p = tl.where(_visible(rows, cols, seq, window, CAUSAL, WINDOW), p, 0.0)
            dv += _dot(tl.trans(p.to(do.dtype)), do, DOT_F32, IEEE)
            dp = _dot(do, tl.trans(v), DOT_F32, IEEE)
            ds = p * (dp - delta[:, None]) * (1.0 - t * t)
            dk += _dot(tl.trans(ds.to(q.dtype)), q, DOT_F32, IEEE)
    dk = dk * scale
    tl.store(DK + b * sdk_b + hk * sdk_h + cols[:, None] * sdk_s + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + b * sdv_b + hk * sdv_h + cols[:, None] * sdv_s + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_dq(Q, K, V, DO, LSE, DELTA, DQ,
            sq_b, sq_h, sq_s, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, sdo_b, sdo_h, sdo_s,
            sdq_b, sdq_h, sdq_s,
            n_heads, group, seq, scale, softcap, window,
            CAUSAL: tl.constexpr, WINDOW: tl.constexpr, D: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_F32: tl.constexpr, IEEE: tl.constexpr):
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // n_heads).to(tl.int64)
    h = (bh % n_heads).to(tl.int64)
    hk = h // group
    rows = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    q_mask = rows[:, None] < seq
    q = tl.load(Q + b * sq_b + h * sq_h + rows[:, None] * sq_s + offs_d[None, :], mask=q_mask, other=0.0)
    do = tl.load(DO + b * sdo_b + h * sdo_h + rows[:, None] * sdo_s + offs_d[None, :], mask=q_mask, other=0.0)
    lse = tl.load(LSE + bh.to(tl.int64) * seq + rows, mask=rows < seq, other=0.0)
    delta = tl.load(DELTA + bh.to(tl.int64) * seq + rows, mask=rows < seq, other=0.0)
    k_base = K + b * sk_b + hk * sk_h
    v_base = V + b * sv_b + hk * sv_h
    dq = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    lo, hi = _key_range(start_m, seq, window, CAUSAL, WINDOW, BLOCK_M, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        kv_mask = cols[:, None] < seq
        k = tl.load(k_base + cols[:, None] * sk_s + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + cols[:, None] * sv_s + offs_d[None, :], mask=kv_mask, other=0.0)
        t = tanh(_dot(q, tl.trans(k), DOT_F32, IEEE) * (scale / softcap))
        p = tl.exp(softcap * t - lse[:, None])
        p = tl.where(_visible(rows, cols, seq, window, CAUSAL, WINDOW), p, 0.0)
        dp = _dot(do, tl.trans(v), DOT_F32, IEEE)
        ds = p * (dp - delta[:, None]) * (1.0 - t * t)
        dq += _dot(ds.to(k.dtype), k, DOT_F32, IEEE)
    dq = dq * scale
    tl.store(DQ + b * sdq_b + h * sdq_h + rows[:, None] * sdq_s + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=q_mask)


# (BLOCK_M, BLOCK_N, num_warps, num_stages) per head dim, for H100 (228 KB shared memory a SM).
# D=256 (Gemma-2) is measured: bench/kernels_attention.py --sweep on an H100 (session 9, Gemma-2-9B
# attention at 2 x 2048 tokens), forward and backward each the fastest config tried, every config
# equally accurate against fp32: the 64 x 64 backward takes 27% less time than the 32 x 32 that
# compile-only register counts had picked (no spill there, sm_90 compiled without a GPU). The other
# head dims still come from such compile-only counts and are not timed.
_FWD = {16: (128, 64, 4, 3), 32: (128, 64, 4, 3), 64: (128, 64, 4, 3), 128: (128, 64, 8, 2),
        256: (64, 32, 4, 2)}
_BWD = {16: (64, 64, 4, 2), 32: (64, 64, 4, 2), 64: (64, 64, 4, 2), 128: (64, 32, 4, 1),
        256: (64, 64, 8, 1)}  # dK/dV: BLOCK_N owned keys, BLOCK_M the query loop; dQ: the reverse
_INTERPRET_BLOCKS = (16, 16)  # small tiles in the interpreter: multi-block loops at tiny S


def _strides(t):
    return t.stride(0), t.stride(1), t.stride(2)


def _unit_last(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _config(table, D, dtype, blocks):
    bm, bn, warps, stages = table[D]
    if dtype == torch.float32:  # tests only: tiles twice the bytes, so smaller ones
        bm, bn, stages = min(bm, 32), min(bn, 32), 1
    if blocks is not None:
        bm, bn = blocks
    elif INTERPRET:
        bm, bn = _INTERPRET_BLOCKS
    return bm, bn, dict(num_warps=warps, num_stages=stages)


def _flags(q, D, causal, window):
    fp32 = INTERPRET or q.dtype == torch.float32
    return dict(CAUSAL=causal, WINDOW=window is not None, D=D, DOT_F32=INTERPRET, IEEE=fp32)


def _forward(q, k, v, softcap, scale, causal, window, blocks):
    B, H, S, D = q.shape
    Hk = k.shape[1]
    # [B, S, H, D] memory: the caller's out.transpose(1, 2).reshape(B, S, H * D) is then free
    o = torch.empty(B, S, H, D, dtype=q.dtype, device=q.device).transpose(1, 2)
    lse = torch.empty(B, H, S, dtype=torch.float32, device=q.device)
    bm, bn, opts = _config(_FWD, D, q.dtype, blocks)
    _fwd[(cdiv(S, bm), B * H)](
        q, k, v, o, lse, *_strides(q), *_strides(k), *_strides(v), *_strides(o),
        H, H // Hk, S, float(scale), float(softcap), int(window or 0),
        BLOCK_M=bm, BLOCK_N=bn, **_flags(q, D, causal, window), **opts)
    return o, lse


def _backward(do, q, k, v, o, lse, softcap, scale, causal, window, blocks):
    B, H, S, D = q.shape
    Hk = k.shape[1]
    do = _unit_last(do)
    delta = torch.empty_like(lse)
    bm, bn, opts = _config(_BWD, D, q.dtype, blocks)
    _bwd_delta[(cdiv(S, bm), B * H)](o, do, delta, *_strides(o), *_strides(do), H, S, D=D, BLOCK_M=bm)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    common = dict(**_flags(q, D, causal, window), **opts)
    _bwd_dkdv[(cdiv(S, bn), B * Hk)](
        q, k, v, do, lse, delta, dk, dv, *_strides(q), *_strides(k), *_strides(v), *_strides(do),
        *_strides(dk), *_strides(dv), H, Hk, H // Hk, S, float(scale), float(softcap), int(window or 0),
        BLOCK_M=bm, BLOCK_N=bn, **common)
    # dQ owns BLOCK_M queries and walks keys BLOCK_N at a time: same tile sizes, roles as in forward
    _bwd_dq[(cdiv(S, bm), B * H)](
        q, k, v, do, lse, delta, dq, *_strides(q), *_strides(k), *_strides(v), *_strides(do),
        *_strides(dq), H, H // Hk, S, float(scale), float(softcap), int(window or 0),
        BLOCK_M=bm, BLOCK_N=bn, **common)
    return dq, dk, dv


class SoftcapAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, softcap, scale, causal=True, window=None, blocks=None):
        q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
        o, lse = _forward(q, k, v, softcap, scale, causal, window, blocks)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.args = (softcap, scale, causal, window, blocks)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _backward(do, q, k, v, o, lse, *ctx.args)
        return dq, dk, dv, None, None, None, None, None


def softcap_attention_reference(q, k, v, softcap, scale, causal=True, window=None):
    """Plain PyTorch, as slothnb's ``_softcapped_attention`` / transformers' Gemma-2 eager attention
    (float64-able: the softmax runs in fp32 or wider)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.matmul(q, k.transpose(2, 3)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    S, Sk = q.shape[2], k.shape[2]
    i = torch.arange(S, device=q.device)[:, None]
    j = torch.arange(Sk, device=q.device)[None, :]
    visible = torch.ones(S, Sk, dtype=torch.bool, device=q.device)
    if causal:
        visible &= j <= i
    if window is not None:
        visible &= i - j < window
    scores = scores.masked_fill(~visible, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.promote_types(q.dtype, torch.float32)).to(q.dtype)
    return torch.matmul(probs, v)


def softcap_attention(q, k, v, softcap: float, scale: float, causal: bool = True, window=None):
    """Exact soft-capped attention without the [B, H, S, S] scores.

    q [B, Hq, S, D], k and v [B, Hkv, S, D] (Hq a multiple of Hkv; query head h reads kv head
    h // (Hq // Hkv)); ``window``: key j is visible to query i iff i - j < window (Gemma-2's
    sliding layers), with ``causal``. Returns [B, Hq, S, D] in q's dtype (a transposed view of a
    [B, S, Hq, D] buffer on the Triton path).
    """
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4:
        raise ConfigError(f"softcap_attention wants q [B, Hq, S, D], k/v [B, Hkv, S, D]; got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, H, S, D = q.shape
    if k.shape[0] != B or k.shape[2] != S or k.shape[3] != D or H % k.shape[1]:
        raise ConfigError(f"softcap_attention: k/v {tuple(k.shape)} do not fit q {tuple(q.shape)} "
                         "(same batch, length and head dim; Hq a multiple of Hkv)")
    if not (q.dtype == k.dtype == v.dtype):
        raise ConfigError(f"softcap_attention: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    if window is not None and (not causal or window < 1):
        raise ConfigError("softcap_attention: a sliding window needs causal=True and window >= 1")
    if not softcap or softcap <= 0 or not math.isfinite(softcap):
        raise ConfigError(f"softcap_attention: softcap must be a positive number, got {softcap}")
    if use_triton(q) and D in HEAD_DIMS:
        return SoftcapAttentionFunction.apply(q, k, v, softcap, scale, causal, window)
    return softcap_attention_reference(q, k, v, softcap, scale, causal, window)
