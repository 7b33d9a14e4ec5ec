"""Llama 2 / 3 / 3.1 / 3.2 (and SmolLM, TinyLlama...): the reference layout every other adapter varies."""
from slothnb.models.arch.common import ArchSpec, patch_layers

SPEC = ArchSpec()


def patch(model) -> None:
    patch_layers(model, SPEC)
