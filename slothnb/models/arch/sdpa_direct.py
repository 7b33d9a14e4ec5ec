"""SDPA's fused kernels called directly, so that a recompute can skip the attention forward.

Under autograd, ``F.scaled_dot_product_attention`` runs a fused forward (flash or cuDNN) and saves
(q, k, v, out, logsumexp) for its backward. A checkpointed layer's recompute re-runs that forward only
to get ``out`` and ``logsumexp`` back; at long context it is a large part of the recompute (H100,
Llama-3.1-8B shapes, cuDNN: 0.15 ms a layer at 2,048 tokens a sequence, 0.49 ms at 4,096). The
written-out layer (``llama_layer``) calls the forward here, carries ``out`` and ``logsumexp`` to its
recompute (``carrying.carry_attention_state``, where that is switched on) and calls the backward
with them: the same ops on the same tensors as the autograd path.

It applies only where SDPA itself would run that backend (``torch._fused_sdp_choice``: flash on the
CPU and on most GPUs, cuDNN on an H100 with torch 2.11): no mask (causal or full), no dropout, and on
CUDA a head size SDPA does not pad. Elsewhere ``prepare`` is None and the caller runs SDPA.

``SLOTHNB_DIRECT_SDPA``: ``1`` (default) everywhere, ``cpu`` on the CPU only, ``0`` nowhere. On an
H100 cuDNN's forward is bit-identical to SDPA's and its backward as exact as autograd's (whose dq is
itself not bit-reproducible at 2,048-4,096 tokens); the GPU suite passes with it. Carrying the state
(``carrying.CARRY_SDPA``) is off on CUDA: it gained nothing there (session 18).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend

_MODE = os.environ.get("SLOTHNB_DIRECT_SDPA", "1")
ENABLED = _MODE != "0"
CUDA = _MODE == "1"
_FLASH, _CUDNN = int(SDPBackend.FLASH_ATTENTION), int(SDPBackend.CUDNN_ATTENTION)
_ops = torch.ops.aten


@dataclass(frozen=True)
class Fused:
    """How SDPA would call its fused kernel for one attention: which (flash or cudnn), causal or not,
    the softmax scale, and the dtypes of q, k, v before autocast cast them (their gradients go back in
    those)."""

    backend: str
    is_causal: bool
    scale: float
    dtypes: tuple


def prepare(attn, q, k, v, mask, requires_grad: bool):
    """``(Fused, q, k, v)``: the fused call SDPA would make for ``attn`` (transformers' attention
    module, slothnb's conventions in ``common._sdpa``) on q, k, v ``[b, heads, s, d]``, with q, k, v
    cast as autocast casts SDPA's inputs; or None. ``requires_grad``: the autograd path's q, k, v
    require grad there (SDPA's choice may depend on it)."""
    q_len = q.shape[2]
    if not ENABLED or (q.is_cuda and not CUDA) or mask is not None or k.shape[2] != q_len \
            or (q.is_cuda and q.shape[-1] % 8):
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
    choice = torch._fused_sdp_choice(*probe, None, 0.0, is_causal, scale=attn.scaling, enable_gqa=gqa)
    backend = "flash" if choice == _FLASH else "cudnn" if choice == _CUDNN and q.is_cuda else None
    if backend is None:
        return None
    return Fused(backend, is_causal, attn.scaling, dtypes), q, k, v


def forward(f: Fused, q, k, v, lse_needed: bool = True):
    """(out, logsumexp, rest): out ``[b, heads, s, d]`` as SDPA returns it; ``rest`` is what else the
    CUDA backward takes (sequence bounds, RNG state), None on the CPU. ``lse_needed=False``: a forward
    whose log-sum-exp nobody reads; cuDNN is then asked for none, as SDPA asks without grad (flash
    always computes it)."""
    if f.backend == "cudnn":
        out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = _ops._scaled_dot_product_cudnn_attention(
            q, k, v, None, lse_needed, 0.0, f.is_causal, False, scale=f.scale)
        return out, lse, (cum_q, cum_k, max_q, max_k, seed, offset)
    if q.is_cuda:
        out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = _ops._scaled_dot_product_flash_attention(
            q, k, v, 0.0, f.is_causal, False, scale=f.scale)
        return out, lse, (cum_q, cum_k, max_q, max_k, seed, offset)
    out, lse = _ops._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, f.is_causal, scale=f.scale)
    return out, lse, None


def backward(f: Fused, grad_out, q, k, v, out, lse, rest):
    """(dq, dk, dv) from the forward's ``out``, ``logsumexp`` and ``rest``: the fused backward kernel,
    its gradients cast back to the dtypes q, k, v had before autocast (as autograd's cast node does)."""
    if f.backend == "cudnn":
        cum_q, cum_k, max_q, max_k, seed, offset = rest
        grads = _ops._scaled_dot_product_cudnn_attention_backward(
            grad_out, q, k, v, out, lse, seed, offset, None, cum_q, cum_k, max_q, max_k, 0.0, f.is_causal,
            scale=f.scale)
    elif rest is not None:
        cum_q, cum_k, max_q, max_k, seed, offset = rest
        grads = _ops._scaled_dot_product_flash_attention_backward(
            grad_out, q, k, v, out, lse, cum_q, cum_k, max_q, max_k, 0.0, f.is_causal, seed, offset, scale=f.scale)
    else:
        grads = _ops._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out, q, k, v, out, lse, 0.0, f.is_causal, scale=f.scale)
    return [g if g.dtype == dt else g.to(dt) for g, dt in zip(grads, f.dtypes)]
