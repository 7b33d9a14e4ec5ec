"""LoRA adapters on their own: peft's format (adapter_config.json + adapter_model.safetensors)."""
from pathlib import Path

from slothnb.errors import ConfigError
from slothnb.saving.safety import assert_safetensors_only


def save_adapters(model, save_directory, tokenizer=None) -> Path:
    """peft's `save_pretrained` (adapter weights only, safetensors), plus the tokenizer."""
    from slothnb.saving.merged import writable_directory

    if not hasattr(model, "peft_config"):
        raise ConfigError("This model has no LoRA adapters to save; call get_peft_model first, "
                          "or use save_method='merged_16bit' to save the full model.")
    directory = writable_directory(save_directory)
    model.save_pretrained(str(directory), safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory


def load_adapters(base_model, adapter_directory, is_trainable=False):
    """Wrap `base_model` with the adapters saved in `adapter_directory` (safetensors only)."""
    from peft import PeftModel

    assert_safetensors_only(adapter_directory)
    return PeftModel.from_pretrained(base_model, str(adapter_directory), is_trainable=is_trainable)
