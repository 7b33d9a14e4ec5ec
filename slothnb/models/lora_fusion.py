"""Read the weights of a peft LoRA layer as a ``LoraWeights`` bundle for the fused kernels.

The fused LoRA kernels compute ``x @ W.T + scale * (x @ A.T) @ B.T`` in one pass (W possibly NF4).
That is only the same function as the peft layer when the layer is plain LoRA: one active adapter,
not merged, adapters enabled, no dropout (dropout would need a second, masked copy of x), no DoRA
or other LoRA variant, and a base layer that is an ``nn.Linear`` or a bitsandbytes 4-bit linear.
Everything else answers ``None`` and the caller runs the module itself (the generic path).
"""
from __future__ import annotations

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


def lora_weights(module, allow_bias: bool = False):
    """``(LoraWeights, bias)`` for a fusable peft LoRA linear, or None (run the module instead)."""
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
