"""Mistral: Llama's layout; the sliding window arrives in the mask HF's base model builds."""
from slothnb.models.arch.common import ArchSpec, patch_layers

SPEC = ArchSpec()


def patch(model) -> None:
    patch_layers(model, SPEC)
