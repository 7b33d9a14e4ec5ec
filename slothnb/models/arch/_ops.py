"""The kernel faces the patched forwards call, in one place (plus the RoPE dispatch)."""
from __future__ import annotations

import torch

from slothnb.kernels.cross_entropy import cross_entropy
from slothnb.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy
from slothnb.kernels.geglu import geglu
from slothnb.kernels.adapter_casts import begin_pass
from slothnb.kernels.lora import lora_linear, lora_mlp, lora_qkv
from slothnb.kernels.rms_norm import rms_norm
from slothnb.kernels.rope import apply_rope, apply_rope_projections, rope_in_place_ok
from slothnb.kernels.softcap_attention import HEAD_DIMS as SOFTCAP_HEAD_DIMS
from slothnb.kernels.softcap_attention import softcap_attention
from slothnb.kernels.swiglu import swiglu


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_reference(q, k, cos, sin):
    """transformers' formula, including partial rotary (cos narrower than the head: Phi-3 variants)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    d = cos.shape[-1]
    if d == q.shape[-1]:
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
    q_rot, q_pass = q[..., :d], q[..., d:]
    k_rot, k_pass = k[..., :d], k[..., d:]
    q = torch.cat([q_rot * cos + _rotate_half(q_rot) * sin, q_pass], dim=-1)
    k = torch.cat([k_rot * cos + _rotate_half(k_rot) * sin, k_pass], dim=-1)
    return q, k


def rope(q, k, cos, sin):
    """Rotate q ``[B, Hq, S, D]`` and k ``[B, Hk, S, D]`` with the in-place kernel.

    Autograd forbids an in-place Function with two outputs on views (q/k are transposed views of the
    projections): when gradients flow, the kernel rotates fresh contiguous copies instead (the same
    memory as an out-of-place RoPE, and the layout SDPA likes best). Without autograd (generate,
    eval) it rotates the views in place.
    """
    if cos.shape[-1] != q.shape[-1]:
        return rope_reference(q, k, cos, sin)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        q, k = q.clone(memory_format=torch.contiguous_format), k.clone(memory_format=torch.contiguous_format)
    return apply_rope(q, k, cos, sin)


def rope_projections(q, k, cos, sin, head_dim):
    """RoPE on q/k still in the projections' ``[B, S, H*D]`` (or ``[B, S, H, D]``) layout; returns them
    as ``[B, H, S, D]`` views. In place when they are plain contiguous tensors (the fused ``lora_qkv``
    outputs, peft/linear outputs), so training makes no copy of q and k; otherwise transposes first and
    goes through :func:`rope`."""
    b, s = q.shape[:2]
    if cos.shape[-1] == head_dim and rope_in_place_ok(q, k):
        q, k = apply_rope_projections(q, k, cos, sin, head_dim)
        return q.view(b, s, -1, head_dim).transpose(1, 2), k.view(b, s, -1, head_dim).transpose(1, 2)
    q = q.view(b, s, -1, head_dim).transpose(1, 2)
    k = k.view(b, s, -1, head_dim).transpose(1, 2)
    return rope(q, k, cos, sin)


__all__ = ["rms_norm", "rope", "rope_projections", "rope_reference", "swiglu", "geglu", "cross_entropy",
           "fused_linear_cross_entropy", "begin_pass", "lora_linear", "lora_mlp", "lora_qkv"]
