"""A checkpointed Llama-family decoder layer written out: its forward, recompute and backward, no autograd.

``OffloadedCheckpoint.backward`` re-runs a layer with grad on (transformers' layer forward, ~7 autograd
Functions recorded, module calls) and then walks that graph with a nested ``torch.autograd.backward``.
On the hosts that pace an 8B or 1B training step, building and walking that graph costs ~0.7 ms of
host time a layer (docs/perf-notes.md, sections 14-15). This module does the same work by calling
the fused ops' forward and backward bodies in order (the checkpoint's no-grad forward too, ``forward``):

    forward:  h1 = rms(x); q, k, v = qkv(h1) (+ bias); rope(q, k); a = sdpa(q, k, v); o = o_proj(a);
              h = x + o; h2 = rms(h) (one kernel); mlp(h2) (only what its backward reads)
    backward: dh2 = mlp'(dy); dh = dy + rms'(dh2); da = o_proj'(dh); dq, dk, dv = sdpa'(da);
              rope'(dq, dk); dh1 = qkv'(dq, dk, dv); dx = dh + rms'(dh1)

Each op's ``torch.autograd.Function`` is called through its static ``forward`` / ``backward`` with a
stand-in ``ctx`` (``_Ctx``), so the arithmetic is the Functions' own and the gradients are
bit-identical to the autograd path (tests compare them). Written out, the RMSNorm ahead of NF4
projections writes straight into their widened input ``[h | h A^T ...]`` (``lora_widened.widened_buffer``)
instead of the projections copying it there. Where SDPA would run its flash or cuDNN kernels they are
called directly (``sdpa_direct``): the forward carries the attention's output and log-sum-exp to the
recompute, which then skips the attention forward, and the backward calls the fused backward. Other
backends stay a one-node autograd graph (``torch.autograd.grad`` over SDPA). The adapters' gradients
are accumulated into ``.grad`` as autograd's AccumulateGrad does.

It applies only where it is the same function as the layer: the decoder layer's forward is
Llama's (Llama, Mistral, Qwen2, Gemma), every sub-module runs slothnb's patched forward with all
seven projections fusable, SDPA/eager attention without dropout, a KV cache or attention outputs,
frozen norms, trainable adapters without hooks, an MLP not split into token chunks, Triton RMSNorm
(a GPU, or the interpreter in tests). Anything else answers None and the autograd path runs.
``SLOTHNB_WRITTEN_LAYERS=0`` (or ``ENABLED = False``) turns it off.
"""
from __future__ import annotations

import inspect
import os

import torch
from torch.nn.modules import module as _nn_module

from slothnb.kernels._utils import switched_on, use_triton
from slothnb.kernels.lora import LoraLinearFunction, LoraMLPFunction, LoraQKVFunction, _adapters
from slothnb.kernels import lora_widened
from slothnb.kernels.lora_widened import widened_buffer
from slothnb.kernels.rms_norm import RMSNormFunction, rms_norm_backward, rms_norm_forward
from slothnb.kernels.rope import RoPEProjectionsFunction, rope_in_place_ok
from slothnb.models import carrying, lora_fusion
from slothnb.models.arch import common, sdpa_direct

ENABLED = os.environ.get("SLOTHNB_WRITTEN_LAYERS", "1") != "0"
# A call's backward runs the plan its forward made (``memo``); False: it checks the layer again (benchmarks).
PLAN_ONCE = True


def _llama_forward_code():
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    return _code(LlamaDecoderLayer)


def _code(cls):
    """The bytecode of ``cls.forward`` under its decorators (transformers wraps some forwards)."""
    code = getattr(inspect.unwrap(cls.forward), "__code__", None)
    return None if code is None else (code.co_code, code.co_names, code.co_consts)


def applies_to(layer) -> bool:
    """Whether ``layer``'s class runs Llama's decoder-layer forward (same bytecode), the structure this
    module writes out. Checked once, when the layer is patched."""
    code = _code(type(layer))
    return code is not None and code == _llama_forward_code()


class _Ctx:
    """Stands in for an autograd ctx when a Function's forward and backward are called directly."""

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
    """What ``forward`` and ``backward`` need of this call (the layer's parts, each projection's
    ``lora_weights``, the activation, cos/sin), or None when writing the layer out does not apply."""
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


def _adapter_params(weights):
    """Each adapter's A, B in ``_adapters`` order: the order of the gradients the Functions return."""
    return [t for w in weights for t in (w.A, w.B)]


