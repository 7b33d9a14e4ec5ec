"""Phi-3 / Phi-3.5 / Phi-4-mini: fused ``qkv_proj`` and ``gate_up_proj`` (split by rows for the fused LoRA
kernels when unquantised), partial rotary handled by the PyTorch RoPE formula."""
from slothnb.models.arch.common import ArchSpec, patch_layers

SPEC = ArchSpec(fused_qkv=True, fused_gate_up=True)


def patch(model) -> None:
    patch_layers(model, SPEC)
