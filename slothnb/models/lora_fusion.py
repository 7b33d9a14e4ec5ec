"""Read the weights of a peft LoRA layer as a ``LoraWeights`` bundle for the fused kernels.

The fused LoRA kernels compute ``x @ W.T + scale * (x @ A.T) @ B.T`` in one pass (W possibly NF4).
That is only the same function as the peft layer when the layer is plain LoRA: one active adapter,
not merged, adapters enabled, no dropout (dropout would need a second, masked copy of x), no DoRA
or other LoRA variant, and a base layer that is an ``nn.Linear`` or a bitsandbytes 4-bit linear.
Everything else answers ``None`` and the caller runs the module itself (the generic path).
"""
from __future__ import annotations

import weakref

from torch import nn

from slothnb.kernels.lora import LoraWeights

try:
    from peft.tuners.lora import LoraLayer
except ImportError:  # pragma: no cover - peft is a dependency, but patching must not need it
    LoraLayer = None


def _is_4bit(base: nn.Module) -> bool:
    return type(base).__name__ == "Linear4bit" and hasattr(base.weight, "quant_state")


def fusable_adapter(module) -> str | None:
    """The one active adapter name of a plain, unmerged, enabled LoRA linear, else None."""
    if LoraLayer is None or not isinstance(module, LoraLayer):
        return None
    if module.disable_adapters or module.merged or getattr(module, "fan_in_fan_out", False):
        return None
    names = [n for n in module.active_adapters if n in module.lora_A]
    if len(names) != 1:
        return None
    name = names[0]
    if name in getattr(module, "lora_variant", {}) or getattr(module, "use_dora", {}).get(name, False):
        return None
    if getattr(module, "lora_bias", {}).get(name, False):
        return None
    dropout = module.lora_dropout[name]
    if not (isinstance(dropout, nn.Identity) or (isinstance(dropout, nn.Dropout) and dropout.p == 0)):
        return None
    if not isinstance(module.lora_A[name], nn.Linear) or not isinstance(module.lora_B[name], nn.Linear):
        return None
    return name


def lora_parts(module, allow_bias: bool = False):
    """``(weight, quant_state, A, B, scale, bias)`` of a fusable LoRA linear, else None.

    ``allow_bias``: the caller adds the base layer's bias after the fused op (exact for q/k/v/o,
    not for gate/up, whose bias sits inside the activation).
    """
    name = fusable_adapter(module)
    if name is None:
        return None
    base = module.get_base_layer()
    if type(base) is nn.Linear:
        quant_state = None
    elif _is_4bit(base):
        quant_state = base.weight.quant_state
    else:
        return None
    if base.weight.requires_grad:  # the fused kernels treat W as frozen (no dW)
        return None
    bias = base.bias
    if bias is not None and not allow_bias:
        return None
    A, B = module.lora_A[name].weight, module.lora_B[name].weight
    if A.dtype != B.dtype:
        return None
    return base.weight, quant_state, A, B, float(module.scaling[name]), bias


_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def _state_key(module):
    """Everything ``lora_parts`` depends on, read straight from the module's dicts (no nn.Module
    ``__getattr__``, no peft properties): the active adapter, enabled/merged state, the identity of
    A, B, the base layer and its weight/bias, the frozen flag, dtypes, scaling and dropout; and those objects, which the cache keeps alive so
    that their ids stay unique. ``(None, None)`` when the layout is not peft's usual one."""
    d = module.__dict__
    name = d.get("_active_adapter")
    if isinstance(name, (list, tuple)) and len(name) == 1:
        name = name[0]
    if not isinstance(name, str):
        return None, None
    try:
        mods = module._modules
        A = mods["lora_A"]._modules[name]._parameters["weight"]
        B = mods["lora_B"]._modules[name]._parameters["weight"]
        base = mods["base_layer"]
        W, bias = base._parameters["weight"], base._parameters.get("bias")
        dropout = mods["lora_dropout"]._modules[name]
        scale = d["scaling"][name]
    except (KeyError, AttributeError, TypeError):
        return None, None
    key = (name, d.get("_disable_adapters"), tuple(d.get("merged_adapters") or ()), id(A), id(B), id(base),
           id(W), id(bias), W.requires_grad, A.dtype, B.dtype, scale, id(dropout), getattr(dropout, "p", None))
    return key, (A, B, base, W, bias, dropout)


def lora_weights(module, allow_bias: bool = False):
    """``(LoraWeights, bias)`` for a fusable peft LoRA linear, or None (run the module instead).

    Cached per module (the patched forwards ask for every projection on every call, and the full
    check walks peft properties): the answer is reused while ``_state_key`` is unchanged, i.e. until
    the adapter is switched, merged, disabled, replaced, rescaled or the base is unfrozen.
    """
    if LoraLayer is None or not isinstance(module, LoraLayer):
        return None
    key, keep = _state_key(module)
    if key is None:
        return _lora_weights(module, allow_bias)
    entry = _CACHE.get(module)
    if entry is None:
        entry = _CACHE[module] = {}
    hit = entry.get(allow_bias)
    if hit is not None and hit[0] == key:
        return hit[1]
    result = _lora_weights(module, allow_bias)
    entry[allow_bias] = (key, result, keep)
    return result


def _lora_weights(module, allow_bias):
    parts = lora_parts(module, allow_bias)
    if parts is None:
        return None
    weight, quant_state, A, B, scale, bias = parts
    return LoraWeights(weight, quant_state, A, B, scale), bias


def split_lora_rows(module, sizes: list[int]):
    """Split a fusable LoRA linear with a fused output (Phi-3 ``qkv_proj``/``gate_up_proj``) by rows.

    ``[W; B]`` rows split exactly (each output slice only reads its own rows) and A is shared, so the
    pieces are the same function; autograd sums A's gradient over the pieces. Quantised W cannot be
    sliced row-wise through its packed blocks, so it answers None.
    """
    parts = lora_parts(module, allow_bias=False)
    if parts is None:
        return None
    weight, quant_state, A, B, scale, _ = parts
    if quant_state is not None or sum(sizes) != weight.shape[0]:
        return None
    return [LoraWeights(w, None, A, b, scale) for w, b in zip(weight.split(sizes), B.split(sizes))]


def linear_weight(module):
    """``(weight, bias)`` that ``module`` applies as a plain linear map, or None.

    Handles ``nn.Linear`` and peft's ``ModulesToSaveWrapper`` (trained copy of lm_head); used to feed
    the fused linear cross-entropy without materialising logits.
    """
    if type(module) is nn.Linear:
        return module.weight, module.bias
    if type(module).__name__ == "ModulesToSaveWrapper":
        # the same choice as ModulesToSaveWrapper.forward
        active = module.active_adapters
        if module.disable_adapters or not active or any(a not in module.modules_to_save for a in active):
            return linear_weight(module.original_module)
        return linear_weight(module.modules_to_save[active[0]])
    return None


__all__ = ["fusable_adapter", "lora_weights", "lora_parts", "split_lora_rows", "linear_weight"]
