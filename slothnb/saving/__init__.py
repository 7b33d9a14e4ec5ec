"""Saving a fine-tuned model: adapters, merged 16-bit/4-bit checkpoints, GGUF, and Hub pushes.

`attach_saving_methods(model)` binds the Unsloth-style methods on one model instance
(`model.save_pretrained_merged(...)`, `model.save_pretrained_gguf(...)`, `model.push_to_hub_merged(...)`,
`model.push_to_hub_gguf(...)`); `model.save_pretrained` stays peft's adapter-only save.
"""
import types

from slothnb.saving.adapters import load_adapters, save_adapters
from slothnb.saving.gguf_export import QUANTIZATION_METHODS, save_pretrained_gguf
from slothnb.saving.hub import push_to_hub_gguf, push_to_hub_merged
from slothnb.saving.merged import SAVE_METHODS, merged_tensors, save_pretrained_merged
from slothnb.saving.safety import assert_safetensors_only

_METHODS = {
    "save_pretrained_merged": save_pretrained_merged,
    "save_pretrained_gguf": save_pretrained_gguf,
    "push_to_hub_merged": push_to_hub_merged,
    "push_to_hub_gguf": push_to_hub_gguf,
}


def attach_saving_methods(model):
    """Bind the saving methods on this instance only (the class is untouched); returns the model."""
    for name, function in _METHODS.items():
        setattr(model, name, types.MethodType(function, model))
    return model


__all__ = ["attach_saving_methods", "assert_safetensors_only", "load_adapters", "save_adapters",
           "save_pretrained_merged", "save_pretrained_gguf", "push_to_hub_merged", "push_to_hub_gguf",
           "merged_tensors", "SAVE_METHODS", "QUANTIZATION_METHODS"]
