"""Gemma: ``(1 + w)`` RMSNorm in fp32, GeGLU (tanh) MLP; the sqrt(hidden) embedding scale stays in HF's
embedding module, which the base-model forward still calls."""
from slothnb.models.arch.common import ArchSpec, patch_layers

SPEC = ArchSpec(norm_offset=1.0)


def patch(model) -> None:
    patch_layers(model, SPEC)
