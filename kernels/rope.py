"""Rotary position embedding applied to q and k in place, both in one Triton launch.

HF's ``apply_rotary_pos_emb`` (rotate_half layout) on ``x = [x1 | x2]`` computes
``y1 = x1*c1 - x2*s1`` and ``y2 = x2*c2 + x1*s2`` (c1/c2 the halves of cos, equal for HF's tables
but not assumed equal here). Its vector-Jacobian product is the transposed rotation,
``d1 = g1*c1 + g2*s2``, ``d2 = g2*c2 - g1*s1`` (rotation by -sin), so forward and backward are
the same kernel with a flag, and both write back into the tensor they read: no activation copy.

One program handles one token (b, s): it loads that token's cos/sin row once and rotates all of
q's and k's heads as two [heads, head_dim/2] tiles. q/k may be strided views (e.g. transposed from
``[B, S, H, D]``); only a strided last dimension forces a copy (rotated, then copied back).
With ``position_ids`` the kernel gathers cos/sin rows from a ``[max_pos, D]`` table itself
(packed batches whose positions restart per sequence need no gathered ``[B, S, D]`` copies).
On CUDA position ids are not range-checked (that would cost a device sync per layer).
"""
import torch
import triton
import triton.language as tl

from slothnb.errors import ConfigError

from ._utils import fast_launch, next_power_of_2, use_triton


