"""SDPA's flash kernels called directly, so that a recompute can skip the attention forward.

Under autograd, ``F.scaled_dot_product_attention`` runs the flash forward and saves (q, k, v, out,
logsumexp) for the flash backward. A checkpointed layer's recompute re-runs that forward only to get
``out`` and ``logsumexp`` back; at long context it is the layer's costliest op (Llama-3.1-8B at 4,096
tokens a step: ~0.7 ms of ~20 a layer). The written-out layer (``llama_layer``) calls the flash forward
here, carries ``out`` and ``logsumexp`` to its recompute (``checkpointing.carry``) and calls the flash
backward with them: the same ops on the same tensors as the autograd path, so the same bits.

It applies only where SDPA itself would run its flash backend (``torch._fused_sdp_choice``): no mask
(causal or full), no dropout, and on CUDA a head size SDPA does not pad. Elsewhere ``prepare`` is None
and the caller runs ``F.scaled_dot_product_attention``. ``SLOTHNB_DIRECT_SDPA=0`` turns it off.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend

ENABLED = os.environ.get("SLOTHNB_DIRECT_SDPA", "1") != "0"
_FLASH = int(SDPBackend.FLASH_ATTENTION)
_ops = torch.ops.aten


@dataclass(frozen=True)
class Flash:
    """How SDPA would call its flash kernel for one attention: causal or not, the softmax scale, and
    the dtypes of q, k, v before autocast cast them (their gradients go back in those)."""

    is_causal: bool
    scale: float
    dtypes: tuple


def prepare(attn, q, k, v, mask, requires_grad: bool):
    """``(Flash, q, k, v)``: the flash call SDPA would make for ``attn`` (transformers' attention
    module, slothnb's conventions in ``common._sdpa``) on q, k, v ``[b, heads, s, d]``, with q, k, v
    cast as autocast casts SDPA's inputs; or None. ``requires_grad``: the autograd path's q, k, v
    require grad there (SDPA's choice may depend on it)."""
    q_len = q.shape[2]
    if not ENABLED or mask is not None or k.shape[2] != q_len or (q.is_cuda and q.shape[-1] % 8):
        return None
    is_causal = q_len > 1 and getattr(attn, "is_causal", True)
    gqa = attn.num_key_value_groups > 1
    dtypes = (q.dtype, k.dtype, v.dtype)
    device = q.device.type
    if torch.is_autocast_enabled(device):  # SDPA runs in the autocast dtype (any non-double input cast)
        dt = torch.get_autocast_dtype(device)
        q, k, v = (t if t.dtype in (dt, torch.float64) else t.to(dt) for t in (q, k, v))
    probe = (q, k, v)
    if requires_grad:
        probe = tuple(t.detach().requires_grad_() for t in probe)
    if torch._fused_sdp_choice(*probe, None, 0.0, is_causal, scale=attn.scaling, enable_gqa=gqa) != _FLASH:
        return None
    return Flash(is_causal, attn.scaling, dtypes), q, k, v


def forward(f: Flash, q, k, v):
    """(out, logsumexp, rest): out ``[b, heads, s, d]`` as SDPA returns it; ``rest`` is what else the
    CUDA backward takes (sequence bounds, RNG state), None on the CPU."""
    if q.is_cuda:
        out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = _ops._scaled_dot_product_flash_attention(
            q, k, v, 0.0, f.is_causal, False, scale=f.scale)
        return out, lse, (cum_q, cum_k, max_q, max_k, seed, offset)
    out, lse = _ops._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, f.is_causal, scale=f.scale)
    return out, lse, None


def backward(f: Flash, grad_out, q, k, v, out, lse, rest):
    """(dq, dk, dv) from the forward's ``out``, ``logsumexp`` and ``rest``: the flash backward kernel,
    its gradients cast back to the dtypes q, k, v had before autocast (as autograd's cast node does)."""
    if rest is not None:
        cum_q, cum_k, max_q, max_k, seed, offset = rest
        grads = _ops._scaled_dot_product_flash_attention_backward(
            grad_out, q, k, v, out, lse, cum_q, cum_k, max_q, max_k, 0.0, f.is_causal, seed, offset, scale=f.scale)
    else:
        grads = _ops._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out, q, k, v, out, lse, 0.0, f.is_causal, scale=f.scale)
    return [g if g.dtype == dt else g.to(dt) for g, dt in zip(grads, f.dtypes)]
