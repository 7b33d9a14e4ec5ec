"""The patched forwards shared by every decoder architecture, bound per instance by ``patch_layers``.

Each forward looks its sub-modules up at call time (``self.q_proj`` ...), so peft wrapping the
projections after patching (``get_peft_model``) is picked up: fusable LoRA layers go through the
fused kernels, anything else (plain linears, 8-bit, DoRA, dropout > 0) is called as a module.
HF's base-model forward is kept: it builds the causal / sliding / packed masks and rotary cos/sin.
"""
from __future__ import annotations

import functools
import os
import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import CausalLMOutputWithPast

from slothnb.kernels._utils import use_triton
from slothnb.kernels.lora_chunked import token_chunked
from slothnb.models import carrying, checkpointing, head_offload, lora_fusion
from slothnb.models.arch import _ops


@dataclass(frozen=True)
class ArchSpec:
    """What differs between the supported decoders (everything else is Llama)."""

    norm_offset: float = 0.0  # Gemma's RMSNorm scales by (1 + w)
    layer_norms: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm")
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k before RoPE
    fused_qkv: bool = False  # Phi-3: one qkv_proj
    fused_gate_up: bool = False  # Phi-3: one gate_up_proj, gate first
    softcaps: bool = False  # Gemma-2: attention and final-logit soft-capping
    # The decoder layer's MLP output goes only into the residual sum (Gemma-2 normalises it first):
    # a checkpoint recompute may then skip the down projection (``mlp_forward``).
    mlp_output_to_residual: bool = True


# ----------------------------------------------------------------------------- norms
def rms_norm_forward(self, hidden_states):
    return _ops.rms_norm(hidden_states, self.weight, self._slothnb_eps, self._slothnb_offset)


# ----------------------------------------------------------------------------- MLP
_ACTIVATIONS = {  # transformers activation class name -> fused gated activation
    "SiLUActivation": "swiglu", "SiLU": "swiglu",
    "GELUActivation": "geglu", "GELUTanh": "geglu_tanh", "PytorchGELUTanh": "geglu_tanh",
    "NewGELUActivation": "geglu_tanh",
}


def _gated(activation, gate, up):
    if activation == "swiglu":
        return _ops.swiglu(gate, up)
    return _ops.geglu(gate, up, approximate="tanh" if activation == "geglu_tanh" else "none")


# Above this many tokens per call (batch x sequence) the MLP runs in token chunks of this size, so
# only one chunk's gate/up/activation exist at a time, in forward and backward (``token_chunked``).
# Below it nothing changes. 16K tokens of the Llama-3.1-8B MLP is ~0.5 GB per [tokens, 14336] buffer.
MLP_CHUNK_TOKENS = int(os.environ.get("SLOTHNB_MLP_CHUNK_TOKENS", 16384))


# In a checkpoint's recompute the MLP output's values are never read when the layer only adds it to
# the residual: the fused MLP then skips the down projection (~1/4 of a Llama layer's matmul FLOPs;
# with token chunking, the whole MLP forward). SLOTHNB_RECOMPUTE_SKIP=0 turns this off (benchmarks).
RECOMPUTE_SKIP = os.environ.get("SLOTHNB_RECOMPUTE_SKIP", "1") != "0"


def mlp_forward(self, x):
    output_needed = not (RECOMPUTE_SKIP and self._slothnb_spec.mlp_output_to_residual and checkpointing.recomputing())
    tokens = x.numel() // max(x.shape[-1], 1)
    if tokens > MLP_CHUNK_TOKENS:
        params = [p for p in self.parameters() if p.requires_grad]
        skip = functools.partial(_mlp, self, output_needed=False) if RECOMPUTE_SKIP else None
        return token_chunked(functools.partial(_mlp, self), x, params, MLP_CHUNK_TOKENS, recompute_fn=skip,
                             output_needed=output_needed, out_features=x.shape[-1])
    return _mlp(self, x, output_needed, carry=True)


