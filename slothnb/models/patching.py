"""Patch one loaded model instance with the slothnb kernels.

``patch_model(model)`` binds kernel forwards (RMSNorm, in-place RoPE + SDPA attention, fused LoRA
QKV/O/MLP when fusable, fused linear cross-entropy loss) on the modules of this one model. The
classes in transformers are never edited, so a second model of the same class, or any other code in
the process, runs exactly as before. Unsupported architectures load unpatched with one warning:
slower, never wrong.
"""
from __future__ import annotations

import logging

from torch import nn

from slothnb.models.arch import ADAPTERS
from slothnb.models.arch.common import unpatch

logger = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = tuple(ADAPTERS)


def _causal_lm(model: nn.Module) -> nn.Module:
    """The ``*ForCausalLM`` inside a peft wrapper (patching works before or after ``get_peft_model``)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def is_patched(model: nn.Module) -> bool:
    return bool(_causal_lm(model).__dict__.get("_slothnb_patched"))


def patch_model(model: nn.Module) -> bool:
    """Bind the kernel forwards on ``model`` (a ``*ForCausalLM``, optionally peft-wrapped).

    Returns True when patched (or already patched), False when the architecture is not supported,
    in which case the model is left exactly as it was and one warning says so.
    """
    lm = _causal_lm(model)
    config = getattr(lm, "config", None)
    model_type = getattr(config, "model_type", None)
    adapter = ADAPTERS.get(model_type)
    structured = hasattr(lm, "lm_head") and hasattr(getattr(lm, "model", None), "layers")
    if adapter is None or not structured:
        logger.warning(
            "slothnb: %s (model_type=%r) has no kernel adapter; it runs unpatched (correct, not faster). "
            "Supported: %s.", type(lm).__name__, model_type, ", ".join(SUPPORTED_MODEL_TYPES))
        return False
    if is_patched(lm):
        return True
    try:
        adapter(lm)
    except (AttributeError, TypeError) as err:  # a layout this adapter does not know: leave it untouched
        unpatch(lm)
        logger.warning("slothnb: could not patch %s (%s); it runs unpatched.", type(lm).__name__, err)
        return False
    return True


def unpatch_model(model: nn.Module) -> None:
    """Restore the transformers forwards on every module ``patch_model`` touched."""
    unpatch(_causal_lm(model))


__all__ = ["patch_model", "unpatch_model", "is_patched", "SUPPORTED_MODEL_TYPES"]