@triton.jit
def _rotate_tile(X, x_off, heads, n_heads, head_stride, d, half, c1, c2, s1, s2, BACKWARD: tl.constexpr):
    ptr = X + x_off + heads[:, None] * head_stride + d[None, :]
    mask = (heads[:, None] < n_heads) & (d[None, :] < half)
    x1 = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(ptr + half, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        y1 = x1 * c1 + x2 * s2
        y2 = x2 * c2 - x1 * s1
    else:
        y1 = x1 * c1 - x2 * s1
        y2 = x2 * c2 + x1 * s2
    tl.store(ptr, y1.to(X.dtype.element_ty), mask=mask)
    tl.store(ptr + half, y2.to(X.dtype.element_ty), mask=mask)


@fast_launch
@triton.jit
def _rope_kernel(Q, K, COS, SIN, POS, sq_b, sq_h, sq_s, sk_b, sk_h, sk_s, sc_b, sc_s, sp_b, sp_s,
                 seq_len, n_q_heads, n_k_heads, half, GATHER: tl.constexpr, BACKWARD: tl.constexpr,
                 BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_D: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    b = token // seq_len
    s = token % seq_len
    if GATHER:
        c_off = tl.load(POS + b * sp_b + s * sp_s).to(tl.int64) * sc_s
    else:
        c_off = b * sc_b + s * sc_s
    d = tl.arange(0, BLOCK_D)
    dmask = d < half
    c1 = tl.load(COS + c_off + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    c2 = tl.load(COS + c_off + half + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(SIN + c_off + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(SIN + c_off + half + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    hq = tl.arange(0, BLOCK_HQ)
    _rotate_tile(Q, b * sq_b + s * sq_s, hq, n_q_heads, sq_h, d, half, c1, c2, s1, s2, BACKWARD)
    hk = tl.arange(0, BLOCK_HK)
    _rotate_tile(K, b * sk_b + s * sk_s, hk, n_k_heads, sk_h, d, half, c1, c2, s1, s2, BACKWARD)


def _rope_torch_(x, cos, sin, backward):
    """The same rotation in PyTorch, in place (used off-GPU without the interpreter). cos: [Bc, S, D]."""
    compute = torch.promote_types(x.dtype, torch.float32)
    half = x.shape[-1] // 2
    c, s = cos.to(compute).unsqueeze(1), sin.to(compute).unsqueeze(1)
    x1, x2 = x[..., :half].to(compute), x[..., half:].to(compute)
    c1, c2, s1, s2 = c[..., :half], c[..., half:], s[..., :half], s[..., half:]
    if backward:
        y = torch.cat([x1 * c1 + x2 * s2, x2 * c2 - x1 * s1], dim=-1)
    else:
        y = torch.cat([x1 * c1 - x2 * s1, x2 * c2 + x1 * s2], dim=-1)
    x.copy_(y)


def rope_(q, k, cos, sin, position_ids=None, backward=False):
    """Rotate q and k in place (no autograd). Without ``position_ids`` cos/sin are ``[Bc, S, D]``;
    with them, cos/sin are ``[max_pos, D]`` tables gathered at ``position_ids [Bp, S]``."""
    if not use_triton(q):
        if position_ids is not None:
            cos, sin = cos[position_ids], sin[position_ids]
        _rope_torch_(q, cos, sin, backward)
        _rope_torch_(k, cos, sin, backward)
        return
    qq = q if q.stride(-1) == 1 else q.contiguous()
    kk = k if k.stride(-1) == 1 else k.contiguous()
    if cos.stride(-1) != 1 or sin.stride() != cos.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    B, n_q, S, D = qq.shape
    n_k = kk.shape[1]
    if position_ids is None:
        sc_b, sc_s = (cos.stride(0) if cos.shape[0] != 1 else 0), cos.stride(1)
        pos, sp_b, sp_s = cos, 0, 0
    else:
        sc_b, sc_s = 0, cos.stride(0)
        pos = position_ids
        sp_b, sp_s = (pos.stride(0) if pos.shape[0] != 1 else 0), pos.stride(1)
    if B * S:
        block_hq, block_hk, block_d = next_power_of_2(n_q), next_power_of_2(n_k), next_power_of_2(D // 2)
        warps = 4 if block_hq * block_d <= 2048 else 8
        _rope_kernel[(B * S,)](qq, kk, cos, sin, pos, qq.stride(0), qq.stride(1), qq.stride(2), kk.stride(0),
                               kk.stride(1), kk.stride(2), sc_b, sc_s, sp_b, sp_s, S, n_q, n_k, D // 2,
                               GATHER=position_ids is not None, BACKWARD=backward, BLOCK_HQ=block_hq,
                               BLOCK_HK=block_hk, BLOCK_D=block_d, num_warps=warps)
    if qq is not q:
        q.copy_(qq)
    if kk is not k:
        k.copy_(kk)


def _writable(g):
    """A gradient we may rotate in place: broadcast (stride-0) gradients are materialised first."""
    if any(st == 0 and n > 1 for st, n in zip(g.stride(), g.shape)):
        return g.contiguous()
    return g


class RoPEFunction(torch.autograd.Function):
    """Rotates q and k in place in one launch, yet returns them as outputs of this node.

    ``ctx.mark_dirty`` cannot be used: autograd refuses an in-place Function on view inputs (q and k
    are transposed views) when it returns two tensors. So the inputs' storage is rotated and the
    inputs are returned (autograd aliases them to this node's outputs); their version counters are
    bumped so that anything that had saved the un-rotated q/k for its backward fails loudly
    instead of silently using rotated values.
    """

    @staticmethod
    def forward(ctx, q, k, cos, sin, position_ids):
        rope_(q, k, cos, sin, position_ids)
        _bump_version(q)
        _bump_version(k)
        ctx.save_for_backward(cos, sin, position_ids)
        return q, k

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin, position_ids = ctx.saved_tensors
        dq, dk = _writable(dq), _writable(dk)
        rope_(dq, dk, cos, sin, position_ids, backward=True)
        return dq, dk, None, None, None


def _bump_version(t):
    increment = getattr(torch.autograd.graph, "increment_version", None)
    if increment is not None:
        increment(t)


def _heads(x, head_dim):
    """``[B, S, H*D]`` or ``[B, S, H, D]`` (contiguous) as the ``[B, H, S, D]`` view the kernel walks."""
    return x.view(x.shape[0], x.shape[1], -1, head_dim).transpose(1, 2)


class RoPEProjectionsFunction(torch.autograd.Function):
    """Truly in place on the projection outputs q ``[B, S, Hq*D]`` / k ``[B, S, Hk*D]``, before the head
    transpose: they are plain (non-view) tensors there, so ``mark_dirty`` is allowed even with two
    outputs, autograd rebases them on this node and no copy of q or k is made."""

    @staticmethod
    def forward(ctx, q, k, cos, sin, head_dim):
        rope_(_heads(q, head_dim), _heads(k, head_dim), cos, sin)
        ctx.mark_dirty(q, k)
        ctx.save_for_backward(cos, sin)
        ctx.head_dim = head_dim
        return q, k

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        dq, dk = _writable(dq).contiguous(), _writable(dk).contiguous()
        rope_(_heads(dq, ctx.head_dim), _heads(dk, ctx.head_dim), cos, sin, backward=True)
        return dq, dk, None, None, None


def _rows_of_features(x) -> bool:
    """x is laid out as rows of unit-stride features: contiguous, or ``[B, S, F]`` rows spaced by more than
    F (a column block of a wider output, ``lora_widened.FUSED_QKV``), so ``_heads`` can view it."""
    if x.is_contiguous():
        return True
    return (x.dim() == 3 and x.stride(2) == 1 and x.stride(1) >= x.shape[2]
            and (x.shape[0] == 1 or x.stride(0) == x.shape[1] * x.stride(1)))


def rope_in_place_ok(q, k) -> bool:
    """Whether :func:`apply_rope_projections` can rotate q and k where they lie: rows of features
    (``_rows_of_features``), distinct, and not views (autograd forbids a two-output in-place Function on views)."""
    return (q.dim() >= 3 and k.dim() >= 3 and _rows_of_features(q) and _rows_of_features(k)
            and q._base is None and k._base is None and q.data_ptr() != k.data_ptr())


def apply_rope_projections(q, k, cos, sin, head_dim: int):
    """Rotate q ``[B, S, Hq*D]`` and k ``[B, S, Hk*D]`` (or ``[B, S, H, D]``) in place, one launch.

    For projection outputs before the ``[B, H, S, D]`` transpose (see :func:`rope_in_place_ok`: their rows
    may be spaced wider than their features, as column blocks of one q/k/v output are); returns
    ``(q, k)``, the same tensors, rotated. cos/sin are ``[B or 1, S, head_dim]``. Raises ConfigError for
    views or other layouts (use :func:`apply_rope` on those).
    """
    if not rope_in_place_ok(q, k):
        raise ConfigError("apply_rope_projections needs non-view, distinct q and k [B, S, H*D] tensors of "
                          "unit-stride rows (projection outputs); use apply_rope on transposed views.")
    _check_qk(_heads(q, head_dim), _heads(k, head_dim))
    if cos.dim() == 2:
        cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)
    B, S = q.shape[:2]
    if cos.shape != sin.shape or cos.dim() != 3 or cos.shape[0] not in (1, B) or tuple(cos.shape[1:]) != (S, head_dim):
        raise ConfigError(f"cos/sin must be [1 or {B}, {S}, {head_dim}] (HF rotary embedding output), got "
                          f"{tuple(cos.shape)} and {tuple(sin.shape)}")
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        return RoPEProjectionsFunction.apply(q, k, cos, sin, head_dim)
    rope_(_heads(q, head_dim), _heads(k, head_dim), cos, sin)
    return q, k


def _check_qk(q, k):
    if q.dim() != 4 or k.dim() != 4:
        raise ConfigError(f"apply_rope expects q [B, Hq, S, D] and k [B, Hk, S, D], got {tuple(q.shape)} and "
                          f"{tuple(k.shape)}: transpose [B, S, H, D] projections with .transpose(1, 2) first")
    if q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ConfigError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must share batch, sequence and head_dim")
    if q.shape[-1] % 2:
        raise ConfigError(f"head_dim {q.shape[-1]} is odd: rotate_half RoPE needs an even head_dim")
    if q is k or (q.data_ptr() == k.data_ptr() and q.numel()):
        raise ConfigError("q and k are the same tensor: RoPE rotates in place, so pass two distinct tensors")


def _run(q, k, cos, sin, position_ids):
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        return RoPEFunction.apply(q, k, cos, sin, position_ids)
    rope_(q, k, cos, sin, position_ids)
    return q, k


def apply_rope(q, k, cos, sin):
    """Rotate q ``[B, Hq, S, D]`` and k ``[B, Hk, S, D]`` in place by cos/sin ``[B or 1, S, D]`` (HF layout).

    Returns ``(q, k)``: the same storage, rotated (under autograd, aliases carrying the RoPE backward;
    use the returned tensors). Because the rotation is in place, nothing may need q or k un-rotated
    afterwards (autograd raises if something had saved them).
    """
    _check_qk(q, k)
    if cos.dim() == 2:
        cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)
    B, _, S, D = q.shape
    if cos.shape != sin.shape or cos.dim() != 3 or cos.shape[0] not in (1, B) or tuple(cos.shape[1:]) != (S, D):
        raise ConfigError(f"cos/sin must be [1 or {B}, {S}, {D}] (HF rotary embedding output), got "
                          f"{tuple(cos.shape)} and {tuple(sin.shape)}")
    return _run(q, k, cos, sin, None)


def apply_rope_from_cache(q, k, cos_cache, sin_cache, position_ids):
    """Like :func:`apply_rope`, gathering cos/sin rows from ``[max_pos, D]`` tables at ``position_ids``
    ``[B or 1, S]`` inside the kernel (positions may restart, as in packed batches)."""
    _check_qk(q, k)
    B, _, S, D = q.shape
    if cos_cache.shape != sin_cache.shape or cos_cache.dim() != 2 or cos_cache.shape[1] != D:
        raise ConfigError(f"cos/sin caches must both be [max_pos, {D}], got {tuple(cos_cache.shape)} and "
                          f"{tuple(sin_cache.shape)}")
    if position_ids.dim() == 1:
        position_ids = position_ids.unsqueeze(0)
    if position_ids.dim() != 2 or position_ids.shape[0] not in (1, B) or position_ids.shape[1] != S:
        raise ConfigError(f"position_ids must be [1 or {B}, {S}], got {tuple(position_ids.shape)}")
    if position_ids.dtype.is_floating_point or position_ids.dtype == torch.bool:
        raise ConfigError(f"position_ids must be an integer tensor, got {position_ids.dtype}")
    if position_ids.device.type != "cuda" and position_ids.numel():
        lo, hi = int(position_ids.min()), int(position_ids.max())
        if lo < 0 or hi >= cos_cache.shape[0]:
            raise ConfigError(f"position_ids span [{lo}, {hi}] but the cos/sin cache has {cos_cache.shape[0]} rows: "
                              "build the rotary cache for at least max_position + 1 positions")
    return _run(q, k, cos_cache, sin_cache, position_ids)


def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def apply_rope_reference(q, k, cos, sin):
    """HF's ``apply_rotary_pos_emb`` (unsqueeze_dim=1), out of place, float64-able."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