def _act_module(mlp):
    return getattr(mlp, "act_fn", None) or mlp.activation_fn


def fused_activation(mlp) -> str | None:
    """The fused gated activation ("swiglu" | "geglu" | "geglu_tanh") this MLP's ``act_fn`` is, or None
    (an activation without a kernel, or transformers' Python GELU variants)."""
    act_module = _act_module(mlp)
    if getattr(act_module, "use_gelu_python", False) or getattr(act_module, "use_gelu_tanh_python", False):
        return None
    return _ACTIVATIONS.get(type(act_module).__name__)


def _mlp(self, x, output_needed=True, carry=False):
    """The MLP; ``output_needed=False`` lets the fused path leave the output's values unset (its graph
    is exact). Unfused paths (plain linears, DoRA, dropout...) compute the output regardless. ``carry``:
    the fused path may hand G and U from a checkpointed forward to its recompute
    (``carrying.carry_gate_up``; never per token chunk, whose recompute runs elsewhere)."""
    act_module = _act_module(self)
    activation = fused_activation(self)
    if self._slothnb_spec.fused_gate_up:
        return _fused_gate_up_mlp(self, x, act_module, activation, output_needed)
    if activation is not None:
        parts = [lora_fusion.lora_weights(m) for m in (self.gate_proj, self.up_proj, self.down_proj)]
        if all(p is not None for p in parts):
            gate_up, keep = carrying.carry_gate_up(x) if carry else (None, None)
            return _ops.lora_mlp(x, parts[0][0], parts[1][0], parts[2][0], activation=activation,
                                 output_needed=output_needed, gate_up=gate_up, keep_gate_up=keep)
    gate, up = self.gate_proj(x), self.up_proj(x)
    hidden = _gated(activation, gate, up) if activation else act_module(gate) * up
    return self.down_proj(hidden)


def _fused_gate_up_mlp(self, x, act_module, activation, output_needed=True):
    """Phi-3: ``gate, up = gate_up_proj(x).chunk(2)``; fused when the LoRA rows split exactly."""
    inter = self.down_proj.in_features
    if activation is not None:
        pieces = lora_fusion.split_lora_rows(self.gate_up_proj, [inter, inter])
        down = lora_fusion.lora_weights(self.down_proj)
        if pieces is not None and down is not None:
            return _ops.lora_mlp(x, pieces[0], pieces[1], down[0], activation=activation,
                                 output_needed=output_needed)
    gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
    hidden = _gated(activation, gate, up) if activation else up * act_module(gate)
    return self.down_proj(hidden)


# ----------------------------------------------------------------------------- attention
def _project_qkv(self, x):
    """q, k, v as ``[B, S, features]``, through ``lora_qkv`` when all three are fusable."""
    spec = self._slothnb_spec
    if spec.fused_qkv:
        q_size = self.config.num_attention_heads * self.head_dim
        kv_size = self.config.num_key_value_heads * self.head_dim
        sizes = [q_size, kv_size, kv_size]
        pieces = lora_fusion.split_lora_rows(self.qkv_proj, sizes)
        if pieces is not None:
            return _ops.lora_qkv(x, *pieces)
        return self.qkv_proj(x).split(sizes, dim=-1)
    parts = [lora_fusion.lora_weights(m, allow_bias=True) for m in (self.q_proj, self.k_proj, self.v_proj)]
    if all(p is not None for p in parts):
        outs = _ops.lora_qkv(x, parts[0][0], parts[1][0], parts[2][0])
        return [o if p[1] is None else o + p[1] for o, p in zip(outs, parts)]
    return self.q_proj(x), self.k_proj(x), self.v_proj(x)


def _project_out(self, x):
    part = lora_fusion.lora_weights(self.o_proj, allow_bias=True)
    if part is None:
        return self.o_proj(x)
    if part[1] is not None:
        return _ops.lora_linear(x, part[0]) + part[1]
    # an offload-checkpointed layer's forward hands this output to its recompute, which then skips the
    # base matmul (SLOTHNB_CARRY_ATTN_OUTPUT=1; both calls do nothing elsewhere)
    out = _ops.lora_linear(x, part[0], output=carrying.carried_attention_output(x))
    carrying.carry_attention_output(x, out)
    return out


