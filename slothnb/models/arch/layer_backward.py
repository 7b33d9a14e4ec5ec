"""A checkpointed Llama-family decoder layer's recompute and backward, written out without autograd.

``OffloadedCheckpoint.backward`` re-runs a layer with grad on (transformers' layer forward, ~7 autograd
Functions recorded, module calls) and then walks that graph with a nested ``torch.autograd.backward``.
On the hosts that pace an 8B or 1B training step, building and walking that graph costs ~0.7 ms of
host time a layer (docs/perf-notes.md, sections 14-15). This module does the same work by calling
the fused ops' forward and backward bodies in order:

    forward:  h1 = rms(x); q, k, v = qkv(h1) (+ bias); rope(q, k); a = sdpa(q, k, v); o = o_proj(a);
              h = x + o; h2 = rms(h); mlp(h2) (only what its backward reads)
    backward: dh2 = mlp'(dy); dh = dy + rms'(dh2); da = o_proj'(dh); dq, dk, dv = sdpa'(da);
              rope'(dq, dk); dh1 = qkv'(dq, dk, dv); dx = dh + rms'(dh1)

Each op's ``torch.autograd.Function`` is called through its static ``forward`` / ``backward`` with a
stand-in ``ctx`` (``_Ctx``), so the arithmetic is the Functions' own and the gradients are
bit-identical to the autograd path (tests compare them). Attention stays a one-node autograd graph
(``torch.autograd.grad`` over SDPA), so whichever SDPA backend runs keeps its own backward. The
adapters' gradients are accumulated into ``.grad`` as autograd's AccumulateGrad does.

It applies only where it is the same function as the layer: the decoder layer's forward is
Llama's (Llama, Mistral, Qwen2, Gemma), every sub-module runs slothnb's patched forward with all
seven projections fusable, SDPA/eager attention without dropout, a KV cache or attention outputs,
frozen norms, trainable adapters without hooks, untiled MLP, Triton RMSNorm (a GPU, or the
interpreter in tests). Anything else answers None and the autograd path runs.
``SLOTHNB_LAYER_BACKWARD=0`` (or ``ENABLED = False``) turns it off.
"""
from __future__ import annotations

import inspect
import os

import torch
from torch.nn.modules import module as _nn_module

from slothnb.kernels._utils import use_triton
from slothnb.kernels.lora import LoraLinearFunction, LoraMLPFunction, LoraQKVFunction, _adapters
from slothnb.kernels.rms_norm import RMSNormFunction
from slothnb.kernels.rope import RoPEProjectionsFunction, rope_in_place_ok
from slothnb.models import checkpointing, lora_fusion
from slothnb.models.arch import common

ENABLED = os.environ.get("SLOTHNB_LAYER_BACKWARD", "1") != "0"


def _llama_forward_code():
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    return _code(LlamaDecoderLayer)


def _code(cls):
    """The bytecode of ``cls.forward`` under its decorators (transformers wraps some forwards)."""
    code = getattr(inspect.unwrap(cls.forward), "__code__", None)
    return None if code is None else (code.co_code, code.co_names, code.co_consts)


def applies_to(layer) -> bool:
    """Whether ``layer``'s class runs Llama's decoder-layer forward (same bytecode), the structure
    ``backward`` writes out. Checked once, when the layer is patched."""
    code = _code(type(layer))
    return code is not None and code == _llama_forward_code()


class _Ctx:
    """Stands in for an autograd ctx when a Function's forward and backward are called directly."""

    __slots__ = ("needs_input_grad", "saved_tensors", "__dict__")

    def __init__(self, *needs):
        self.needs_input_grad = needs

    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors

    def mark_dirty(self, *tensors):
        pass


def _runs(module, forward) -> bool:
    """``module`` runs slothnb's patched ``forward`` and nothing around it (no hooks)."""
    bound = module.__dict__.get("forward")
    return (getattr(bound, "__func__", None) is forward and not module._forward_hooks
            and not module._forward_pre_hooks)