def _accumulate(params, grads) -> None:
    """``p.grad += g`` for each adapter parameter, as AccumulateGrad does: the first gradient is taken
    as it is when it is laid out like the parameter, else copied."""
    for p, g in zip(params, grads):
        if p.grad is None:
            p.grad = g if g.is_contiguous() and g.stride() == p.stride() else g.clone(memory_format=torch.contiguous_format)
        else:
            p.grad += g


def forward(layer, args, kwargs, memo=None):
    """The checkpointed call's output, computed written out (no grad; values carried to the recompute
    as the patched modules carry them), or None when this layer or call is not covered (nothing done).
    ``memo``: a dict the call's ``backward`` is given too; the plan this forward ran is kept in it, so that
    the backward runs as its forward was planned without checking the layer again (~45 us of host a layer)."""
    x = args[0] if args else kwargs.get("hidden_states")
    plan = _plan(layer, x, kwargs)
    if plan is None:
        return None
    if memo is not None:
        memo["plan"] = plan
    return _forward(plan, x, kwargs.get("attention_mask"), recompute=False)


def backward(layer, args, kwargs, inputs, grad_outs, needs, accumulate=None, memo=None):
    """Gradients of the checkpointed call's tensor ``inputs`` (``needs[i]``: whether input i needs one),
    the adapters' added into their ``.grad``; or None when this layer or call is not covered (nothing
    has been done then). Runs inside the checkpoint's replay (RNG, autocast) and carry scopes.
    ``accumulate(params, grads)`` takes the adapters' gradients instead (a CUDA graph's capture keeps
    them as its outputs: ``layer_graphs``). ``memo``: the dict the call's ``forward`` was given: the plan
    it wrote the layer out with is used (a forward that did not apply leaves none: checked afresh)."""
    x = args[0] if args else kwargs.get("hidden_states")
    slot = next((i for i, t in enumerate(inputs) if t is x), None)
    if slot is None or any(n for i, n in enumerate(needs) if i != slot):
        return None
    planned = memo.get("plan") if ENABLED and PLAN_ONCE and memo is not None else None
    plan = planned if planned is not None else _plan(layer, x, kwargs)
    if plan is None:
        return None
    grads = [None] * len(inputs)
    dy = grad_outs[0] if len(grad_outs) == 1 else None
    if dy is None:
        return grads
    with torch.no_grad():
        state = _forward(plan, x, kwargs.get("attention_mask"), recompute=True, x_needs_grad=bool(needs[slot]))
        grads[slot] = _backward(plan, state, x, dy, accumulate or _accumulate)
    return grads


# SLOTHNB_FUSED_RESIDUAL_ADD: the forward's ``h = x + o`` computed by the second RMSNorm's kernel (one
# launch and one pass over x, o and h fewer a layer). "1" (default) everywhere, "cpu" only off CUDA,
# "0" nowhere.
_RESIDUAL_ADD = os.environ.get("SLOTHNB_FUSED_RESIDUAL_ADD", "1")


def _fuses_residual_add(x, o) -> bool:
    return switched_on(_RESIDUAL_ADD, x) and x.dtype == o.dtype and x.shape == o.shape and x.is_contiguous() and o.is_contiguous()


def _norm(norm, x, into_weights, ctx, add=None):
    """RMSNorm of x (of ``x + add`` when given) as ``RMSNormFunction.forward`` (its backward state in
    ``ctx``), written into a widened buffer for the NF4 projections ``into_weights`` when they will
    widen it. (y, that buffer or None, the normed input: x, or the sum)."""
    x2 = x.reshape(-1, x.shape[-1])
    buf = widened_buffer(x, into_weights)
    args = (x2, norm.weight, norm._slothnb_eps, norm._slothnb_offset)
    out = None if buf is None else buf[:, :x.shape[-1]]
    if add is None:
        y, rstd = rms_norm_forward(*args, out_shape=x.shape, out=out)
    else:
        y, rstd, x2 = rms_norm_forward(*args, out_shape=x.shape, out=out, add=add.reshape(x2.shape))
        x = x2.view(x.shape)
    ctx.save_for_backward(x2, norm.weight, rstd)
    ctx.offset = norm._slothnb_offset
    return (y if buf is None else y.view(x.shape)), buf, x


