"""Qwen2 / Qwen2.5, natively (no llamafying): biased q/k/v, whose bias is added after the fused LoRA op."""
from slothnb.models.arch.common import ArchSpec, patch_layers

SPEC = ArchSpec()


def patch(model) -> None:
    patch_layers(model, SPEC)