def _trainable(weights) -> bool:
    """Adapters autograd would accumulate plainly: trainable, no tensor or post-accumulate hooks."""
    for w in weights:
        for p in (w.A, w.B):
            if not p.requires_grad or p._backward_hooks or getattr(p, "_post_accumulate_grad_hooks", None):
                return False
    return True


def _plan(layer, x, kwargs):
    """What ``backward`` needs of this call, or None when it does not apply."""
    if not (ENABLED and layer.training and isinstance(x, torch.Tensor) and x.dim() == 3 and use_triton(x)):
        return None
    if layer._forward_hooks or layer._forward_pre_hooks or _nn_module._global_forward_hooks \
            or _nn_module._global_forward_pre_hooks or "forward" in layer.__dict__:
        return None
    attn, mlp = layer.self_attn, layer.mlp
    norms = (layer.input_layernorm, layer.post_attention_layernorm)
    if not (_runs(attn, common.attention_forward) and _runs(mlp, common.mlp_forward)
            and all(_runs(n, common.rms_norm_forward) and not n.weight.requires_grad for n in norms)):
        return None
    spec = attn._slothnb_spec
    if spec.qk_norm or spec.fused_qkv or spec.fused_gate_up or spec.softcaps:
        return None
    if (attn.config._attn_implementation not in ("sdpa", "eager") or kwargs.get("output_attentions")
            or kwargs.get("past_key_values") is not None or (attn.training and attn.attention_dropout)):
        return None
    cos_sin = kwargs.get("position_embeddings")
    if cos_sin is None or cos_sin[0].shape[-1] != attn.head_dim:
        return None
    if x.numel() // x.shape[-1] > common.MLP_CHUNK_TOKENS:
        return None
    qkv = [lora_fusion.lora_weights(m, allow_bias=True) for m in (attn.q_proj, attn.k_proj, attn.v_proj)]
    o = lora_fusion.lora_weights(attn.o_proj, allow_bias=True)
    activation = common.fused_activation(mlp)
    gud = [lora_fusion.lora_weights(m) for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)]
    if None in qkv or o is None or o[1] is not None or activation is None or None in gud:
        return None
    weights = [p[0] for p in (*qkv, o, *gud)]
    if not _trainable(weights):
        return None
    return attn, norms, qkv, o[0], activation, [p[0] for p in gud], cos_sin


def _accumulate(weights, grads) -> None:
    """``p.grad += g`` for each adapter A, B (grads in ``_adapters`` order), as AccumulateGrad does:
    the first gradient is taken as it is when it is laid out like the parameter, else copied."""
    for p, g in zip((t for w in weights for t in (w.A, w.B)), grads):
        if p.grad is None:
            p.grad = g if g.is_contiguous() and g.stride() == p.stride() else g.clone(memory_format=torch.contiguous_format)
        else:
            p.grad += g


def backward(layer, args, kwargs, inputs, grad_outs, needs):
    """Gradients of the checkpointed call's tensor ``inputs`` (``needs[i]``: whether input i needs one),
    the adapters' added into their ``.grad``; or None when this layer or call is not covered (nothing
    has been done then). Runs inside the checkpoint's replay (RNG, autocast) and carry scopes."""
    x = args[0] if args else kwargs.get("hidden_states")
    slot = next((i for i, t in enumerate(inputs) if t is x), None)
    if slot is None or any(n for i, n in enumerate(needs) if i != slot):
        return None
    plan = _plan(layer, x, kwargs)
    if plan is None:
        return None
    grads = [None] * len(inputs)
    dy = grad_outs[0] if len(grad_outs) == 1 else None
    if dy is None:
        return grads
    attn, (norm1, norm2), qkv, o_w, activation, mlp_w, (cos, sin) = plan
    x_needs_grad = bool(needs[slot])
    with torch.no_grad():
        dx = _run(layer, attn, norm1, norm2, qkv, o_w, activation, mlp_w, cos, sin, kwargs.get("attention_mask"),
                  x, dy, x_needs_grad)
    grads[slot] = dx
    return grads


