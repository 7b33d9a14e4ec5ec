"""The kernel faces the patched forwards call, each behind a guard while its kernel file lands.

Every fallback is the exact PyTorch formula transformers uses, so a missing kernel costs speed,
never numbers. The guards go away once all of ``slothnb.kernels`` exists.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    from slothnb.kernels.rms_norm import rms_norm
except ImportError:  # pragma: no cover

    def rms_norm(x, weight, eps=1e-6, offset=0.0):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        if offset:  # Gemma: (x * (1 + w)) in fp32, then cast
            return (h * (offset + weight.float())).type_as(x)
        return weight * h.to(x.dtype)


try:
    from slothnb.kernels.rope import apply_rope as _apply_rope
except ImportError:  # pragma: no cover
    _apply_rope = None

try:
    from slothnb.kernels.swiglu import swiglu
except ImportError:  # pragma: no cover

    def swiglu(gate, up):
        return F.silu(gate) * up


try:
    from slothnb.kernels.geglu import geglu
except ImportError:  # pragma: no cover

    def geglu(gate, up, approximate="none"):
        return F.gelu(gate, approximate=approximate) * up


try:
    from slothnb.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy
except ImportError:  # pragma: no cover

    def fused_linear_cross_entropy(hidden, weight, labels, bias=None, ignore_index=-100, softcap=None,
                                   logit_scale=None, num_items_in_batch=None, reduction="mean"):
        logits = F.linear(hidden, weight, bias).float()
        return cross_entropy(logits, labels, ignore_index, softcap, logit_scale, num_items_in_batch, reduction)


try:
    from slothnb.kernels.cross_entropy import cross_entropy
except ImportError:  # pragma: no cover

    def cross_entropy(logits, labels, ignore_index=-100, softcap=None, logit_scale=None,
                      num_items_in_batch=None, reduction="mean"):
        logits = logits.float()
        if logit_scale is not None:
            logits = logits * logit_scale
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        if num_items_in_batch is None:
            return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction=reduction)
        loss = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
        return loss / num_items_in_batch


try:
    from slothnb.kernels.lora import lora_linear, lora_mlp, lora_qkv
except ImportError:  # pragma: no cover - lora_fusion then reports nothing fusable
    lora_linear = lora_mlp = lora_qkv = None


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
    if _apply_rope is None or cos.shape[-1] != q.shape[-1]:
        return rope_reference(q, k, cos, sin)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        q, k = q.clone(memory_format=torch.contiguous_format), k.clone(memory_format=torch.contiguous_format)
    return _apply_rope(q, k, cos, sin)


__all__ = ["rms_norm", "rope", "rope_reference", "swiglu", "geglu", "cross_entropy",
           "fused_linear_cross_entropy", "lora_linear", "lora_mlp", "lora_qkv"]
