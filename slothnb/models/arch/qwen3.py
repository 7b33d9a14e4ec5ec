"""Qwen3: RMSNorm on each head of q and k (before RoPE), no q/k/v bias."""
from slothnb.models.arch.common import ArchSpec, patch_layers

SPEC = ArchSpec(qk_norm=True)


def patch(model) -> None:
    patch_layers(model, SPEC)