def _run(layer, attn, norm1, norm2, qkv, o_w, activation, mlp_w, cos, sin, mask, x, dy, x_needs_grad):
    b, s = x.shape[:2]
    hd = attn.head_dim
    # ---- the recompute: what each op's backward reads
    c_norm1 = _Ctx(True, False, False, False)
    h1 = RMSNormFunction.forward(c_norm1, x, norm1.weight, norm1._slothnb_eps, norm1._slothnb_offset)
    qkv_tensors, qkv_bundles = _adapters([p[0] for p in qkv])
    c_qkv = _Ctx(x_needs_grad)
    projected = LoraQKVFunction.forward(c_qkv, h1, qkv_bundles, *qkv_tensors)
    del h1
    q, k, v = [t if p[1] is None else t + p[1] for t, p in zip(projected, qkv)]
    raw_dtypes = [t.dtype for t in projected]
    del projected
    if not rope_in_place_ok(q, k):  # fresh projection outputs always are; a guard, not a path
        raise RuntimeError("slothnb layer backward: q and k are not rotatable in place")
    c_rope = _Ctx(True, True, False, False, False)
    q, k = RoPEProjectionsFunction.forward(c_rope, q, k, cos, sin, hd)
    with torch.enable_grad():
        q4, k4, v4 = [t.view(b, s, -1, hd).transpose(1, 2).detach().requires_grad_() for t in (q, k, v)]
        a4 = common._sdpa(attn, q4, k4, v4, mask, 0.0)
    del q, k, v
    a = a4.detach().transpose(1, 2).reshape(b, s, -1)
    c_o = _Ctx(True)
    o_tensors, o_bundles = _adapters([o_w])
    o = LoraLinearFunction.forward(c_o, a, o_bundles, [checkpointing.carried_attention_output(a)], *o_tensors)
    del a
    h = x + o
    o_dtype = o.dtype
    del o
    c_norm2 = _Ctx(True, False, False, False)
    h2 = RMSNormFunction.forward(c_norm2, h, norm2.weight, norm2._slothnb_eps, norm2._slothnb_offset)
    h_dtype = h.dtype
    del h
    gate_up, _ = checkpointing.carry_gate_up(h2)
    mlp_tensors, mlp_bundles = _adapters(mlp_w)
    c_mlp = _Ctx(True)
    output_needed = not common.RECOMPUTE_SKIP  # its values are never read (benchmarks may switch the skip off)
    m = LoraMLPFunction.forward(c_mlp, h2, activation, output_needed, (gate_up, None), mlp_bundles, *mlp_tensors)
    m_dtype = m.dtype
    del h2, gate_up, m
    # ---- the backward, last op first
    dh2, *_, dA_g, dB_g, dA_u, dB_u, dA_d, dB_d = LoraMLPFunction.backward(c_mlp, dy.to(m_dtype))
    del c_mlp
    _accumulate(mlp_w, (dA_g, dB_g, dA_u, dB_u, dA_d, dB_d))
    dh = RMSNormFunction.backward(c_norm2, dh2)[0]
    del c_norm2, dh2
    dh = dy.to(h_dtype) + dh  # the residual's share and the norm's, summed as autograd's input buffer does
    da, _, _, dA_o, dB_o = LoraLinearFunction.backward(c_o, dh.to(o_dtype))
    del c_o
    _accumulate([o_w], (dA_o, dB_o))
    dq4, dk4, dv4 = torch.autograd.grad(a4, (q4, k4, v4), da.view(b, s, -1, hd).transpose(1, 2))
    del a4, q4, k4, v4, da
    dq, dk, dv = [t.transpose(1, 2).reshape(b, s, -1) for t in (dq4, dk4, dv4)]
    del dq4, dk4, dv4
    dq, dk = RoPEProjectionsFunction.backward(c_rope, dq, dk)[:2]
    dys = [t.to(dt) for t, dt in zip((dq, dk, dv), raw_dtypes)]
    del dq, dk, dv
    dh1, _, *qkv_grads = LoraQKVFunction.backward(c_qkv, *dys)
    del c_qkv, dys
    _accumulate([p[0] for p in qkv], qkv_grads)
    if not x_needs_grad:
        return None
    dx = RMSNormFunction.backward(c_norm1, dh1)[0]
    return dh.to(x.dtype) + dx