class _State:
    """What the recompute leaves its backward: each op's ctx, the attention's inputs and output (with
    its log-sum-exp, or as a one-node graph), dtypes."""

    __slots__ = ("norm1", "qkv", "rope", "sdpa", "q4", "k4", "v4", "a4", "o", "norm2", "mlp", "dtypes", "x_needs_grad")


def _forward(plan, x, mask, recompute, x_needs_grad=False):
    """The layer's forward as the patched modules run it. Without ``recompute``: the output (values
    carried as the modules carry them). With it: a ``_State`` for ``_backward`` (carried values used,
    the MLP output left unset)."""
    attn, (norm1, norm2), qkv, o_w, activation, mlp_w, (cos, sin) = plan
    st = _State()
    b, s = x.shape[:2]
    hd = attn.head_dim
    st.norm1 = _Ctx(True, False, False, False)
    qkv_w = [p[0] for p in qkv]
    h1, widened, _ = _norm(norm1, x, qkv_w, st.norm1)
    qkv_tensors, qkv_bundles = _adapters(qkv_w)
    st.qkv = _Ctx(x_needs_grad)
    st.qkv.widened = widened
    st.qkv.keep_bases = recompute  # its dequantised W kept for the backward that follows (lora_widened.KEEP)
    projected = LoraQKVFunction.forward(st.qkv, h1, qkv_bundles, *qkv_tensors)
    st.qkv.widened = widened = None
    if not recompute:  # a forward keeps nothing for a backward (as the Functions' apply without grad)
        st.qkv = st.norm1 = None
    del h1
    q, k, v = [t if p[1] is None else t + p[1] for t, p in zip(projected, qkv)]
    raw_dtypes = [t.dtype for t in projected]
    del projected
    if not rope_in_place_ok(q, k):  # fresh projection outputs always are; a guard, not a path
        raise RuntimeError("slothnb written-out layer: q and k are not rotatable in place")
    st.rope = _Ctx(True, True, False, False, False)
    q, k = RoPEProjectionsFunction.forward(st.rope, q, k, cos, sin, hd)
    if not recompute:
        st.rope = None
    q4, k4, v4 = [t.view(b, s, -1, hd).transpose(1, 2) for t in (q, k, v)]
    del q, k, v
    direct = sdpa_direct.prepare(attn, q4, k4, v4, mask, requires_grad=recompute)
    st.sdpa = None
    if direct is not None:  # SDPA's own fused kernels, called directly: out and lse can be carried
        fused, q4, k4, v4 = direct
        del direct
        kept = carrying.carried_attention_state(q4) if recompute else None
        if kept is None:
            carry = not recompute and carrying.carries_attention_state(q4)
            a4, lse, rest = sdpa_direct.forward(fused, q4, k4, v4, lse_needed=recompute or carry)
            if carry:
                carrying.carry_attention_state(a4, lse, rest)
        else:
            a4, lse, rest = kept
        a = a4.transpose(1, 2).reshape(b, s, -1)  # a view for CUDA flash ([b, s, heads, d]), else a copy
        if recompute:
            st.sdpa = (fused, q4, k4, v4, a4, lse, rest)
        del a4, lse, rest
    elif recompute:
        with torch.enable_grad():
            q4, k4, v4 = [t.detach().requires_grad_() for t in (q4, k4, v4)]
            a4 = common._sdpa(attn, q4, k4, v4, mask, 0.0)
        st.q4, st.k4, st.v4, st.a4 = q4, k4, v4, a4
        a = a4.detach().transpose(1, 2).reshape(b, s, -1)
        del a4
    else:
        a = common._sdpa(attn, q4, k4, v4, mask, 0.0).transpose(1, 2).reshape(b, s, -1)
    del q4, k4, v4
    st.o = _Ctx(True)
    o_tensors, o_bundles = _adapters([o_w])
    given = carrying.carried_attention_output(a)
    o = LoraLinearFunction.forward(st.o, a, o_bundles, [given], *o_tensors)
    if not recompute:
        carrying.carry_attention_output(a, o)
        st.o = None
    del a
    o_dtype = o.dtype
    st.norm2 = _Ctx(True, False, False, False)
    if _fuses_residual_add(x, o):
        h2, widened, h = _norm(norm2, x, mlp_w[:2], st.norm2, add=o)
    else:
        h = x + o
        h2, widened, _ = _norm(norm2, h, mlp_w[:2], st.norm2)
    del o
    h_dtype = h.dtype
    if recompute:
        del h
    else:
        st.norm2 = None
    gate_up, keep = carrying.carry_gate_up(h2)
    mlp_tensors, mlp_bundles = _adapters(mlp_w)
    st.mlp = _Ctx(True)
    st.mlp.widened = widened
    st.mlp.keep_bases = recompute and lora_widened.KEEP_GATE_UP
    # a recompute's MLP output is never read (benchmarks may switch the skip off)
    output_needed = not recompute or not common.RECOMPUTE_SKIP
    m = LoraMLPFunction.forward(st.mlp, h2, activation, output_needed, (gate_up, keep), mlp_bundles, *mlp_tensors)
    st.mlp.widened = None
    if not recompute:
        st.mlp = None
        del h2
        return h + m
    st.dtypes = (raw_dtypes, o_dtype, h_dtype, m.dtype)
    st.x_needs_grad = x_needs_grad
    return st