def _repeat_kv(x, n_rep):
    if n_rep == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


# Gemma-2's soft-capped attention through the flash kernel (kernels/softcap_attention.py) where it
# applies. On the H100 it trains the Gemma-2-9B QLoRA step 1.19x faster in 1.75 GiB less than the eager
# path (docs/benchmarks.md, session 9). SLOTHNB_SOFTCAP_FLASH=0 (read at import) keeps the eager path.
SOFTCAP_FLASH = os.environ.get("SLOTHNB_SOFTCAP_FLASH", "1") != "0"


def _softcap_flash_applies(self, q, k, mask, dropout) -> bool:
    """The flash kernel covers causal (+ sliding window) attention over the whole sequence: no
    padding mask (with SDPA-style masks, transformers passes None when nothing is padded), no
    dropout, no KV cache beyond the queries, a head size it was built for."""
    return (SOFTCAP_FLASH and mask is None and dropout == 0.0 and self.is_causal and q.shape[2] == k.shape[2]
            and q.shape[-1] in _ops.SOFTCAP_HEAD_DIMS and use_triton(q))


def _softcapped_attention(self, q, k, v, mask, softcap, dropout):
    """Gemma-2's eager attention: tanh soft-capping of the scores cannot go through SDPA."""
    if _softcap_flash_applies(self, q, k, mask, dropout):
        return _ops.softcap_attention(q, k, v, softcap, self.scaling, causal=True,
                                      window=getattr(self, "sliding_window", None))
    k, v = _repeat_kv(k, self.num_key_value_groups), _repeat_kv(v, self.num_key_value_groups)
    scores = torch.matmul(q, k.transpose(2, 3)) * self.scaling
    scores = torch.tanh(scores / softcap) * softcap
    if mask is None and self.is_causal and q.shape[2] > 1:
        q_len, kv_len = q.shape[2], k.shape[2]
        mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=q.device).tril(kv_len - q_len)
        window = getattr(self, "sliding_window", None)
        if window is not None and q_len > window:  # mask None can reach a sliding layer (_plain_causal)
            mask &= ~torch.ones_like(mask).tril(kv_len - q_len - window)
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + mask[..., : k.shape[2]]
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    probs = F.dropout(probs, p=dropout, training=self.training)
    return torch.matmul(probs, v)


def _sdpa(self, q, k, v, mask, dropout):
    """SDPA with HF's conventions: is_causal (flash / mem-efficient) when no mask is materialised."""
    q_len = q.shape[2]
    is_causal = q_len > 1 and mask is None and getattr(self, "is_causal", True)
    if is_causal and k.shape[2] > q_len:  # prefill into an empty static cache (HF does the same)
        k, v = k[:, :, :q_len], v[:, :, :q_len]
    extra = {}
    if self.num_key_value_groups > 1:
        if mask is None:
            extra["enable_gqa"] = True
        else:
            k, v = _repeat_kv(k, self.num_key_value_groups), _repeat_kv(v, self.num_key_value_groups)
    if mask is not None and mask.dtype != torch.bool:
        mask = mask[..., : k.shape[2]]
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout, scale=self.scaling, is_causal=is_causal, **extra
    )


