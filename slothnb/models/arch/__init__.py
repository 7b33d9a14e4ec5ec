"""One adapter per supported decoder architecture, keyed by ``config.model_type``."""
from slothnb.models.arch import gemma, gemma2, llama, mistral, phi3, qwen2, qwen3

ADAPTERS = {
    "llama": llama.patch,
    "mistral": mistral.patch,
    "qwen2": qwen2.patch,
    "qwen3": qwen3.patch,
    "gemma": gemma.patch,
    "gemma2": gemma2.patch,
    "phi3": phi3.patch,
}

__all__ = ["ADAPTERS"]