def _backward(plan, st, x, dy, accumulate=_accumulate):
    """The layer's backward from the recompute's ``_State``: adapter gradients to ``accumulate``, dx returned."""
    attn, _norms, qkv, o_w, _activation, mlp_w, _cos_sin = plan
    b, s = x.shape[:2]
    hd = attn.head_dim
    raw_dtypes, o_dtype, h_dtype, m_dtype = st.dtypes
    dh2, *_, dA_g, dB_g, dA_u, dB_u, dA_d, dB_d = LoraMLPFunction.backward(st.mlp, dy.to(m_dtype))
    st.mlp = None
    accumulate(_adapter_params(mlp_w), (dA_g, dB_g, dA_u, dB_u, dA_d, dB_d))
    dh = _norm_backward(st.norm2, dh2, dy.to(h_dtype))  # the norm's share and the residual's
    st.norm2 = None
    del dh2
    da, _, _, dA_o, dB_o = LoraLinearFunction.backward(st.o, dh.to(o_dtype))
    st.o = None
    accumulate(_adapter_params([o_w]), (dA_o, dB_o))
    da4 = da.view(b, s, -1, hd).transpose(1, 2)
    if st.sdpa is not None:
        fused, q4, k4, v4, a4, lse, rest = st.sdpa
        st.sdpa = None
        dq4, dk4, dv4 = sdpa_direct.backward(fused, da4, q4, k4, v4, a4, lse, rest)
        del q4, k4, v4, a4, lse, rest
    else:
        dq4, dk4, dv4 = torch.autograd.grad(st.a4, (st.q4, st.k4, st.v4), da4)
        st.a4 = st.q4 = st.k4 = st.v4 = None
    del da4
    del da
    dq, dk, dv = [t.transpose(1, 2).reshape(b, s, -1) for t in (dq4, dk4, dv4)]
    del dq4, dk4, dv4
    dq, dk = RoPEProjectionsFunction.backward(st.rope, dq, dk)[:2]
    dys = [t.to(dt) for t, dt in zip((dq, dk, dv), raw_dtypes)]
    del dq, dk, dv
    dh1, _, *qkv_grads = LoraQKVFunction.backward(st.qkv, *dys)
    st.qkv = None
    del dys
    accumulate(_adapter_params([p[0] for p in qkv]), qkv_grads)
    if not st.x_needs_grad:
        return None
    return _norm_backward(st.norm1, dh1, dh.to(x.dtype))


# SLOTHNB_FUSED_RESIDUAL_GRAD=0: the residual's gradient is added after the RMSNorm backward (benchmarks).
FUSED_RESIDUAL_GRAD = os.environ.get("SLOTHNB_FUSED_RESIDUAL_GRAD", "1") != "0"


_16BIT = (torch.bfloat16, torch.float16)


def _norm_backward(ctx, dy, residual):
    """``residual + dx`` of the RMSNorm whose forward state is ``ctx`` (x's two gradients in a pre-norm
    block, summed as autograd's input buffer sums them), the sum done by the norm's backward kernel."""
    x2, weight, rstd = ctx.saved_tensors
    res = residual.reshape(-1, x2.shape[-1])
    if FUSED_RESIDUAL_GRAD and res.dtype == x2.dtype and x2.dtype in _16BIT and res.stride(-1) == 1:
        return rms_norm_backward(dy.reshape(-1, x2.shape[-1]), x2, weight, rstd, ctx.offset, compute_dw=False,
                                 residual=res)[0].view(residual.shape)
    return residual + RMSNormFunction.backward(ctx, dy)[0]