def attention_forward(self, hidden_states, position_embeddings=None, attention_mask=None,
                      past_key_values=None, **kwargs):
    if self.config._attn_implementation not in ("sdpa", "eager") or kwargs.get("output_attentions"):
        # flash / flex masks and attention-weight outputs: transformers' own forward
        return type(self).forward(self, hidden_states, position_embeddings=position_embeddings,
                                  attention_mask=attention_mask, past_key_values=past_key_values, **kwargs)
    bsz, q_len = hidden_states.shape[:2]
    q, k, v = _project_qkv(self, hidden_states)
    v = v.view(bsz, q_len, -1, self.head_dim).transpose(1, 2)
    if self._slothnb_spec.qk_norm:
        q = self.q_norm(q.view(bsz, q_len, -1, self.head_dim))
        k = self.k_norm(k.view(bsz, q_len, -1, self.head_dim))
    cos, sin = position_embeddings
    q, k = _ops.rope_projections(q, k, cos, sin, self.head_dim)  # rotated before the transpose: in place
    if past_key_values is not None:
        k, v = past_key_values.update(k, v, self.layer_idx)
    dropout = self.attention_dropout if self.training else 0.0
    softcap = getattr(self, "attn_logit_softcapping", None) if self._slothnb_spec.softcaps else None
    if softcap is not None:
        out = _softcapped_attention(self, q, k, v, attention_mask, softcap, dropout)
    else:
        out = _sdpa(self, q, k, v, attention_mask, dropout)
    out = out.transpose(1, 2).reshape(bsz, q_len, -1)
    return _project_out(self, out), None


# ----------------------------------------------------------------------------- causal LM
try:
    from transformers.modeling_utils import slice_logits_to_keep
except ImportError:  # transformers < 5.2x slices inline

    def slice_logits_to_keep(hidden_states, logits_to_keep):
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        return hidden_states[:, keep, :]


_LOSS_KWARGS = ("num_items_in_batch", "shift_labels", "ignore_index")


def causal_lm_forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                      inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, **kwargs):
    """transformers' ``*ForCausalLM.forward`` with the loss from the fused linear cross-entropy.

    With labels in training mode the full ``[B, S, V]`` logits are never built and ``logits`` is
    None (set ``model._slothnb_return_logits = True`` to get them anyway); in eval mode, or without
    labels, logits are returned as usual.
    """
    _ops.begin_pass()  # fresh 16-bit copies of the adapters for this forward (+ its recompute/backward)
    return_dict = kwargs.pop("return_dict", None)
    if return_dict is None:
        return_dict = getattr(self.config, "return_dict", True)
    loss_kwargs = {k: kwargs.pop(k) for k in _LOSS_KWARGS if k in kwargs}
    if labels is not None and self.training:
        head_offload.prefetch(self.lm_head)  # a head in host memory travels while the layers run
    if (self._slothnb_spec.softcaps and not kwargs.get("output_attentions")
            and _plain_causal(self, input_ids, inputs_embeds, attention_mask, position_ids, past_key_values, use_cache)):
        # No padding, packing or cache: every layer's mask is plain causal (+ the layer's sliding window),
        # which the attention applies itself, so the soft-capped flash kernel also covers the sliding
        # layers beyond the window, where transformers would materialise a [B, 1, S, S] mask.
        attention_mask = {kind: None for kind in ("full_attention", "sliding_attention")}
    outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                         **kwargs)
    hidden = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
    softcap = getattr(self.config, "final_logit_softcapping", None) if self._slothnb_spec.softcaps else None
    want_logits = labels is None or not self.training or getattr(self, "_slothnb_return_logits", False)
    logits = None
    if want_logits:
        logits = self.lm_head(hidden)
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
    loss = None
    if labels is not None:
        loss = _causal_lm_loss(self, hidden, logits, labels, **loss_kwargs)
    out = CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=outputs.past_key_values,
                                 hidden_states=outputs.hidden_states, attentions=outputs.attentions)
    return out if return_dict else out.to_tuple()


def _plain_causal(self, input_ids, inputs_embeds, attention_mask, position_ids, past_key_values, use_cache) -> bool:
    """Whether this forward needs nothing but causal (+ sliding-window) masking, which slothnb's own
    attention (sdpa / eager implementations) then applies: no KV cache, no padding (a 2-D mask of ones),
    no packed sequences (positions 0..S-1 in every row). One host sync at most."""
    if self.config._attn_implementation not in ("sdpa", "eager"):  # others are transformers' own forwards
        return False
    caching = use_cache if use_cache is not None else self.config.use_cache
    if past_key_values is not None or (caching and not self.training):  # generation: HF's masks and cache
        return False
    ref = input_ids if input_ids is not None else inputs_embeds
    if ref is None or ref.shape[1] < 2:
        return False
    checks = []
    if attention_mask is not None:
        if not torch.is_tensor(attention_mask) or attention_mask.dim() != 2:
            return False
        checks.append(attention_mask.bool().all())
    if position_ids is not None:
        seq = ref.shape[1]
        checks.append((position_ids == torch.arange(seq, device=position_ids.device)).all())
    return not checks or bool(torch.stack(checks).all())


def _causal_lm_loss(self, hidden, logits, labels, num_items_in_batch=None, shift_labels=None, ignore_index=-100):
    """HF's ForCausalLMLoss (shift by one, -100 ignored, sum / num_items_in_batch when given)."""
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    shift_labels = shift_labels.reshape(-1).to(hidden.device)
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(hidden.device)
    ce = dict(ignore_index=ignore_index, num_items_in_batch=num_items_in_batch)
    if logits is not None:  # already built (softcap applied) and handed to the caller: not overwritten
        return _ops.cross_entropy(logits.reshape(-1, logits.shape[-1]), shift_labels, inplace_backward=False, **ce)
    softcap = getattr(self.config, "final_logit_softcapping", None) if self._slothnb_spec.softcaps else None
    flat = hidden.reshape(-1, hidden.shape[-1])
    lm_head = self.lm_head
    head = ((lm_head.take(flat.device), None) if isinstance(lm_head, head_offload.HostHead)
            else lora_fusion.linear_weight(lm_head))
    if head is None:  # lm_head with LoRA on it: build the logits, then the chunked cross-entropy
        return _ops.cross_entropy(self.lm_head(flat), shift_labels, softcap=softcap, **ce)
    weight, bias = head
    return _ops.fused_linear_cross_entropy(flat, weight, shift_labels, bias=bias, softcap=softcap, **ce)


# ----------------------------------------------------------------------------- binding
def bind(module, fn, spec):
    """Replace ``module.forward`` on this instance only (the class is untouched)."""
    module.forward = types.MethodType(fn, module)
    module._slothnb_spec = spec
    module._slothnb_patched = True


def bind_norm(module, spec):
    eps = module.variance_epsilon if hasattr(module, "variance_epsilon") else module.eps
    module._slothnb_eps = float(eps)
    module._slothnb_offset = spec.norm_offset
    bind(module, rms_norm_forward, spec)


def patch_layers(causal_lm, spec: ArchSpec) -> None:
    """Bind the kernel forwards on every norm, attention and MLP of ``causal_lm`` and on itself."""
    from slothnb.models.arch import llama_layer  # it builds on this module

    base = causal_lm.model
    for layer in base.layers:
        for name in spec.layer_norms:
            bind_norm(getattr(layer, name), spec)
        attn = layer.self_attn
        if spec.qk_norm:
            bind_norm(attn.q_norm, spec)
            bind_norm(attn.k_norm, spec)
        bind(attn, attention_forward, spec)
        bind(layer.mlp, mlp_forward, spec)
        if llama_layer.applies_to(layer):  # Llama's decoder layer: checkpointed, it may run written out
            # (read by checkpointing.offloaded_checkpoint; bound methods: checkpointing does not import arch)
            layer._slothnb_written = (types.MethodType(llama_layer.forward, layer),
                                      types.MethodType(llama_layer.backward, layer))
    bind_norm(base.norm, spec)
    bind(causal_lm, causal_lm_forward, spec)


def unpatch(model) -> None:
    """Drop every instance-level forward that ``patch_layers`` bound."""
    for module in model.modules():
        module.__dict__.pop("_slothnb_written", None)
        if module.__dict__.get("_slothnb_patched"):
            module.__dict__.pop("forward", None)
            for attr in ("_slothnb_patched", "_slothnb_spec", "_slothnb_eps", "_slothnb_offset"):
                module.__dict__.pop(attr, None)
